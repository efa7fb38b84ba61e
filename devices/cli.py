"""``edgeattn devices ...`` and ``edgeattn serve``: parse, call devices/, print.

Registered by ``edgeattn/cli.py`` (``devices_app`` as ``edgeattn devices``,
``serve_command`` as ``edgeattn serve``).  Every user error is one ``error:``
line and exit code 2, with no traceback.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any

import typer

from edgeattn.errors import friendly_errors

from . import profiles as P

devices_app = typer.Typer(
    name="devices",
    help=(
        "Device profiles (kernel targets, memory budget, how to connect) and the emulated aarch64 device.\n\n"
        "Built-in profiles: host, Raspberry Pi 4/5, Jetson Orin Nano/AGX Orin, Android (Adreno, Mali), "
        f"emulated arm64. Your own live in {P.user_dir()} (`edgeattn devices add`)."
    ),
    no_args_is_help=True,
)
emulate_app = typer.Typer(help="Run an emulated device on this machine (qemu-user): a stand-in for a board.")
devices_app.add_typer(emulate_app, name="emulate")


_errors_as_lines = friendly_errors  # one 'error:' line per EdgeAttnError, as in every verb


# ------------------------------------------------------------------ list / show


@devices_app.command("list")
@_errors_as_lines
def list_command(
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each device's reachability check.")] = 1.0,
    no_check: Annotated[bool, typer.Option("--no-check", help="Do not check reachability.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Every device profile, with whether it can be reached now (checks run in parallel, TIMEOUT each)."""
    from .connect import reachability

    found = list(P.load_profiles().values())
    if no_check:
        status = ["-"] * len(found)
    else:
        with ThreadPoolExecutor(max_workers=max(1, len(found))) as pool:
            status = list(pool.map(lambda p: reachability(p, timeout), found))
    if as_json:
        rows = [{**p.to_dict(), "source": str(p.source), "reachable": s} for p, s in zip(found, status, strict=True)]
        typer.echo(json.dumps(rows, indent=2))
        return
    head = f"{'name':<18}{'family':<14}{'targets':<36}{'budget':>8}  {'connect':<46}reachable"
    typer.echo(head)
    typer.echo("-" * len(head))
    for p, s in zip(found, status, strict=True):
        budget = "auto" if p.memory_budget is None else P.format_size(p.memory_budget)
        mark = "" if p.builtin else " *"
        typer.echo(
            f"{p.name + mark:<18}{p.family:<14}{','.join(p.targets):<36}{budget:>8}  {p.connect.describe():<46}{s}"
        )
    if any(not p.builtin for p in found):
        typer.echo(f"* your profile ({P.user_dir()})")


@devices_app.command("show")
@_errors_as_lines
def show_command(
    name: Annotated[str, typer.Argument(help="Device profile name (see `edgeattn devices list`).")],
    probe: Annotated[
        bool, typer.Option("--probe", help="Connect and read the device agent's probes (memory, CPU MHz, temps).")
    ] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the device.")] = 5.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
) -> None:
    """One profile in full: kernel targets, cross compiler, memory budget, connection, reachability."""
    from edgeattn.kernels_tvm.targets import get_profile as get_target_profile

    from .connect import open_device, reachability

    p = P.get_profile(name)
    report: dict[str, Any] = {
        **p.to_dict(),
        "cross_compiler": p.linker(),
        "memory_budget_bytes": p.budget_bytes(),
        "source": str(p.source),
        "reachable": reachability(p, timeout),
        "target_descriptions": {t: get_target_profile(t).description for t in p.targets},
    }
    if probe:
        with open_device(p, timeout=timeout) as dev:
            report["probe"] = dev.probe() or "a plain TVM RPC server: no edgeattn probes (run `edgeattn serve`)"
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(f"{p.name}: {p.description}")
    emulated = "  (emulated: timings are not device performance)" if p.emulated else ""
    typer.echo(f"  family          {p.family}{emulated}")
    for i, t in enumerate(p.targets):
        role = "model target" if i == 0 else "also"
        typer.echo(f"  target          {t:<22}{role}: {report['target_descriptions'][t]}")
    typer.echo(f"  cross compiler  {report['cross_compiler']}")
    budget = "auto (MemAvailable now: " + P.format_size(report["memory_budget_bytes"]) + ")"
    typer.echo(f"  memory budget   {budget if p.memory_budget is None else P.format_size(p.memory_budget)}")
    limits = f"timeout {p.connect.timeout_s:g} s, {p.connect.retries} retries"
    typer.echo(f"  connect         {p.connect.describe()} ({limits})")
    typer.echo(f"  reachable       {report['reachable']}")
    typer.echo(f"  profile file    {p.source}")
    if p.notes:
        typer.echo(f"  notes           {p.notes}")
    if probe:
        typer.echo("  probe           " + json.dumps(report["probe"]))


# ------------------------------------------------------------------ add


@devices_app.command("add")
@_errors_as_lines
def add_command(
    name: Annotated[str, typer.Argument(help="Name of the new profile (lower-case letters, digits, . _ -).")],
    like: Annotated[
        str | None, typer.Option(help="Start from this profile (e.g. rpi5) and change only what you pass.")
    ] = None,
    target: Annotated[
        list[str] | None, typer.Option(help="Kernel target profile (repeat; first = the model's), e.g. arm-a76.")
    ] = None,
    memory_budget: Annotated[str | None, typer.Option(help="RAM a model may use there, e.g. 3GiB or 800MiB.")] = None,
    rpc: Annotated[str | None, typer.Option(help="Connect directly to a TVM RPC server at HOST:PORT.")] = None,
    tracker: Annotated[str | None, typer.Option(help="Connect through the TVM RPC tracker at HOST:PORT ...")] = None,
    key: Annotated[str | None, typer.Option(help="... asking it for a server of this device key.")] = None,
    adb: Annotated[
        str | None, typer.Option(help="Android over USB: 'forward' (direct RPC) or 'reverse' (phone -> tracker).")
    ] = None,
    serial: Annotated[str | None, typer.Option(help="adb serial, when several phones are attached.")] = None,
    device_port: Annotated[int, typer.Option(help="adb: the RPC server's port on the phone.")] = 9090,
    description: Annotated[str | None, typer.Option(help="One line describing the device.")] = None,
    family: Annotated[str | None, typer.Option(help=f"One of {', '.join(P.FAMILIES)}.")] = None,
    timeout: Annotated[float | None, typer.Option(help="Seconds to wait for the device before an error.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace your existing profile of that name.")] = False,
) -> None:
    """Write a device profile to your config directory (start from one with --like, change what you pass).

    Example: edgeattn devices add lab-pi --like rpi5 --tracker 10.0.0.2:9190 --key lab-pi --memory-budget 3GiB
    """
    base = P.get_profile(like).to_dict() if like else {"description": "", "family": "board"}
    base.pop("notes", None)  # they describe the original's budget and set-up, not this device's
    data: dict[str, Any] = {**base, "name": name}
    if target:
        data["targets"] = list(target)
    if memory_budget is not None:
        data["memory_budget"] = memory_budget
    if description is not None:
        data["description"] = description
    if family is not None:
        data["family"] = family
    chosen = [flag for flag, v in (("--rpc", rpc), ("--tracker", tracker), ("--adb", adb)) if v]
    if len(chosen) > 1 and not (adb == "reverse" and tracker):
        raise P.DeviceProfileError(f"pass one way to connect, not {' and '.join(chosen)}")
    conn: dict[str, Any] | None = None
    if rpc:
        host, port = P.parse_addr(rpc, "--rpc")
        conn = {"kind": "rpc", "host": host, "port": port}
    elif adb:
        conn = {"kind": "adb", "mode": adb, "device_port": device_port, "serial": serial}
        if adb == "reverse":
            conn |= {"tracker": tracker, "key": key or name}
    elif tracker:
        P.parse_addr(tracker, "--tracker")
        conn = {"kind": "tracker", "tracker": tracker, "key": key or name}
    elif key:
        conn = {**data.get("connect", {}), "key": key}
    if conn is not None:
        data["connect"] = {k: v for k, v in conn.items() if v is not None}
    if timeout is not None:
        data.setdefault("connect", {"kind": "local"})["timeout_s"] = timeout
    if "targets" not in data:
        raise P.DeviceProfileError("pass --target (e.g. --target arm-a76) or --like PROFILE")
    if "connect" not in data:
        raise P.DeviceProfileError("pass how to connect: --rpc HOST:PORT, --tracker HOST:PORT --key K, or --adb MODE")
    profile = P.profile_from_dict(data)
    path = P.save_profile(profile, overwrite=force)
    typer.echo(f"wrote {path}")
    typer.echo(
        f"{profile.name}: {','.join(profile.targets)}, budget {P.format_size(profile.memory_budget)}, "
        f"{profile.connect.describe()}"
    )


# ------------------------------------------------------------------ emulate arm64


@emulate_app.command("arm64")
@_errors_as_lines
def emulate_arm64_command(
    tracker: Annotated[
        str | None, typer.Option(help="Register with the TVM RPC tracker at HOST:PORT (e.g. 127.0.0.1:9190).")
    ] = None,
    key: Annotated[str, typer.Option(help="Device key to register under (with --tracker).")] = "rpi5-emulated",
    port: Annotated[int | None, typer.Option(help="Port to serve on (default: a free one).")] = None,
    start_timeout: Annotated[float, typer.Option(help="Seconds to wait for the server to come up.")] = 300.0,
) -> None:
    """Serve an emulated aarch64 device (Debian arm64 under qemu-user, TVM runtime + edgeattn's agent).

    Stays in the foreground until Ctrl-C (or SIGTERM), then stops the server and its session workers.
    Timings from it are EMULATED: they are never device performance. Set up once with
    `python -m edgeattn.devices.arm64_emulator_setup`.
    """
    from .emulated_arm64 import EmulatedArm64Device, EmulatorNotSetUpError
    from .errors import DeviceError
    from .tracker import tracker_summary

    if tracker:
        P.parse_addr(tracker, "--tracker")
        tracker_summary(tracker, timeout=5.0)  # a dead tracker is an error now, not after qemu started
    dev = EmulatedArm64Device(port=port, start_timeout=start_timeout, tracker=tracker, key=key, runtime_only=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    typer.echo("[emulate] starting the emulated aarch64 device (TVM's runtime under qemu: ~5-30 s) ...")
    try:
        dev.start()
    except EmulatorNotSetUpError as err:
        raise DeviceError(str(err)) from None
    except (RuntimeError, TimeoutError) as err:
        raise DeviceError(f"the emulated device did not start: {str(err).splitlines()[0]}") from None
    dev.release_session()  # free the server for its clients (it serves one session at a time)
    try:
        where = f"registered with tracker {tracker} under key {key!r}" if tracker else "direct RPC"
        typer.echo(f"[emulate] serving on 127.0.0.1:{dev.port} ({where}); pid {dev.pid}")
        typer.echo("[emulate] timings from this device are EMULATED (qemu), never device performance")
        typer.echo("[emulate] Ctrl-C stops it")
        while not stop.wait(0.5):
            if not dev.running():
                raise DeviceError(f"the emulated device stopped on its own; its log:\n{dev.log()[-2000:]}")
    finally:
        dev.stop()
    typer.echo("[emulate] stopped")


# ------------------------------------------------------------------ serve


def serve_command(
    host: Annotated[
        str, typer.Option(help="Address to bind. Default loopback: TVM RPC has NO authentication.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="First port to try.")] = 9090,
    port_end: Annotated[int | None, typer.Option(help="Last port + 1 to try (default PORT + 10).")] = None,
    tracker: Annotated[str | None, typer.Option(help="Register with the TVM RPC tracker at HOST:PORT.")] = None,
    key: Annotated[str | None, typer.Option(help="Device key clients ask the tracker for (e.g. rpi5).")] = None,
    custom_addr: Annotated[
        str | None, typer.Option(help="Address the tracker gives clients (127.0.0.1 behind adb reverse).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Name the probes report (default: hostname).")] = None,
    no_fork: Annotated[bool, typer.Option("--no-fork", help="Spawn session workers instead of forking.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="Log errors only.")] = False,
) -> None:
    """Device agent: a TVM RPC server with edgeattn's probes (peak RSS, memory, CPU MHz, temperature).

    Run it on the Pi or the Jetson: it needs only TVM's runtime and numpy there.

    `python -m edgeattn.devices.agent` (or devices/agent.py copied alone) is the same without typer.

    With --tracker and --key it registers with a TVM RPC tracker, which hands it to clients asking for the key.

    It binds to 127.0.0.1 unless --host says otherwise: TVM RPC has no authentication.
    """
    if tracker is not None:
        try:
            P.parse_addr(tracker, "--tracker")
        except P.DeviceProfileError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None
        if not key:
            typer.echo("error: --tracker needs --key NAME (the device key clients ask for, e.g. rpi5)", err=True)
            raise typer.Exit(2)
    argv = [sys.executable, "-m", "edgeattn.devices.agent", "--host", host, "--port", str(port)]
    for flag, value in (("--port-end", port_end), ("--tracker", tracker), ("--key", key)):
        if value is not None:
            argv += [flag, str(value)]
    for flag, value in (("--custom-addr", custom_addr), ("--name", name)):
        if value is not None:
            argv += [flag, value]
    argv += ["--no-fork"] * no_fork + ["--quiet"] * quiet
    sys.stdout.flush()
    sys.stderr.flush()
    # the agent is its own program (it imports only tvm and numpy): the session workers it spawns
    # import it as their main module, which is how its probes get registered in them
    os.execv(sys.executable, argv)


__all__ = ["devices_app", "serve_command"]
