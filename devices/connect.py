"""Reaching a device through TVM's RPC: direct host:port, a tracker and a key, adb, the emulator.

Why this layer: TVM's client calls wait without bound in the places a user
hits first (a dead tracker is retried for 60 s, a key with no server queues
forever, a busy server holds the handshake), and their errors are C++ stack
traces.  Here every wait has a timeout, refused connections are retried a few
times, and every failure is one :class:`DeviceError` line that says what
failed and what to do.  The queueing itself is TVM's tracker (a device farm is
many servers behind one tracker, each request served by a free server of its
key); this module only asks it, with a deadline.

    with open_device(get_profile("rpi5")) as dev:       # RemoteDevice
        dev.session.upload(path); lib = dev.session.load_module(name)
        with dev.guard("prefill"):                         # a dropped server -> DeviceLostError
            lib["main"](...)
        dev.probe()["peak_rss"]                           # from `edgeattn serve` on the device
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import DeviceError, DeviceLostError
from .errors import why as _why
from .profiles import Connection, DeviceProfile, parse_addr
from .tracker import request_server, servers_for_key, tracker_summary

PROBE = "edgeattn.agent.probe"  # the names devices/agent.py registers (kept in step by a test)
RESET_PEAK = "edgeattn.agent.reset_peak"


# ------------------------------------------------------------------ plain sockets, with deadlines


def tcp_problem(host: str, port: int, timeout: float) -> str | None:
    """None when something accepts TCP connections at host:port within ``timeout``; else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            # TVM's server closes quietly on a wrong magic number; an empty word says "not RPC, bye"
            sock.sendall(b"\0\0\0\0")
        return None
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except OSError as err:
        return err.strerror or str(err)


def rpc_connect(host: str, port: int, key: str = "", timeout: float = 10.0, session_timeout: float = 0) -> Any:
    """``tvm.rpc.connect`` with a deadline on the TCP connect and on TVM's handshake.

    The handshake runs in a helper thread (TVM's client blocks in C++ and releases
    the GIL): a server busy with another session (TVM serves one at a time) would
    otherwise hold the caller forever.
    """
    problem = tcp_problem(host, port, min(timeout, 5.0))
    if problem:
        raise DeviceError(
            f"no TVM RPC server answers at {host}:{port} ({problem}); start one on the device "
            f"(`edgeattn serve --port {port}`) or fix the address"
        )
    from tvm import rpc

    result: dict[str, Any] = {}

    def attempt() -> None:
        try:
            result["session"] = rpc.connect(host, port, key=key, session_timeout=session_timeout)
        except Exception as err:  # TVM raises its own error classes; reported below
            result["error"] = err

    worker = threading.Thread(target=attempt, daemon=True, name=f"rpc-connect-{host}:{port}")
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise DeviceError(
            f"the TVM RPC server at {host}:{port} accepted the connection but did not start a session within "
            f"{timeout:g} s: it is busy with another client (a server runs one session at a time) or is not a "
            "TVM RPC server; use a tracker to queue jobs, or raise the timeout"
        )
    if "error" in result:
        raise DeviceError(f"the TVM RPC server at {host}:{port} refused the session: {_why(result['error'])}")
    return result["session"]


# ------------------------------------------------------------------ adb (Android)


def adb(args: list[str], serial: str | None = None, timeout: float = 15.0) -> str:
    """Run ``adb [-s SERIAL] ARGS``; DeviceError with adb's own message when it fails."""
    exe = shutil.which("adb")
    if exe is None:
        raise DeviceError(
            "adb is not on PATH: install Android's platform-tools (Debian: apt-get install adb) "
            "and connect the phone with USB debugging on"
        )
    cmd = [exe, *(["-s", serial] if serial else []), *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise DeviceError(f"`{' '.join(cmd)}` did not finish within {timeout:g} s (is the phone authorised?)") from None
    if done.returncode != 0:
        msg = (done.stderr or done.stdout).strip().splitlines()
        raise DeviceError(f"`{' '.join(cmd)}` failed: {msg[-1] if msg else f'exit {done.returncode}'}")
    return done.stdout


def adb_devices() -> list[str]:
    """Serials of the attached, authorised devices (``adb devices``)."""
    lines = adb(["devices"]).splitlines()[1:]
    return [ln.split()[0] for ln in lines if ln.strip().endswith("\tdevice") or ln.split()[-1:] == ["device"]]


def adb_tunnel(conn: Connection) -> None:
    """Set up the USB tunnel a profile asks for.

    ``forward``: this machine's ``local_port`` reaches the server on the phone's
    ``device_port`` (direct RPC).  ``reverse``: the phone reaches the host's
    tracker on the same port number, and its server's port is forwarded back,
    so the tracker can hand clients ``127.0.0.1:device_port`` (run the server
    on the phone with ``--custom-addr 127.0.0.1``).
    """
    serials = adb_devices()
    if conn.serial and conn.serial not in serials or not serials:
        raise DeviceError(
            f"no authorised Android device {conn.serial or ''} on adb (attached: {', '.join(serials) or 'none'}); "
            "plug the phone in, enable USB debugging and accept the prompt"
        )
    if len(serials) > 1 and not conn.serial:
        raise DeviceError(f"several Android devices on adb ({', '.join(serials)}): set connect.serial in the profile")
    if conn.mode == "forward":
        adb(["forward", f"tcp:{conn.local_port}", f"tcp:{conn.device_port}"], conn.serial)
    else:
        _, tport = parse_addr(conn.tracker or "", "tracker")
        adb(["reverse", f"tcp:{tport}", f"tcp:{tport}"], conn.serial)
        adb(["forward", f"tcp:{conn.device_port}", f"tcp:{conn.device_port}"], conn.serial)


# ------------------------------------------------------------------ a connected device


# What TVM's client raises when the server side of a session is gone (read in its errors, seen in tests).
_LOST_MARKERS = ("kShutdown", "Socket", "socket", "onnection", "closed", "EOF", "recv", "Broken pipe")


@dataclass
class RemoteDevice:
    """An open RPC session to a device (or None for ``local``), and what to say when it breaks."""

    name: str
    session: Any
    address: str  # the server that serves this session ("local" for the host)
    via: str  # how it was reached, for messages
    emulated: bool = False
    _cleanup: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def probe(self) -> dict[str, Any] | None:
        """The agent's probe (peak RSS, memory, GPU memory, CPU MHz, temperatures); None from a plain TVM server."""
        return self._agent_call(PROBE)

    def reset_peak(self) -> dict[str, Any] | None:
        """Reset the session's peak RSS to its current RSS (the start of a measured run)."""
        return self._agent_call(RESET_PEAK)

    def _agent_call(self, name: str) -> dict[str, Any] | None:
        if self.session is None:
            from . import agent

            return json.loads(agent._reset_peak_json() if name == RESET_PEAK else agent._probe_json())
        with self.guard(name):
            try:
                func = self.session.get_function(name)
            except Exception as err:  # a plain TVM RPC server does not have edgeattn's probes
                if "not found" in str(err).lower() or "cannot find" in str(err).lower():
                    return None
                raise
            return json.loads(func())

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Turn RPC failures during ``what`` into one line: DeviceLostError for a dropped connection,
        DeviceError for an error the device raised (TVM's message, without its C++ trace)."""
        try:
            yield
        except DeviceError:
            raise
        except Exception as err:
            text = str(err)
            where = f"device {self.name} ({self.address}, {self.via})"
            if "RPCSessionTimeout" in text:
                raise DeviceLostError(
                    f"{where} ended the session during {what}: its session timeout expired; raise session_timeout"
                ) from None
            if "Error caught from RPC call" in text:  # the device ran the call and it raised
                detail = " ".join(text.split("Error caught from RPC call", 1)[1].lstrip(":").split())
                raise DeviceError(f"{where} raised an error during {what}: {detail[:500]}") from None
            if isinstance(err, OSError) or any(m in text for m in _LOST_MARKERS):
                raise DeviceLostError(
                    f"the connection to {where} dropped during {what}: the server died or was stopped "
                    f"({_why(err)}); rerun to get another server"
                ) from None
            raise

    def close(self) -> None:
        """End the RPC session now (not when the last remote tensor is garbage collected): the server
        serves one session at a time and goes back to its tracker only when this one ends."""
        session, self.session = self.session, None
        if session is not None:
            with contextlib.suppress(Exception):  # already gone: nothing to close
                session._sess["CloseRPCConnection"]()
        while self._cleanup:
            self._cleanup.pop()()

    def __enter__(self) -> RemoteDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_device(
    profile: DeviceProfile,
    *,
    tracker: str | None = None,
    key: str | None = None,
    timeout: float | None = None,
    session_timeout: float = 0,
) -> RemoteDevice:
    """Connect to ``profile``'s device; ``tracker``/``key`` override the profile's (``run --tracker``).

    Retries a refused connection ``connect.retries`` times (a server restarting,
    or one taken by another client between the tracker's answer and ours); every
    other failure is a DeviceError at once.
    """
    conn = profile.connect
    if tracker or key:
        conn = replace(conn, kind="tracker", tracker=tracker or conn.tracker, key=key or conn.key)
        if not conn.tracker or not conn.key:
            raise DeviceError(f"device {profile.name}: a tracker needs both --tracker HOST:PORT and --key NAME")
    wait = timeout if timeout is not None else conn.timeout_s
    if conn.kind == "local":
        return RemoteDevice(profile.name, None, "local", "this machine")
    if conn.kind == "emulated":
        return _open_emulated(profile, wait, session_timeout)
    if conn.kind == "adb":
        adb_tunnel(conn)
    last: DeviceError | None = None
    for attempt in range(conn.retries + 1):
        if attempt:
            time.sleep(min(2.0, 0.5 * attempt))
        try:
            if conn.kind == "rpc":
                host, port, match, via = str(conn.host), int(conn.port or 0), "", "direct RPC"
            elif conn.kind == "adb" and conn.mode == "forward":
                host, port, match, via = "127.0.0.1", int(conn.local_port or 0), "", "adb forward"
            else:
                host, port, match = request_server(str(conn.tracker), str(conn.key), wait)
                via = f"tracker {conn.tracker} key {conn.key}"
            session = rpc_connect(host, port, match, wait, session_timeout)
            return RemoteDevice(profile.name, session, f"{host}:{port}", via, emulated=profile.emulated)
        except DeviceError as err:
            last = err
            if "refused" not in str(err) and "dropped" not in str(err):
                break
    assert last is not None
    raise DeviceError(f"device {profile.name}: {last}") from None


def _open_emulated(profile: DeviceProfile, timeout: float, session_timeout: float) -> RemoteDevice:
    from .emulated_arm64 import EmulatedArm64Device, EmulatorNotSetUpError

    dev = EmulatedArm64Device(
        start_timeout=max(timeout, 300.0),
        session_timeout=session_timeout or 900.0,
        runtime_only=True,
        name=profile.name,
    )
    try:
        dev.start()
    except EmulatorNotSetUpError as err:
        raise DeviceError(f"device {profile.name}: {err}") from None
    except TimeoutError as err:  # a loaded machine can take minutes to start TVM under qemu
        first = str(err).splitlines()[0]
        raise DeviceError(f"device {profile.name}: {first}; try again when the machine is less busy") from None
    remote = RemoteDevice(profile.name, dev.session, f"127.0.0.1:{dev.port}", "emulated (qemu)", emulated=True)
    remote._cleanup.append(dev.stop)
    return remote


def reachability(profile: DeviceProfile, timeout: float = 1.0) -> str:
    """One short phrase: can this device be reached now?  Never raises, never waits past ~``timeout``."""
    conn = profile.connect
    try:
        if conn.kind == "local":
            return "local"
        if conn.kind == "emulated":
            from .emulated_arm64 import setup_problem

            problem = setup_problem()
            return "set up (starts on demand)" if problem is None else "not set up (arm64_emulator_setup)"
        if conn.kind == "rpc":
            problem = tcp_problem(str(conn.host), int(conn.port or 0), timeout)
            return "up" if problem is None else f"down ({problem})"
        if conn.kind == "adb" and conn.mode == "forward":
            if shutil.which("adb") is None:
                return "adb not installed"
            serials = adb_devices()
            if not serials or (conn.serial and conn.serial not in serials):
                return "no phone on adb"
            return "phone on adb"
        summary = tracker_summary(str(conn.tracker), timeout)
        servers = servers_for_key(summary, str(conn.key))
        free = summary.get("queue_info", {}).get(conn.key, {}).get("free", 0)
        if not servers:
            return f"tracker up, no server under key {conn.key}"
        return f"{len(servers)} server(s), {free} free"
    except DeviceError as err:
        text = str(err)
        return "tracker down" if "does not answer" in text else text.split(";")[0]
    except Exception as err:  # reachability is a hint in a table: never a traceback
        return f"unknown ({_why(err)})"
