"""A device farm in miniature: TVM's tracker with two emulated aarch64 servers under one key.

One server is started as a user would (`edgeattn devices emulate arm64 --tracker
--key`), the other in-process; both run the agent under qemu with TVM's runtime
library alone, sharing one arm64 root.  Jobs asked of the key reach a live
server; killing the server of a job in flight fails that job with one clear
error, and the next job goes to the other server.  Timings here are emulated
and are not measured at all.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgeattn.devices import emulated_arm64 as emu
from edgeattn.devices import profiles as P
from edgeattn.devices.connect import open_device
from edgeattn.devices.errors import DeviceLostError
from edgeattn.devices.tracker import LocalTracker, servers_for_key, tracker_summary

pytestmark = pytest.mark.skipif(not emu.is_set_up(), reason=emu.setup_problem() or "")

EDGEATTN = str(Path(sys.executable).with_name("edgeattn"))
KEY = "rpi5-emulated"
N = 1003


def _profile(tracker: str) -> P.DeviceProfile:
    # generous: under qemu on a busy 2-core machine a session worker takes 10-60 s to import TVM's runtime
    return P.profile_from_dict(
        {
            "name": "farm-pi",
            "targets": ["arm-a76"],
            "memory_budget": "1GiB",
            "emulated": True,
            "connect": {"kind": "tracker", "tracker": tracker, "key": KEY, "timeout_s": 400},
        }
    )


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    """c = a * b + exp(a), cross-compiled for the Pi 5 profile (qemu's CPU runs Cortex-A76 code)."""
    import tvm
    from tvm import te

    from edgeattn.kernels_tvm.targets import get_profile

    profile = get_profile("arm-a76")
    a, b = te.placeholder((N,), name="a"), te.placeholder((N,), name="b")
    c = te.compute((N,), lambda i: a[i] * b[i] + te.exp(a[i]), name="c")
    lib = tvm.compile(tvm.IRModule({"main": te.create_prim_func([a, b, c])}), target=profile.target())
    path = tmp_path_factory.mktemp("farm") / "job.so"
    lib.export_library(str(path), fcompile=profile.fcompile())
    return path


@pytest.fixture(scope="module")
def farm() -> Iterator[dict]:
    """The tracker, the CLI-started server (a subprocess) and the in-process one, all on loopback."""
    with LocalTracker() as tracker:
        cli = subprocess.Popen(
            [EDGEATTN, "devices", "emulate", "arm64", "--tracker", tracker.address, "--key", KEY],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        inproc = emu.EmulatedArm64Device(tracker=tracker.address, key=KEY, runtime_only=True, name="inproc")
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(iter(cli.stdout.readline, "")), daemon=True)
        reader.start()
        try:
            inproc.start()  # meanwhile the CLI's server starts too (both under qemu)
            deadline = time.monotonic() + 400
            # registered with the tracker, and the CLI has said so (its own check polls the tracker too)
            while len(servers_for_key(tracker_summary(tracker.address), KEY)) < 2 or "Ctrl-C" not in "".join(lines):
                assert cli.poll() is None, "".join(lines)
                assert time.monotonic() < deadline, "the CLI server did not register:\n" + "".join(lines)
                time.sleep(0.5)
            port = int(re.search(r"serving on 127\.0\.0\.1:(\d+)", "".join(lines)).group(1))
            yield {"tracker": tracker, "cli": cli, "cli_port": port, "cli_lines": lines, "inproc": inproc}
        finally:
            inproc.stop()
            if cli.poll() is None:
                os.killpg(cli.pid, signal.SIGKILL)
                cli.wait()


def _inputs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return rng.standard_normal(N).astype("float32"), rng.standard_normal(N).astype("float32")


def _job(
    profile: P.DeviceProfile, library: Path, started: threading.Event | None = None, repeats: int = 0, who=None
) -> dict:
    """Ask the tracker for a server of the key, run the kernel there, check it; returns who served it."""
    import tvm

    with open_device(profile, session_timeout=900) as dev:
        probe = dev.probe()
        assert probe is not None and probe["machine"] == "aarch64"
        with dev.guard("uploading the job"):
            dev.session.upload(str(library))
            lib = dev.session.load_module(library.name)
            remote = dev.session.cpu(0)
            x, y = _inputs()
            args = [tvm.runtime.tensor(v, remote) for v in (x, y, np.full(N, np.nan, "float32"))]
        if started is not None:
            who["port"] = probe["server"]["port"]
            started.set()
        with dev.guard("the job"):
            if repeats:
                lib.time_evaluator("main", remote, number=repeats, repeat=1)(*args)
            lib["main"](*args)
            got = args[2].numpy()
        np.testing.assert_allclose(got, x * y + np.exp(x), rtol=1e-5, atol=1e-6)
        return {"port": probe["server"]["port"], "name": probe["server"]["name"]}


def test_jobs_reach_a_live_server_and_survive_losing_one(farm: dict, library: Path) -> None:
    profile = _profile(farm["tracker"].address)
    ports = {farm["cli_port"], farm["inproc"].port}
    first = _job(profile, library)
    assert first["port"] in ports

    # a long job (millions of kernel calls) in flight on whichever server the tracker picks
    started, outcome, who = threading.Event(), {}, {}

    def long_job() -> None:
        try:
            outcome["result"] = _job(profile, library, started, repeats=50_000_000, who=who)
        except Exception as err:  # what the user would see
            outcome["error"] = err

    worker = threading.Thread(target=long_job, daemon=True)
    worker.start()
    assert started.wait(600), "the long job never started"
    time.sleep(2.0)
    assert worker.is_alive(), outcome
    serving = who["port"]
    assert serving in ports
    if serving == farm["cli_port"]:
        os.killpg(farm["cli"].pid, signal.SIGINT)  # the user's Ctrl-C: a clean stop of the whole server
        assert farm["cli"].wait(timeout=60) == 0, "".join(farm["cli_lines"])
    else:
        farm["inproc"].stop()  # SIGKILL of its process group, as a crash would be
    worker.join(120)
    assert not worker.is_alive(), "the job in flight did not fail after its server died"
    err = outcome.get("error")
    assert isinstance(err, DeviceLostError), outcome
    assert "dropped during the job" in str(err) and "farm-pi" in str(err) and "rerun" in str(err)
    assert len(str(err).splitlines()) == 1

    survivor = (ports - {serving}).pop()
    deadline = time.monotonic() + 60  # the tracker drops the dead server when its connection closes
    while [p for _, p in servers_for_key(tracker_summary(farm["tracker"].address), KEY)] != [survivor]:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert _job(profile, library)["port"] == survivor

    # the CLI server stops cleanly on Ctrl-C (if it survived, stop it now) and says so
    if farm["cli"].poll() is None:
        os.killpg(farm["cli"].pid, signal.SIGINT)
        assert farm["cli"].wait(timeout=60) == 0
    time.sleep(0.5)
    text = "".join(farm["cli_lines"])
    assert "EMULATED" in text and "[emulate] stopped" in text and "Traceback" not in text
    with pytest.raises(ProcessLookupError):
        os.killpg(farm["cli"].pid, 0)  # no process of its group is left (server, session workers)
