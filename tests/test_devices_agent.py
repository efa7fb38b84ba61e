"""`edgeattn serve` on this machine: a real TVM RPC server with probes, behind TVM's own tracker.

The agent runs exactly as a user starts it (the `edgeattn` executable, which
execs ``python -m edgeattn.devices.agent``) and registers with a local TVM
tracker; every client call goes over loopback RPC.  The emulated aarch64 runs
of the same agent are in ``test_devices_emulated.py``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgeattn.devices import profiles as P
from edgeattn.devices.connect import open_device, rpc_connect
from edgeattn.devices.errors import DeviceError, DeviceLostError
from edgeattn.devices.tracker import LocalTracker, servers_for_key, tracker_summary

EDGEATTN = str(Path(sys.executable).with_name("edgeattn"))
KEY = "host-agent"
MIB = 2**20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _profile(tracker: str, key: str = KEY, timeout: float = 60.0) -> P.DeviceProfile:
    return P.profile_from_dict(
        {
            "name": "test-host-agent",
            "targets": ["x86-host"],
            "memory_budget": "1GiB",
            "connect": {"kind": "tracker", "tracker": tracker, "key": key, "timeout_s": timeout},
        }
    )


@pytest.fixture(scope="module")
def tracker() -> Iterator[LocalTracker]:
    with LocalTracker() as t:
        yield t


@pytest.fixture(scope="module")
def agent(tracker: LocalTracker, tmp_path_factory) -> Iterator[dict]:
    port = _free_port()
    log = tmp_path_factory.mktemp("agent") / "serve.log"
    cmd = [EDGEATTN, "serve", "--port", str(port), "--tracker", tracker.address, "--key", KEY, "--name", "unit"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not servers_for_key(tracker_summary(tracker.address), KEY):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the agent did not register within 180 s:\n" + log.read_text()
            time.sleep(0.3)
        yield {"port": port, "log": log, "proc": proc}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_serve_says_it_binds_to_loopback_and_registers(agent: dict, tracker: LocalTracker) -> None:
    text = agent["log"].read_text()
    assert f"serving on 127.0.0.1:{agent['port']}, loopback only (TVM RPC has no authentication)" in text
    assert f"registered with tracker {tracker.address} under key '{KEY}'" in text
    assert servers_for_key(tracker_summary(tracker.address), KEY) == [("127.0.0.1", agent["port"])]


def test_probes_answer_through_the_tracker(agent: dict, tracker: LocalTracker) -> None:
    with open_device(_profile(tracker.address)) as dev:
        probe = dev.probe()
        assert probe is not None
        assert probe["server"]["name"] == "unit" and probe["server"]["port"] == agent["port"]
        assert probe["server"]["key"] == KEY
        assert probe["pid"] != os.getpid() and probe["pid"] != agent["proc"].pid  # the session's worker
        assert probe["peak_rss"] >= probe["rss"] > 0
        assert probe["mem_total"] > probe["mem_available"] > 0
        assert isinstance(probe["cpu_freq_mhz"], list) and isinstance(probe["temperatures_c"], dict)
        assert dev.address == f"127.0.0.1:{agent['port']}"


def _fill_library(tmp_path: Path, n: int) -> Path:
    """A kernel that writes n float32 values: run on a fresh output, it makes the device touch 4n bytes."""
    import tvm
    from tvm import te

    a = te.placeholder((1,), name="a")
    c = te.compute((n,), lambda i: a[0] + i.astype("float32"), name="c")
    lib = tvm.compile(tvm.IRModule({"main": te.create_prim_func([a, c])}), target="llvm")
    path = tmp_path / "fill.so"
    lib.export_library(str(path))
    return path


def test_peak_memory_of_a_run_within_10_percent(agent: dict, tracker: LocalTracker, tmp_path: Path) -> None:
    """A run that allocates and writes 256 MiB on the device reports a peak 256 MiB above its start (+-10 %)."""
    import tvm

    n = 64 * MIB  # float32: 256 MiB
    lib_path = _fill_library(tmp_path, n)
    with open_device(_profile(tracker.address)) as dev:
        dev.session.upload(str(lib_path))
        fill = dev.session.load_module(lib_path.name)
        remote = dev.session.cpu(0)
        x = tvm.runtime.tensor(np.ones(1, "float32"), remote)
        start = dev.reset_peak()
        assert start is not None and start["peak_reset"] and start["peak_rss"] - start["rss"] < 4 * MIB
        y = tvm.runtime.empty((n,), "float32", remote)
        with dev.guard("fill"):
            fill["main"](x, y)
        after = dev.probe()
        grew = after["peak_rss"] - start["rss"]
        assert abs(grew - 4 * n) <= 0.10 * 4 * n, f"peak grew {grew / MIB:.1f} MiB for a 256 MiB run"
        assert float(y.numpy()[-1]) == n  # the run really wrote the buffer
        del y
        again = dev.reset_peak()  # the buffer is freed: the reset brings the peak back down
        assert again["peak_rss"] < after["peak_rss"] - 128 * MIB


def test_an_error_on_the_device_is_one_line_and_the_session_goes_on(
    agent: dict, tracker: LocalTracker, tmp_path: Path
) -> None:
    import tvm

    lib_path = _fill_library(tmp_path, 1003)
    with open_device(_profile(tracker.address)) as dev:
        dev.session.upload(str(lib_path))
        fill = dev.session.load_module(lib_path.name)
        remote = dev.session.cpu(0)
        x = tvm.runtime.tensor(np.ones(1, "float32"), remote)
        with pytest.raises(DeviceError) as err, dev.guard("fill"):
            fill["main"](x, tvm.runtime.empty((5,), "float32", remote))  # wrong output shape
        assert not isinstance(err.value, DeviceLostError)
        assert "raised an error during fill" in str(err.value) and "expected 1003" in str(err.value)
        assert len(str(err.value).splitlines()) == 1
        y = tvm.runtime.empty((1003,), "float32", remote)
        with dev.guard("fill"):
            fill["main"](x, y)
        assert float(y.numpy()[-1]) == 1003


def test_a_busy_key_waits_then_fails_clearly(agent: dict, tracker: LocalTracker) -> None:
    with open_device(_profile(tracker.address)):  # holds the only server of the key
        t0 = time.monotonic()
        with pytest.raises(DeviceError, match="stayed busy for 3 s"):
            open_device(_profile(tracker.address, timeout=3))
        assert time.monotonic() - t0 < 20


def test_key_with_no_server_fails_at_once(tracker: LocalTracker) -> None:
    t0 = time.monotonic()
    with pytest.raises(DeviceError, match="no server is registered under key 'nobody'.*edgeattn serve"):
        open_device(_profile(tracker.address, key="nobody"))
    assert time.monotonic() - t0 < 10


def test_dead_tracker_fails_within_the_timeout() -> None:
    dead = f"127.0.0.1:{_free_port()}"
    t0 = time.monotonic()
    with pytest.raises(DeviceError, match=f"tracker at {dead} does not answer.*rpc_tracker"):
        open_device(_profile(dead, timeout=2))
    assert time.monotonic() - t0 < 10


def test_direct_connection_errors(agent: dict) -> None:
    closed = _free_port()
    with pytest.raises(DeviceError, match=f"no TVM RPC server answers at 127.0.0.1:{closed}"):
        rpc_connect("127.0.0.1", closed, timeout=2)
    # a server registered with a tracker only takes the clients the tracker sent (match key)
    with pytest.raises(DeviceError, match="refused the session"):
        rpc_connect("127.0.0.1", agent["port"], timeout=30)


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EDGEATTN, *args], capture_output=True, text=True, timeout=timeout)


def _one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    out = (done.stdout + done.stderr).strip()
    assert done.returncode == 2, out
    assert "Traceback" not in out and len(out.splitlines()) == 1 and out.startswith("error: "), out
    return out


def test_cli_bad_device_inputs_are_one_line(tracker: LocalTracker, tmp_path: Path, monkeypatch) -> None:
    """Each bad input from the shell: one error line, exit 2, no traceback, no hang past its timeout."""
    monkeypatch.setenv(P.ENV_USER_DIR, str(tmp_path / "devices"))
    for name, tr, key in (("deadtracker", f"127.0.0.1:{_free_port()}", "x"), ("nokey", tracker.address, "nobody")):
        P.save_profile(P.profile_from_dict(_profile(tr, key, timeout=3).to_dict() | {"name": name}))
    t0 = time.monotonic()
    assert "does not answer" in _one_error_line(_cli("devices", "show", "deadtracker", "--probe", "--timeout", "3"))
    assert "no server is registered under key 'nobody'" in _one_error_line(
        _cli("devices", "show", "nokey", "--probe", "--timeout", "3")
    )
    assert "unknown device 'nope'" in _one_error_line(_cli("devices", "show", "nope"))
    assert "--key" in _one_error_line(_cli("serve", "--tracker", tracker.address))
    dead = f"127.0.0.1:{_free_port()}"
    assert "does not answer" in _one_error_line(_cli("serve", "--tracker", dead, "--key", "k"))
    assert time.monotonic() - t0 < 120  # five CLI starts (each imports the CLI: seconds on a busy machine)
