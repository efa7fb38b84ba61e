"""Device profiles as data, `edgeattn devices list|show|add`, and target resolution in one place.

No device is needed: reachability is checked against real sockets on loopback
(a closed port, a port where nothing speaks TVM's protocol).
"""

from __future__ import annotations

import json
import shutil
import socket
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgeattn.cli import app
from edgeattn.devices import profiles as P
from edgeattn.kernels_tvm import targets as T

runner = CliRunner()


@pytest.fixture(autouse=True)
def user_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets an empty user profile directory (never the real ~/.config)."""
    folder = tmp_path / "user-devices"
    monkeypatch.setenv(P.ENV_USER_DIR, str(folder))
    return folder


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(*args: str):
    return runner.invoke(app, list(args))


def _one_error_line(res) -> str:
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert "Traceback" not in res.output
    return lines[0]


# ------------------------------------------------------------------ the built-in profiles


def test_builtin_profiles_cover_the_device_families() -> None:
    found = P.load_profiles()
    for name in ("host", "rpi4", "rpi5", "jetson-orin-nano", "jetson-agx-orin", "android-adreno", "android-mali"):
        assert name in found and found[name].builtin, name
    assert found["rpi4"].target == "arm-a72" and found["rpi5"].target == "arm-a76"
    for jetson in ("jetson-orin-nano", "jetson-agx-orin"):
        assert found[jetson].targets == ("cuda-sm87", "arm-a78ae")
        assert T.get_profile(found[jetson].target).nvcc_arch == "sm_87"
    assert found["android-adreno"].target == "opencl-adreno"
    assert found["android-mali"].target == "opencl-mali-android"
    for phone in ("android-adreno", "android-mali"):
        assert found[phone].linker() == "ndk" and found[phone].connect.kind == "adb"
        assert "arm64-android" in found[phone].targets
    assert found["host"].memory_budget is None and found["host"].budget_bytes() > 0
    assert found["rpi4"].linker() == "aarch64-linux-gnu-gcc"


def test_every_profile_names_real_targets_a_budget_and_a_connection() -> None:
    for p in P.load_profiles().values():
        for t in p.targets:
            T.get_profile(t)  # raises for an unknown target
        assert p.budget_bytes() > 0
        assert p.connect.kind in P.CONNECT_KINDS
        assert P.profile_from_dict(p.to_dict()) == p  # what is shown reads back the same


def test_sizes_and_addresses() -> None:
    assert P.parse_size("3GiB") == 3 * 2**30
    assert P.parse_size("800MiB") == 800 * 2**20
    assert P.parse_size("1.5G") == int(1.5 * 2**30)
    assert P.format_size(6 * 2**30) == "6 GiB" and P.format_size(1536 * 2**20) == "1.5 GiB"
    assert P.parse_addr("10.0.0.2:9190") == ("10.0.0.2", 9190)
    with pytest.raises(P.DeviceProfileError, match="HOST:PORT"):
        P.parse_addr("10.0.0.2")


@pytest.mark.parametrize(
    "change,message",
    [
        ({"targets": ["arm-a53"]}, "unknown kernel target 'arm-a53'"),
        ({"memory_budget": "lots"}, "memory_budget"),
        ({"connect": {"kind": "tracker", "key": "k"}}, "tracker (HOST:PORT) and key"),
        ({"connect": {"kind": "pigeon"}}, "connect.kind"),
        ({"memory_budget": "auto"}, "auto"),
        ({"name": "Bad Name"}, "lower-case"),
        ({"colour": "red"}, "unknown field"),
    ],
)
def test_malformed_profiles_say_what_is_wrong(change: dict, message: str) -> None:
    data = {**P.get_profile("rpi5").to_dict(), **change}
    with pytest.raises(P.DeviceProfileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        P.profile_from_dict(data)


# ------------------------------------------------------------------ target resolution in one place


def test_registry_resolves_targets_through_targets_py() -> None:
    from edgeattn.kernels_tvm import registry

    assert registry.resolve_target is T.resolve_target and registry.host_target is T.host_target
    assert str(T.resolve_target("arm-a76").attrs["mcpu"]) == "cortex-a76"
    assert str(T.resolve_target("arm-a72").attrs["mcpu"]) == "cortex-a72"
    assert str(T.resolve_target(None)) == str(T.host_target()) == str(T.resolve_target("llvm"))
    assert T.resolve_target("cuda").kind.name == "cuda"
    assert str(T.resolve_target("cuda-sm87").attrs["arch"]) == "sm_87"
    target = T.resolve_target("arm64")
    assert T.resolve_target(target) is target
    with pytest.raises(T.UnknownTargetError, match="arm-a72"):
        T.resolve_target("no-such-board")


# ------------------------------------------------------------------ the CLI


def test_list_shows_every_profile_and_reachability_fast(user_dir: Path) -> None:
    port = _closed_port()
    user_dir.mkdir(parents=True)
    dead = {
        **P.get_profile("rpi5").to_dict(),
        "name": "dead-pi",
        "connect": {"kind": "rpc", "host": "127.0.0.1", "port": port},
    }
    (user_dir / "dead-pi.json").write_text(json.dumps(dead))
    t0 = time.monotonic()
    res = _run("devices", "list", "--timeout", "1", "--json")
    elapsed = time.monotonic() - t0
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.output)}
    assert {"host", "rpi4", "rpi5", "jetson-orin-nano", "android-mali", "dead-pi"} <= set(rows)
    assert rows["host"]["reachable"] == "local"
    assert rows["dead-pi"]["reachable"].startswith("down")
    assert rows["rpi5"]["reachable"] in ("tracker down",) or "server" in rows["rpi5"]["reachable"]
    assert elapsed < 8, f"list took {elapsed:.1f} s"
    table = _run("devices", "list", "--no-check").output
    assert "dead-pi *" in table and "rpi4" in table


def test_show_prints_targets_compiler_budget_and_connection() -> None:
    res = _run("devices", "show", "jetson-orin-nano", "--timeout", "0.5")
    assert res.exit_code == 0, res.output
    for text in ("cuda-sm87", "arm-a78ae", "aarch64-linux-gnu-gcc", "6 GiB", "tracker 127.0.0.1:9190"):
        assert text in res.output, text


def test_add_writes_a_profile_that_list_and_show_read(user_dir: Path) -> None:
    res = _run("devices", "add", "lab-pi", "--like", "rpi4", "--tracker", "10.1.2.3:9190", "--memory-budget", "1536MiB")
    assert res.exit_code == 0, res.output
    written = json.loads((user_dir / "lab-pi.json").read_text())
    assert written["targets"] == ["arm-a72"] and written["memory_budget"] == "1.5GiB"
    assert written["connect"] == {"kind": "tracker", "tracker": "10.1.2.3:9190", "key": "lab-pi"}
    assert sorted(f.name for f in user_dir.iterdir()) == ["lab-pi.json"]  # temp file renamed, nothing left
    assert "notes" not in written  # the notes of rpi4's 4 GB budget do not carry over
    p = P.get_profile("lab-pi")
    assert p.memory_budget == 1536 * 2**20 and not p.builtin
    again = _run("devices", "add", "lab-pi", "--like", "rpi4", "--tracker", "10.1.2.3:9190")
    assert "--force" in _one_error_line(again)
    res = _run("devices", "add", "phone", "--like", "android-mali", "--adb", "forward", "--device-port", "5001")
    assert res.exit_code == 0, res.output
    assert P.get_profile("phone").connect.local_port == 5001


@pytest.mark.parametrize(
    "args,needle",
    [
        (["devices", "show", "no-such-device"], "unknown device 'no-such-device'"),
        (["devices", "add", "x", "--target", "arm-a53", "--rpc", "1.2.3.4:9090"], "unknown kernel target"),
        (["devices", "add", "x", "--like", "rpi5", "--memory-budget", "lots"], "memory_budget"),
        (["devices", "add", "x", "--like", "rpi5", "--rpc", "nohost"], "HOST:PORT"),
        (["devices", "add", "x", "--target", "arm64"], "how to connect"),
        (["devices", "emulate", "arm64", "--tracker", "127.0.0.1:1"], "does not answer"),
    ],
)
def test_bad_input_is_one_error_line(args: list[str], needle: str) -> None:
    assert needle in _one_error_line(_run(*args))


def test_a_broken_user_profile_is_named(user_dir: Path) -> None:
    user_dir.mkdir(parents=True)
    (user_dir / "broken.json").write_text("{not json")
    line = _one_error_line(_run("devices", "list", "--no-check"))
    assert "broken.json" in line


def test_tracker_wire_constants_match_tvm() -> None:
    from tvm.rpc import base

    from edgeattn.devices import agent, connect, tracker

    assert tracker.TRACKER_MAGIC == base.RPC_TRACKER_MAGIC
    assert (tracker.SUCCESS, tracker.REQUEST, tracker.SUMMARY) == (
        base.TrackerCode.SUCCESS,
        base.TrackerCode.REQUEST,
        base.TrackerCode.SUMMARY,
    )
    assert (connect.PROBE, connect.RESET_PEAK) == (agent.PROBE, agent.RESET_PEAK)


@pytest.mark.skipif(shutil.which("adb") is not None, reason="adb is installed: this checks the message without it")
def test_android_without_adb_names_the_fix() -> None:
    from edgeattn.devices.connect import open_device, reachability
    from edgeattn.devices.errors import DeviceError

    phone = P.get_profile("android-adreno")
    assert reachability(phone) == "adb not installed"
    with pytest.raises(DeviceError, match="adb is not on PATH.*platform-tools"):
        open_device(phone)
