"""An emulated aarch64 device: TVM's RPC server in aarch64 Python under qemu-user, on 127.0.0.1.

Why: it is a real AArch64 execution of cross-compiled kernels (qemu
translates every instruction, NEON included) reached through the same TVM RPC
path as a Raspberry Pi or a Jetson, so the deployment code and the numerics of
the ARM builds are checked on this x86 machine.  Timings under emulation mean
nothing; correctness does.

Set-up (once, into a cache folder): ``python -m edgeattn.devices.arm64_emulator_setup``.
Use::

    with EmulatedArm64Device() as dev:
        remote = dev.session          # tvm.rpc.RPCSession
        remote.upload(path); lib = remote.load_module(name); ...
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

ENV_ROOT = "EDGEATTN_ARM64_EMU"
DEFAULT_ROOT = Path.home() / ".cache" / "edgeattn" / "arm64-emu"
DEBIAN_SUITE = "bookworm"
PYTHON_VERSION = "3.11"  # bookworm's python3
SETUP_COMMAND = "python -m edgeattn.devices.arm64_emulator_setup"
HOST = "127.0.0.1"
TARGET_NAME = "arm64"
"""Target profile (kernels_tvm.targets) to build for this device; qemu's default CPU ("max") also
runs code built for the arm-a76 and arm-a78ae profiles (the tests do)."""


AGENT = Path(__file__).resolve().parent / "agent.py"


class EmulatorNotSetUpError(RuntimeError):
    """The rootfs / aarch64 site-packages are missing; the message names the set-up command."""


@dataclass(frozen=True)
class EmulatorLayout:
    """Where the emulator's pieces live inside its cache folder."""

    root: Path

    @property
    def rootfs(self) -> Path:
        return self.root / "rootfs"

    @property
    def site(self) -> Path:
        return self.root / "site"

    @property
    def python(self) -> Path:
        return self.rootfs / "usr" / "bin" / f"python{PYTHON_VERSION}"

    @property
    def wrapper(self) -> Path:
        """x86 shell script that runs the aarch64 Python under qemu (also its ``sys.executable``)."""
        return self.root / "python-aarch64"

    @property
    def ready_marker(self) -> Path:
        return self.root / "READY.json"


def emulator_layout() -> EmulatorLayout:
    """The layout under ``$EDGEATTN_ARM64_EMU`` (default ``~/.cache/edgeattn/arm64-emu``)."""
    root = os.environ.get(ENV_ROOT)
    return EmulatorLayout(Path(root).expanduser() if root else DEFAULT_ROOT)


def setup_problem(layout: EmulatorLayout | None = None) -> str | None:
    """Why the emulator cannot start (None when it can): used by tests to skip with a reason."""
    layout = layout or emulator_layout()
    if shutil.which("qemu-aarch64-static") is None:
        return "qemu-aarch64-static is not installed (apt-get install qemu-user-static), then run " + SETUP_COMMAND
    if not layout.ready_marker.exists() or not layout.wrapper.exists() or not layout.python.exists():
        return f"the emulated aarch64 device is not set up in {layout.root}: run `{SETUP_COMMAND}`"
    return None


def is_set_up(layout: EmulatorLayout | None = None) -> bool:
    return setup_problem(layout) is None


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM the server when the Python process that started it dies (even killed)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except OSError:
        pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class EmulatedArm64Device:
    """Starts ``tvm.exec.rpc_server`` under qemu on 127.0.0.1 and stops it on exit.

    ``start`` returns once the server has answered a real RPC session (not just
    opened its port): importing TVM under emulation takes 10-20 s, so
    ``start_timeout`` defaults to a generous 300 s on a busy 2-core machine.
    """

    def __init__(
        self,
        port: int | None = None,
        start_timeout: float = 300.0,
        session_timeout: float = 900.0,
        tracker: str | None = None,
        key: str = "",
        runtime_only: bool = False,
        name: str = "arm64-emulated",
    ) -> None:
        self.layout = emulator_layout()
        self.port = port
        self.start_timeout = start_timeout
        # the server ends a session after this many seconds: a kernel hung under emulation fails, not blocks
        self.session_timeout = session_timeout
        # registered with a TVM RPC tracker under ``key``, the server answers only clients the tracker sent
        # (it expects the tracker's match key), so start() then waits for the registration instead
        self.tracker = tracker
        self.key = key
        # TVM_USE_RUNTIME_LIB=1: TVM's runtime library alone, as on a board (imports in ~4 s instead of ~12 s
        # under qemu, but the remote has no compiler functions such as target.llvm_get_system_triple)
        self.runtime_only = runtime_only
        self.name = name
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_path = Path()
        self._log_dir: tempfile.TemporaryDirectory[str] | None = None
        self._session: Any = None

    # -------------------------------------------------------------- life cycle

    def start(self) -> EmulatedArm64Device:
        problem = setup_problem(self.layout)
        if problem:
            raise EmulatorNotSetUpError(problem)
        if self._proc is not None:
            return self
        self.port = self.port or _free_port()
        self._log_dir = tempfile.TemporaryDirectory(prefix="edgeattn-arm64-rpc-")
        log_path = Path(self._log_dir.name) / "rpc_server.log"
        command = [
            str(self.layout.wrapper),
            str(AGENT),  # TVM's RPC server + edgeattn's probes; the file imports only tvm and numpy
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--port-end",
            str(self.port + 1),
            "--name",
            self.name,
            # spawn, not fork, the session process: forking the multi-threaded server under
            # qemu-user sometimes left a child that never ran (a session hung for good)
            "--no-fork",
        ]
        if self.tracker:
            command += ["--tracker", self.tracker, "--key", self.key]
        env = dict(os.environ)
        if self.runtime_only:
            env["TVM_USE_RUNTIME_LIB"] = "1"
        self._log_path = log_path
        with open(log_path, "wb") as log:
            self._proc = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._log_dir.name,
                env=env,
                start_new_session=True,  # own process group: stop() ends the server and its workers only
                preexec_fn=_die_with_parent,
            )
        try:
            if self.tracker:
                self._wait_until_registered(log_path)
            else:
                self._session = self._wait_until_it_answers(log_path)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_it_answers(self, log_path: Path) -> Any:
        from tvm import rpc

        deadline = time.monotonic() + self.start_timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"the emulated RPC server exited with code {self._proc.returncode}:\n{self.log_text(log_path)}"
                )
            if f"bind to {HOST}:{self.port}" in self.log_text(log_path):
                try:
                    session = rpc.connect(HOST, self.port, session_timeout=self.session_timeout)
                    if session.cpu(0).exist:
                        return session
                except Exception as err:  # the server may still be importing; retry until the deadline
                    last_error = err
            time.sleep(0.5)
        raise TimeoutError(
            f"the emulated aarch64 RPC server on {HOST}:{self.port} did not answer within {self.start_timeout:.0f} s "
            f"(last error: {last_error}); log:\n{self.log_text(log_path)}"
        )

    def _wait_until_registered(self, log_path: Path) -> None:
        from .errors import DeviceError
        from .tracker import tracker_summary

        deadline = time.monotonic() + self.start_timeout
        last = ""
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"the emulated RPC server exited with code {self._proc.returncode}:\n{self.log_text(log_path)}"
                )
            try:
                summary = tracker_summary(str(self.tracker), timeout=5.0)
                for item in summary.get("server_info", []):
                    if item.get("key") == f"server:{self.key}" and int(item.get("addr", [0, 0])[1]) == self.port:
                        return
            except DeviceError as err:
                last = str(err)
            time.sleep(0.5)
        raise TimeoutError(
            f"the emulated aarch64 RPC server on {HOST}:{self.port} did not register with the tracker "
            f"{self.tracker} within {self.start_timeout:.0f} s ({last}); log:\n{self.log_text(log_path)}"
        )

    @property
    def pid(self) -> int | None:
        """The server's process id (its process group holds its session workers), None when stopped."""
        return self._proc.pid if self._proc is not None else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log(self) -> str:
        """The server's log so far (its own lines and TVM's)."""
        return self.log_text(self._log_path) if self._log_dir is not None else ""

    @staticmethod
    def log_text(log_path: Path) -> str:
        try:
            return log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """End the server's process group (the server and the session workers it forked)."""
        self._session = None
        proc, self._proc = self._proc, None
        if proc is not None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                # the session workers the server forked share its process group; under qemu a
                # worker blocked in a call may ignore SIGTERM, so the group always gets SIGKILL too
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        if self._log_dir is not None:
            self._log_dir.cleanup()
            self._log_dir = None

    @property
    def session(self) -> Any:
        """The ``tvm.rpc.RPCSession`` opened by ``start`` (the server answered it; None behind a tracker)."""
        if self._session is None:
            raise RuntimeError("the emulated device is not running: use `with EmulatedArm64Device() as dev:`")
        return self._session

    def release_session(self) -> None:
        """Close the session ``start`` opened: a TVM server serves one session at a time, so a server
        left for other clients (``edgeattn devices emulate arm64`` without a tracker) must not hold it."""
        session, self._session = self._session, None
        del session  # the RPC client closes its socket when the last reference goes

    def new_session(self) -> Any:
        """Another RPC session to the running server (each session gets its own remote worker)."""
        from tvm import rpc

        if self._proc is None:
            raise RuntimeError("the emulated device is not running: call start() first")
        return rpc.connect(HOST, self.port, session_timeout=self.session_timeout)

    def __enter__(self) -> EmulatedArm64Device:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def run_on_device(session: Any, lib: Any, fcompile: Any, func_name: str, args: list[Any]) -> list[Any]:
    """Export ``lib`` with ``fcompile``, upload it, run ``func_name`` on the remote CPU; returns numpy arrays.

    ``args`` are numpy arrays, copied to the device before and back after (so
    outputs poisoned on the host arrive poisoned on the device).
    """
    import tvm
    from tvm.support import utils

    tmp = utils.tempdir()
    name = f"edgeattn_{func_name}_{os.getpid()}_{time.monotonic_ns()}.so"
    path = tmp.relpath(name)
    lib.export_library(path, fcompile=fcompile)
    session.upload(path)
    remote_lib = session.load_module(name)
    dev = session.cpu(0)
    tensors = [tvm.runtime.tensor(a, dev) for a in args]
    remote_lib[func_name](*tensors)
    return [t.numpy() for t in tensors]
