"""The device agent (``edgeattn serve``): TVM's RPC server plus the probes the runtime needs.

Why: a report of a run on a Pi, a Jetson or a phone must carry the memory the
run really took *there*, not what the host planned.  The agent is TVM's own RPC
server (sessions, uploads, module loading, tracker registration are TVM's
code) with a few global functions registered in every session worker, so the
host calls them over the same RPC session that runs the model:

* ``edgeattn.agent.probe()`` -> JSON text: peak resident memory of the session
  process (``VmHWM``), current RSS, the machine's total/available memory, GPU
  memory in use (CUDA / OpenCL through TVM's device API, where it says), CPU
  frequencies and temperatures (sysfs, where readable), and which server this is.
* ``edgeattn.agent.reset_peak()`` -> the same JSON after resetting ``VmHWM`` to the
  current RSS (``/proc/self/clear_refs``, Linux >= 4.0), so a peak covers one run.

It needs only the TVM runtime and numpy: this file imports nothing else from
edgeattn, so on a device ``python3 agent.py`` (copied alone) works as well as
``python -m edgeattn.devices.agent`` or ``edgeattn serve``.  Set
``TVM_USE_RUNTIME_LIB=1`` there to load TVM's runtime library alone.

Security: TVM RPC has no authentication; anyone who reaches the port can
upload and run code.  The agent binds to 127.0.0.1 unless ``--host`` says
otherwise (reach it through an SSH tunnel, adb forward, or a trusted LAN).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import signal
import sys
import time

PROBE = "edgeattn.agent.probe"
RESET_PEAK = "edgeattn.agent.reset_peak"
ENV_INFO = "EDGEATTN_AGENT_INFO"  # JSON the server hands its session workers (they report it)
LOOPBACK = ("127.0.0.1", "localhost", "::1")


# ------------------------------------------------------------------ probes (run in the session worker)


def _status_kib(*fields: str) -> dict[str, int]:
    """Fields of /proc/self/status in KiB, read in one pass (VmHWM >= VmRSS holds within one read)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in fields:
                    out[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out


def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _cpu_freq_mhz() -> list[float]:
    paths = sorted(
        glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_cur_freq"),
        key=lambda p: int(p.split("/cpu")[2].split("/")[0]),
    )
    return [khz / 1000 for khz in (_read_int(p) for p in paths) if khz is not None]


def _temperatures_c() -> dict[str, float]:
    out: dict[str, float] = {}
    for zone in sorted(glob.glob("/sys/class/thermal/thermal_zone*")):
        milli = _read_int(zone + "/temp")
        if milli is None:
            continue
        try:
            with open(zone + "/type") as f:
                name = f.read().strip()
        except OSError:
            name = os.path.basename(zone)
        out[name if name not in out else os.path.basename(zone)] = milli / 1000
    return out


def _gpu_memory() -> dict[str, dict[str, int]]:
    """Total and available memory of the CUDA / OpenCL device 0, where TVM's device API reports it."""
    out: dict[str, dict[str, int]] = {}
    try:
        import tvm
    except ImportError:
        return out
    for kind in ("cuda", "opencl"):
        try:
            dev = tvm.device(kind, 0)
            if not dev.exist:
                continue
            entry = {"total": int(dev.total_global_memory)}
            try:
                avail = dev.available_global_memory
                if avail is not None:
                    entry["available"] = int(avail)
                    entry["used"] = entry["total"] - entry["available"]
            except Exception:  # not every backend answers "available"
                pass
            out[f"{kind}:0"] = entry
        except Exception:  # a runtime without that backend
            continue
    return out


def probe_dict() -> dict:
    """What the session process and its machine look like now (every value None/absent when unreadable)."""
    status = _status_kib("VmHWM", "VmRSS")
    hwm, rss = status.get("VmHWM"), status.get("VmRSS")
    mem = _meminfo()
    return {
        "pid": os.getpid(),
        "machine": platform.machine(),
        "tvm": getattr(sys.modules.get("tvm"), "__version__", None),
        "peak_rss": hwm * 1024 if hwm is not None else None,
        "rss": rss * 1024 if rss is not None else None,
        "mem_total": mem.get("MemTotal"),
        "mem_available": mem.get("MemAvailable"),
        "gpu_memory": _gpu_memory(),
        "cpu_freq_mhz": _cpu_freq_mhz(),
        "temperatures_c": _temperatures_c(),
        "server": json.loads(os.environ.get(ENV_INFO, "{}")),
        "time": time.time(),
    }


def reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _probe_json() -> str:
    return json.dumps(probe_dict())


def _reset_peak_json() -> str:
    ok = reset_peak()
    return json.dumps({**probe_dict(), "peak_reset": ok})


def register_probes() -> None:
    """Make the probes global TVM functions of this process (the RPC session worker looks them up)."""
    import tvm_ffi

    tvm_ffi.register_global_func(PROBE, _probe_json, override=True)
    tvm_ffi.register_global_func(RESET_PEAK, _reset_peak_json, override=True)


# A session worker started with "spawn" (--no-fork) imports this file as __mp_main__: register there too.
if __name__ == "__mp_main__":
    register_probes()


# ------------------------------------------------------------------ the server


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="edgeattn serve",
        description="TVM RPC server with edgeattn's probes (peak memory, GPU memory, CPU frequency, temperature).",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback: TVM RPC has no auth)")
    p.add_argument("--port", type=int, default=9090, help="first port to try (default 9090)")
    p.add_argument("--port-end", type=int, default=None, help="last port + 1 to try (default port + 10)")
    p.add_argument("--tracker", default=None, help="register with the TVM RPC tracker at HOST:PORT")
    p.add_argument("--key", default="", help="device key under which the tracker hands this server out")
    p.add_argument("--custom-addr", default=None, help="address the tracker tells clients (e.g. 127.0.0.1 for adb)")
    p.add_argument("--name", default=platform.node(), help="name reported by the probes (default: hostname)")
    p.add_argument("--no-fork", action="store_true", help="spawn session workers instead of forking (qemu-user)")
    p.add_argument("--quiet", action="store_true", help="log errors only")
    return p.parse_args(argv)


def _fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def _tracker_addr(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        _fail(f"--tracker {text!r} is not HOST:PORT (e.g. 127.0.0.1:9190)")
    return host, int(port)


def _stop_children() -> None:
    """End the session workers (multiprocessing children) so none outlives the server."""
    import multiprocessing

    for child in multiprocessing.active_children():
        child.kill()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tracker = _tracker_addr(args.tracker) if args.tracker else None
    if tracker and not args.key:
        _fail("--tracker needs --key NAME: the device key clients ask the tracker for (e.g. rpi5)")
    port_end = args.port_end or args.port + 10
    if not 0 < args.port < port_end <= 65536:
        _fail(f"--port {args.port} / --port-end {port_end} do not make a port range")

    if tracker:
        import socket

        try:
            socket.create_connection(tracker, timeout=5).close()
        except OSError as err:
            _fail(
                f"the tracker {args.tracker} does not answer ({err}); start one there with "
                "`python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port PORT` or fix --tracker"
            )

    import multiprocessing

    if args.no_fork:
        multiprocessing.set_start_method("spawn", force=True)
    try:
        from tvm.rpc.server import PopenRPCServerState
    except ImportError as err:
        _fail(f"TVM's runtime is not importable here ({err}): pip install apache-tvm numpy cloudpickle psutil")
    register_probes()
    info = {"name": args.name, "host": args.host, "key": args.key, "tracker": args.tracker, "pid": os.getpid()}
    os.environ[ENV_INFO] = json.dumps(info)  # before binding: workers inherit it; the port is added below
    if args.host not in LOOPBACK:
        print(
            f"[edgeattn serve] WARNING: binding to {args.host}: TVM RPC has no authentication, anyone who "
            "reaches this port can run code here. Use only on a trusted network.",
            file=sys.stderr,
            flush=True,
        )
    try:
        state = PopenRPCServerState(
            args.host, args.port, port_end, False, tracker, args.key, None, args.custom_addr, args.quiet
        )
    except (OSError, ValueError) as err:
        _fail(f"cannot serve on {args.host}:{args.port}..{port_end - 1}: {err}")
    info["port"] = state.port
    os.environ[ENV_INFO] = json.dumps(info)
    where = "loopback only (TVM RPC has no authentication)" if args.host in LOOPBACK else "the network"
    reg = f", registered with tracker {args.tracker} under key {args.key!r}" if tracker else ""
    print(f"[edgeattn serve] serving on {args.host}:{state.port}, {where}{reg}; probes: {PROBE}", flush=True)

    def stop(signum: int, _frame: object) -> None:
        _stop_children()
        os._exit(0)  # the listen thread blocks in accept(); nothing else holds state worth flushing

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while state.thread.is_alive():
        state.thread.join(1.0)
    _stop_children()
    return 1  # the listen loop only ends on an error it already logged


if __name__ == "__main__":
    raise SystemExit(main())
