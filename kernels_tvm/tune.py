"""Schedule tuning for the CPU attention kernels, with records kept per target in the repo.

    python -m edgeattn.kernels_tvm.tune --target x86-host                 # dense + sparse, L = 8192
    python -m edgeattn.kernels_tvm.tune --target x86-host --op dense --length 16384 --trials 20
    python -m edgeattn.kernels_tvm.tune --target arm-a76 --rpc 192.168.1.20:9090   # timed on the device over RPC

What is searched: the knobs of :class:`cpu.CpuSchedule` (query tile ``qt``, key tile ``kt``, the
two register tiles (jb x rb) and (ri x db) limited to what fits the target's vector registers,
parallel lanes ``par``, K/V prefetch), by coordinate descent from the hand-picked default: one
knob group at a time, every option of that group tried with the others held at the best so far,
until ``--trials`` candidates were measured or a whole pass found nothing better.  MetaSchedule
does not apply: these kernels are hand-written TIR loop nests without schedulable blocks (its
design-space generator has nothing to act on; see KERNELS.md, "Tuning").

Every candidate is compiled, checked against the PyTorch reference (``edgeattn.dhsa``, float64)
on a short odd length (wrong ones are rejected, never timed), then timed with TVM's
``time_evaluator`` (one untimed warm-up, median of ``--repeats``).  The default is timed before
and after the search: the difference is the run-to-run noise, and the best candidate (re-timed
at the end, next to the default) is kept only if it beats the faster default time by more than
that noise; otherwise the record says "default is best here".

Records (tuning_records.py reads and writes them): ``kernels_tvm/tuning/<target profile>.json``
(``$EDGEATTN_TUNING_DIR`` overrides the folder), one record per (op, Hq, Hkv, D, dtype, decode),
written atomically.  ``cpu.schedule_for`` applies a record when the target maps to that profile
and, for ``x86-host``, when the record was measured on this CPU model with the same LLVM
``mcpu``; otherwise the defaults (a debug log line on logger ``edgeattn.kernels_tvm.tune`` says
which and why).  A corrupt or foreign record file raises
:class:`tuning_records.TuningRecordError` naming the file and the fix (never a silent fallback:
a record file in the repo that cannot be read is a bug to fix, not a reason to run slower
unnoticed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from edgeattn.config import DEFAULT_BUDGET, DEFAULT_CHUNK_SIZE, DEFAULT_SINKS

from . import cpu, registry
from .abi import OP_DENSE, OP_SELECT, OP_SPARSE, SYMBOL, KernelSpec
from .schedule import CpuSchedule
from .targets import get_profile
from .tuning_records import (
    CPU_PROFILES,
    SHAPE_FIELDS,
    TUNED_OPS,
    load_records,
    record_path,
    schedule_problem,
    target_mcpu,
    write_records,
)

log = logging.getLogger(__name__)

OP_NAMES = {"dense": OP_DENSE, "sparse": OP_SPARSE}
# DHSA settings the sparse kernel is timed with: the defaults (budget 2048, chunks of 16, 4 sinks)
BUDGET, CHUNK, SINKS = DEFAULT_BUDGET, DEFAULT_CHUNK_SIZE, DEFAULT_SINKS


# ------------------------------------------------------------------ the search space


def vector_registers(lanes: int, target: Any) -> int:
    """Architectural vector registers: AVX-512 and NEON 32, AVX2/SSE 16."""
    triple = str(target.attrs.get("mtriple", ""))
    return 32 if lanes >= 16 or triple.startswith(("aarch64", "arm")) else 16


def _tiles(lanes: int, nregs: int, counts: tuple[int, ...], width_max: int) -> list[tuple[int, int]]:
    """(count, width) register tiles: count x (width/lanes) accumulators + one row of operands fit."""
    out = []
    for n in counts:
        for nv in range(1, width_max + 1):
            if n * nv + nv + 1 <= nregs:
                out.append((n, nv * lanes))
    return out


def knob_groups(spec: KernelSpec, base: CpuSchedule, target: Any) -> list[tuple[str, list[dict[str, Any]]]]:
    """The knob groups of the coordinate descent, each a list of knob settings (dicts of changes)."""
    vl = base.lanes
    nregs = vector_registers(vl, target)
    if spec.op == OP_DENSE:
        qts = [q for q in (16, 24, 32, 48, 64) if q % vl == 0]
    else:  # a query chunk (32 tokens by default) is one tile or two
        qts = [q for q in (8, 16, 32) if q % vl == 0]
    return [
        ("qt", [{"qt": q} for q in qts]),
        ("S tile jb x rb", [{"jb": j, "rb": r} for j, r in _tiles(vl, nregs, (2, 4, 5, 6, 8), 4)]),
        ("PV tile ri x db", [{"ri": i, "db": d} for i, d in _tiles(vl, nregs, (2, 3, 4, 6, 8), 4)]),
        ("kt", [{"kt": k} for k in (16, 32, 40, 48, 64)]),
        ("par", [{"par": p} for p in (16, 32, 64, 128)]),
        ("prefetch", [{"prefetch": p} for p in (True, False)]),
        ("tails", [{"jb_tail": j, "db_tail": d} for j in (4, 8) for d in (vl, 2 * vl, 4 * vl)]),
    ]


def candidates(spec: KernelSpec, best: Callable[[], CpuSchedule], target: Any) -> Iterator[tuple[str, CpuSchedule]]:
    """Coordinate descent: each group's options around the best schedule so far (read when reached)."""
    for name, options in knob_groups(spec, best(), target):
        for change in options:
            sch = replace(best(), **change)
            if schedule_problem(spec, sch) is None:
                yield name, sch


# ------------------------------------------------------------------ running a candidate


@dataclass
class Problem:
    """Inputs for one op: a short odd-length check against the reference, and the timing inputs."""

    spec: KernelSpec
    check_args: list[Any]
    check_ref: Any
    time_args: list[Any]
    out_index: int = -1


def _selection(spec: KernelSpec, q, k, budget: int, chunk: int):
    """(boundaries, sel, nsel) from the registry's selection kernel (tested bit-identical to the reference)."""
    import numpy as np
    import torch

    from edgeattn import dhsa

    length = k.shape[1]
    bnd = dhsa.fixed_boundaries(length, chunk).to(torch.int32)
    nc = len(bnd) - 1
    m = registry.selection_width(bnd.numpy(), budget, spec.sinks)
    dims = dict(heads_q=spec.heads_q, heads_kv=spec.heads_kv, head_dim=spec.head_dim)
    sel_k = registry.get_kernel(OP_SELECT, budget=budget, sinks=spec.sinks, **dims)
    bt = registry.empty(bnd.shape, "int32").copy_(bnd)
    sel, nsel = registry.empty((spec.heads_kv, nc, m), "int32"), registry.empty((spec.heads_kv, nc), "int32")
    sel_k(q, k, bt, sel, nsel)
    if (nsel.numpy() < 0).any():  # pragma: no cover - max_selected guarantees the width
        raise RuntimeError("selection overflowed its width")
    return [bt, sel, nsel], np.asarray(bnd)


def make_problem(spec: KernelSpec, length: int, check_length: int = 333, seed: int = 0) -> Problem:
    """Random q/k/v (seeded); the reference output at ``check_length``; timing inputs at ``length``."""
    import torch

    from edgeattn import dhsa
    from edgeattn.config import AttentionConfig

    gen = torch.Generator().manual_seed(seed)
    tdt = getattr(torch, spec.dtype)

    def qkv(n):
        shapes = [(spec.heads_q, n, spec.head_dim)] + [(spec.heads_kv, n, spec.head_dim)] * 2
        return [torch.randn(s, generator=gen).to(tdt) for s in shapes]

    def args_for(n, budget):
        q, k, v = qkv(n)
        out = registry.empty((spec.heads_q, n, spec.head_dim), spec.dtype)
        if spec.op == OP_DENSE:
            return [q, k, v, out], None
        sel_args, bnd = _selection(spec, q, k, budget, CHUNK)
        return [q, k, v, *sel_args, out], bnd

    # the check keeps few chunks (budget 3 chunks + sinks) so that the sparse paths really run
    check_budget = 3 * CHUNK + spec.sinks
    check_args, bnd = args_for(check_length, check_budget)
    q, k, v = (x[None].double() for x in check_args[:3])
    attrs = dict(scaling=spec.scaling, softcap=spec.softcap, window=spec.window)
    if spec.op == OP_DENSE:
        ref = dhsa.attention(q, k, v, AttentionConfig(kind="dense"), **attrs)[0]
    else:
        # the paper's selection, as _selection's kernel makes it (the window would pin other chunks)
        cfg = AttentionConfig(kind="dhsa", budget=check_budget, chunk_size=CHUNK, sinks=spec.sinks, observe=0)
        ref = dhsa.attention(q, k, v, cfg, boundaries=torch.from_numpy(bnd), **attrs)[0]
    time_args, _ = args_for(length, BUDGET)
    return Problem(spec=spec, check_args=check_args, check_ref=ref, time_args=time_args)


class Runner:
    """Compiles a schedule and runs it here, or on a TVM RPC server (``rpc="host:port"``)."""

    def __init__(self, target: Any, rpc: str | None = None, fcompile: Any = None, session: Any = None) -> None:
        """``rpc="host:port"`` connects to a server; ``session`` reuses an open ``tvm.rpc`` session instead."""
        import tvm

        self.target, self.rpc, self.fcompile = target, rpc, fcompile
        self._uploads = 0
        if session is not None:
            self.session, self.dev = session, session.cpu(0)
        elif rpc:
            from tvm import rpc as tvm_rpc

            host, _, port = rpc.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"--rpc wants HOST:PORT of a running `python -m tvm.exec.rpc_server`, got {rpc!r}")
            try:
                self.session = tvm_rpc.connect(host, int(port))
            except Exception as exc:  # TVMError: connection refused, wrong protocol, ...
                raise ConnectionError(
                    f"no TVM RPC server answers at {rpc}: start `python -m tvm.exec.rpc_server --host 0.0.0.0 "
                    f"--port {port}` on the device (a server started with --no-fork serves one session at a time, "
                    f"so close other clients) [{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}]"
                ) from exc
            self.dev = self.session.cpu(0)
        else:
            self.session, self.dev = None, tvm.cpu(0)

    def load(self, spec: KernelSpec, sch: CpuSchedule) -> Any:
        from tvm.support import utils

        lib = registry.compile_module(cpu.build(spec, self.target, sch), self.target)
        if self.session is None:
            return lib.mod  # the runtime Module (time_evaluator lives there)
        # a fresh file name per candidate: re-uploading over a library the server has already
        # loaded (dlopen keeps it mapped) crashes the server's session process
        self._uploads += 1
        name = f"edgeattn_candidate_{os.getpid()}_{self._uploads}.so"
        tmp = utils.tempdir()
        path = tmp.relpath(name)
        lib.export_library(path, fcompile=self.fcompile)
        self.session.upload(path)
        return self.session.load_module(name)

    def tensors(self, args: list[Any]) -> list[Any]:
        import numpy as np
        import tvm

        if self.session is None:
            return [registry.as_tvm(a) for a in args]
        return [tvm.runtime.tensor(np.asarray(a.numpy() if hasattr(a, "numpy") else a), self.dev) for a in args]

    def check(self, lib: Any, spec: KernelSpec, problem: Problem, tol: float) -> float:
        """Max relative error of the candidate's output against the reference (NaN-poisoned output first)."""
        import numpy as np

        args = list(problem.check_args)
        args[-1] = args[-1].fill_(float("nan"))
        tv = self.tensors(args)
        lib[SYMBOL[spec.op]](*tv)
        out = tv[-1].numpy().astype(np.float64)
        ref = problem.check_ref.numpy()
        err = float(np.abs(out - ref).max() / np.abs(ref).max())
        return err if np.isfinite(err) else float("inf")

    def time(self, lib: Any, spec: KernelSpec, args: list[Any], repeats: int) -> float:
        """Median of ``repeats`` timed calls after one untimed warm-up (time_evaluator)."""
        fn = lib[SYMBOL[spec.op]]
        fn(*args)
        timer = lib.time_evaluator(SYMBOL[spec.op], self.dev, number=1, repeat=repeats)
        return float(statistics.median(timer(*args).results))


# ------------------------------------------------------------------ the tuner


@dataclass
class Trial:
    group: str
    schedule: CpuSchedule
    status: str  # "ok" | "wrong" | "failed"
    time_s: float | None = None
    rel_err: float | None = None
    error: str = ""


@dataclass
class TuneResult:
    record: dict[str, Any]
    trials: list[Trial] = field(default_factory=list)


def tune_op(
    spec: KernelSpec,
    target: Any,
    *,
    length: int,
    trials: int,
    repeats: int = 3,
    runner: Runner | None = None,
    tol: float | None = None,
    progress: Callable[[str], None] = print,
    device: dict[str, Any] | None = None,
) -> TuneResult:
    """Search the schedule of ``spec`` on ``target``; return the record (tuned or "default is best")."""
    import tvm

    runner = runner or Runner(target)
    tol = tol if tol is not None else (1e-4 if spec.dtype == "float32" else 2e-3)
    libs: dict[CpuSchedule, Any] = {}  # the default's and the best's compiled modules
    default = cpu.default_schedule(spec, target)
    problem = make_problem(spec, length)
    targs = runner.tensors(problem.time_args)
    tried: list[Trial] = []
    seen: set[CpuSchedule] = set()
    best: list[tuple[float, CpuSchedule, Any]] = []  # [(time, schedule, lib)]

    def evaluate(group: str, sch: CpuSchedule) -> Trial:
        seen.add(sch)
        try:
            lib = runner.load(spec, sch)
            err = runner.check(lib, spec, problem, tol)
        except Exception as exc:  # a knob combination TVM or LLVM rejects: skip it, say so
            trial = Trial(group, sch, "failed", error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        else:
            if err > tol:
                trial = Trial(group, sch, "wrong", rel_err=err)
            else:
                t = runner.time(lib, spec, targs, repeats)
                trial = Trial(group, sch, "ok", time_s=t, rel_err=err)
                if sch == default:
                    libs[sch] = lib
                if not best or t < best[0][0]:
                    best[:] = [(t, sch, lib)]
        tried.append(trial)
        return trial

    name = f"{spec.op} Hq={spec.heads_q} Hkv={spec.heads_kv} D={spec.head_dim} {spec.dtype} L={length}"
    progress(f"{name}: default {_knobs_text(default)}")
    first = evaluate("default", default)
    if first.status != "ok":
        raise RuntimeError(f"the default schedule failed its check ({first.status} {first.error or first.rel_err})")
    d1 = first.time_s
    progress(f"  default: {1e3 * d1:.4g} ms")
    n = 0
    improved = True
    while improved and n < trials:
        improved = False
        before = best[0][0]
        for group, sch in candidates(spec, lambda: best[0][1], target):
            if n >= trials:
                break
            if sch in seen:
                continue
            n += 1
            t = evaluate(group, sch)
            shown = (
                f"{1e3 * t.time_s:.4g} ms"
                if t.status == "ok"
                else f"{t.status} {t.error or f'rel err {t.rel_err:.1e}'}"
            )
            progress(f"  [{n}/{trials}] {group}: {_knobs_text(sch)} -> {shown} (best {1e3 * best[0][0]:.4g} ms)")
        improved = best[0][0] < before
    # re-time the winner next to the default: the same moment, fresh measurements
    best_s, best_sch, best_lib = best[0]
    d2 = runner.time(libs[default], spec, targs, repeats)
    b2 = runner.time(best_lib, spec, targs, repeats) if best_sch != default else d2
    noise = abs(d1 - d2) / min(d1, d2)
    gain = min(d1, d2) / b2 - 1
    choice = "tuned" if best_sch != default and gain > noise else "default"
    progress(
        f"  default {1e3 * d1:.4g} / {1e3 * d2:.4g} ms (noise {100 * noise:.1f} %), best {1e3 * b2:.4g} ms "
        f"(gain {100 * gain:+.1f} %): keep {choice}"
    )
    from edgeattn.runtime.measure import cpu_model

    dev = device or {"cpu_model": cpu_model(), "threads": _threads()}
    record = {
        **{"op": spec.op, "shape": {f: getattr(spec, f) for f in SHAPE_FIELDS}},
        "choice": choice,
        "schedule": asdict(best_sch if choice == "tuned" else default),
        "default_schedule": asdict(default),
        "best_candidate": asdict(best_sch),
        "time_s": {"default": [d1, d2], "best_in_search": best_s, "best_retimed": b2},
        "gain": gain,
        "noise": noise,
        "length": length,
        "repeats": repeats,
        "candidates": n,
        "rejected_wrong": sum(t.status == "wrong" for t in tried),
        "failed": sum(t.status == "failed" for t in tried),
        **dev,
        "mcpu": target_mcpu(target),
        "tvm_version": tvm.__version__,
        "date": datetime.date.today().isoformat(),
    }
    return TuneResult(record=record, trials=tried)


def _knobs_text(s: CpuSchedule) -> str:
    return (
        f"qt={s.qt} kt={s.kt} S {s.jb}x{s.rb} PV {s.ri}x{s.db} par={s.par} pf={int(s.prefetch)} "
        f"tails {s.jb_tail}/{s.db_tail}"
    )


def _threads() -> int:
    import tvm

    fn = tvm.get_global_func("runtime.NumThreads", allow_missing=True)
    return int(fn()) if fn is not None else int(os.environ.get("TVM_NUM_THREADS", os.cpu_count() or 1))


# ------------------------------------------------------------------ command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m edgeattn.kernels_tvm.tune",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--target", required=True, choices=CPU_PROFILES, help="CPU target profile the records are for")
    p.add_argument("--op", default="all", choices=("dense", "sparse", "all"), help="which attention kernel")
    p.add_argument("--length", type=int, default=8192, help="sequence length the candidates are timed at")
    p.add_argument("--trials", type=int, default=30, help="most candidates measured per op (besides the default)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per candidate (the median counts)")
    p.add_argument("--threads", type=int, default=2, help="TVM threads for a local run (TVM_NUM_THREADS)")
    p.add_argument("--heads-q", type=int, default=4, help="query heads (default: Gemma 3 270M's global layer)")
    p.add_argument("--heads-kv", type=int, default=1)
    p.add_argument("--head-dim", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    p.add_argument("--rpc", metavar="HOST:PORT", help="time on a device running `python -m tvm.exec.rpc_server`")
    p.add_argument("--device-name", help="CPU model to record for an --rpc device (default: 'rpc HOST:PORT')")
    p.add_argument("--out", metavar="PATH", help="record file (default: kernels_tvm/tuning/<target>.json)")
    p.add_argument("--dry-run", action="store_true", help="tune and print, write nothing")
    args = p.parse_args(argv)
    if args.length < 64 or args.trials < 0 or args.repeats < 1:
        p.error("need --length >= 64, --trials >= 0, --repeats >= 1")
    if args.target != "x86-host" and not args.rpc:
        p.error(
            f"{args.target} records must be measured on the device itself (timings here or under the qemu "
            "emulator mean nothing): start `python -m tvm.exec.rpc_server --host 0.0.0.0 --port 9090` on it "
            "and pass --rpc HOST:9090"
        )
    if args.target == "x86-host" and args.rpc:
        p.error("x86-host is this machine's CPU: tune it locally, without --rpc")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read when TVM's thread pool starts

    from edgeattn.runtime.measure import cpu_model

    profile = get_profile(args.target)
    target = registry.host_target() if args.target == "x86-host" else profile.target()
    out = Path(args.out) if args.out else record_path(args.target)
    if out.exists():
        load_records(out)  # a corrupt file stops us before minutes of tuning, not after
    if args.rpc:
        device = {"cpu_model": args.device_name or f"rpc {args.rpc}", "threads": None}
    else:
        device = {"cpu_model": cpu_model(), "threads": args.threads}
    try:
        runner = Runner(target, rpc=args.rpc, fcompile=profile.fcompile() if args.rpc else None)
    except ConnectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"tuning for {args.target} ({target}) on {device['cpu_model']}, threads {device['threads']}", flush=True)
    ops = TUNED_OPS if args.op == "all" else (OP_NAMES[args.op],)
    records = []
    for op in ops:
        tile = {"query_tile": CHUNK} if op == OP_SPARSE else {}  # a query chunk is the sparse kernel's tile
        spec = KernelSpec(
            op=op,
            heads_q=args.heads_q,
            heads_kv=args.heads_kv,
            head_dim=args.head_dim,
            dtype=args.dtype,
            sinks=SINKS,
            **tile,
        )
        t0 = time.perf_counter()
        res = tune_op(
            spec,
            target,
            length=args.length,
            trials=args.trials,
            repeats=args.repeats,
            runner=runner,
            progress=lambda s: print(s, flush=True),
            device=device,
        )
        res.record["command"] = " ".join(["python -m edgeattn.kernels_tvm.tune", *(argv or sys.argv[1:])])
        res.record["tuning_s"] = round(time.perf_counter() - t0, 1)
        records.append(res.record)
    if args.dry_run:
        print(json.dumps(records, indent=1))
        return 0
    write_records(out, args.target, records)
    print(f"wrote {len(records)} record(s) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
