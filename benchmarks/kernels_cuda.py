"""TVM's CUDA kernels on a real GPU: numerics against the PyTorch reference, then timings against SDPA.

Two steps, because the GPU machine need not have TVM's compiler (an edge device never does):

    # 1. here (TVM compiler + nvcc, no GPU needed): compile every kernel this script runs
    python benchmarks/kernels_cuda.py bundle --target cuda-sm90 --out out/cuda-sm90
    # 2. on the GPU machine (TVM runtime + torch with CUDA; TVM_USE_RUNTIME_LIB=1 is enough)
    python benchmarks/kernels_cuda.py run --bundle out/cuda-sm90 --json out/cuda.json

``run`` first checks every kernel (select, sparse, dense; prefill and decode; GQA 1/2/4/8;
fp32 and fp16; variable chunks with offset keys; softcap and window; budget >= L) on fresh
random inputs against :mod:`edgeattn.dhsa`, outputs poisoned before each run: relative
error <= 1e-4 (fp32) / 1e-3 (fp16), selection exact.  Then it times, for the default
model's attention shape (4 query heads, 1 KV head, head_dim 256, budget 2048, chunks of
32, 4 sinks): TVM DHSA (selection + sparse attention), TVM dense flash attention and
PyTorch SDPA (causal, same dtype) at each length, prefill and one-query decode, with
``time_evaluator`` / CUDA events, medians.  Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import median  # noqa: E402

HQ, HKV, D = 4, 1, 256
CHUNK, SINKS, BUDGET = 32, 4, 2048
TOL = {"float32": 1e-4, "float16": 1e-3}


def check_cases() -> list[tuple[str, dict[str, Any], list[tuple[str, bool, str]]]]:
    """(name, make_case kwargs, [(op, decode kernel, reference)]) for every numerics check."""
    from edgeattn.kernels_tvm.abi import OP_DENSE, OP_SELECT, OP_SPARSE

    prefill = [(OP_SELECT, False, "sel"), (OP_SPARSE, False, "ref_sparse"), (OP_DENSE, False, "ref_dense")]
    decode = [(OP_SPARSE, False, "ref_sparse"), (OP_SPARSE, True, "ref_sparse"), (OP_DENSE, True, "ref_dense")]
    cases = []
    for dtype in ("float32", "float16"):
        for g in (1, 2, 4, 8):
            common = dict(heads_q=2 * g, heads_kv=2, head_dim=64, k_len=203, chunk=16, budget=96, dtype=dtype, seed=g)
            cases.append((f"gqa{g} {dtype} prefill softcap", {**common, "softcap": 30.0}, prefill))
            cases.append((f"gqa{g} {dtype} decode", {**common, "q_len": 1}, decode))
        gemma = dict(heads_q=HQ, heads_kv=HKV, head_dim=D, dtype=dtype)
        cases.append(
            (
                f"gemma {dtype} variable chunks, offset keys",
                {**gemma, "k_len": 517, "variable_chunks": (5, 40), "budget": 160, "key_offset": 2.0, "seed": 11},
                prefill,
            )
        )
        cases.append(
            (
                f"gemma {dtype} softcap+window",
                {**gemma, "k_len": 333, "chunk": 16, "budget": 128, "softcap": 20.0, "window": 100, "seed": 12},
                prefill,
            )
        )
    cases.append(
        (
            "one-token chunks: M > 200, 300 chunks",
            dict(heads_q=4, heads_kv=1, head_dim=16, k_len=301, chunk=1, budget=200, seed=9),
            [(OP_SELECT, False, "sel"), (OP_SPARSE, False, "ref_sparse")],
        )
    )
    cases.append(
        (
            "budget >= L is dense",
            dict(heads_q=4, heads_kv=1, head_dim=64, k_len=150, chunk=16, budget=200, seed=13),
            [(OP_SPARSE, False, "ref_dense")],
        )
    )
    return cases


def timing_specs() -> list:
    from edgeattn.kernels_tvm.abi import OP_DENSE, OP_SELECT, OP_SPARSE, KernelSpec

    out = []
    for dtype in ("float32", "float16"):
        base = dict(heads_q=HQ, heads_kv=HKV, head_dim=D, dtype=dtype, sinks=SINKS, budget=BUDGET)
        for op in (OP_SELECT, OP_SPARSE, OP_DENSE):
            out.append(KernelSpec(op=op, **base))
        out.append(KernelSpec(op=OP_SPARSE, decode=True, **base))
        out.append(KernelSpec(op=OP_DENSE, decode=True, **base))
    return out


def all_specs() -> list:
    from edgeattn.kernels_tvm.gpu_cases import make_case

    specs = []
    for _, kw, ops in check_cases():
        case = make_case(**kw)
        specs += [case.spec(op).with_(decode=dec) for op, dec, _ in ops]
    return specs + timing_specs()


# ------------------------------------------------------------------ step 1: bundle (host)


def cmd_bundle(args: argparse.Namespace) -> int:
    from edgeattn.kernels_tvm.gpu_cuda import NvccError
    from edgeattn.kernels_tvm.prebuilt import write_bundle
    from edgeattn.kernels_tvm.targets import UnknownTargetError, get_profile, list_profiles

    cuda = [p.name for p in list_profiles("cuda")]
    try:
        family = get_profile(args.target).family
    except UnknownTargetError as exc:
        family = f"unknown ({exc})"
    if family != "cuda":
        print(f"error: --target must be a CUDA profile ({', '.join(cuda)}), got {args.target!r}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        out = write_bundle(args.out, all_specs(), args.target, progress=lambda m: print(m, flush=True))
    except (NvccError, RuntimeError) as exc:
        print(f"error: could not build the bundle (nothing was written to {args.out}): {exc}", file=sys.stderr)
        return 2
    n = len(json.loads((out / "manifest.json").read_text())["kernels"])
    print(f"wrote {n} kernels for {args.target} to {out} in {time.perf_counter() - t0:.1f} s")
    return 0


# ------------------------------------------------------------------ step 2: run (GPU)


def run_checks(bundle, dev) -> list[dict[str, Any]]:
    import numpy as np
    import tvm

    from edgeattn.kernels_tvm.gpu_cases import make_case, rel_err

    rows = []
    for name, kw, ops in check_cases():
        case = make_case(**kw)
        for op, dec, ref_name in ops:
            spec = case.spec(op).with_(decode=dec)
            tensors = [tvm.runtime.tensor(a, dev) for a in case.args(op)]
            bundle.kernel(spec)(*tensors)
            dev.sync()
            got = [t.numpy() for t in tensors]
            if ref_name == "sel":
                ok = np.array_equal(got[3], case.sel) and np.array_equal(got[4], case.nsel)
                err, tol = (0.0 if ok else math.inf), 0.0
            else:
                err, tol = rel_err(got[-1], getattr(case, ref_name)), TOL[case.dtype]
                ok = err <= tol
            label = f"{op}{' (decode kernel)' if dec else ''}"
            rows.append({"case": name, "kernel": label, "rel_err": err, "tol": tol, "ok": bool(ok)})
            print(f"{'ok  ' if ok else 'FAIL'} {name:42s} {label:36s} err {err:.2e}", flush=True)
    return rows


def _repeats(once_s: float, budget_s: float) -> int:
    """Timed calls that fit ``budget_s`` given one call's time, at least 3 and at most 20."""
    return int(max(3, min(20, budget_s / max(once_s, 1e-6))))


def time_tvm(bundle, spec, tensors, budget_s: float) -> float:
    """Median seconds of one kernel call (one untimed call first; repeats fit ``budget_s``)."""
    dev = bundle.device()
    t0 = time.perf_counter()
    bundle.kernel(spec)(*tensors)
    dev.sync()
    once = time.perf_counter() - t0
    res = bundle.time_evaluator(spec, number=1, repeat=_repeats(once, budget_s))(*tensors)
    return median(res.results)


def time_torch(fn, budget_s: float) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once = time.perf_counter() - t0
    times = []
    for _ in range(_repeats(once, budget_s)):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return median(times)


def time_length(bundle, dev, length: int, dtype: str, args) -> list[dict[str, Any]]:
    """Prefill and decode records for one length and dtype (DHSA, TVM dense, SDPA)."""
    import numpy as np
    import torch
    import tvm
    from kernels import dense_flops, dhsa_kept_scores
    from torch.nn.attention import SDPBackend, sdpa_kernel

    FUSED_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]

    from edgeattn import dhsa
    from edgeattn.kernels_tvm.abi import OP_DENSE, OP_SELECT, OP_SPARSE, KernelSpec, max_selected
    from edgeattn.kernels_tvm.gpu_cases import rel_err

    rng = np.random.default_rng(length)
    q, k, v = (rng.standard_normal((h, length, D)).astype(dtype) for h in (HQ, HKV, HKV))
    bnd = dhsa.fixed_boundaries(length, CHUNK).numpy().astype(np.int32)
    nc = len(bnd) - 1
    m = max_selected(BUDGET, SINKS, CHUNK, nc)
    base = dict(heads_q=HQ, heads_kv=HKV, head_dim=D, dtype=dtype, sinks=SINKS, budget=BUDGET)
    t = {name: tvm.runtime.tensor(a, dev) for name, a in (("q", q), ("k", k), ("v", v), ("b", bnd))}
    sel = tvm.runtime.tensor(np.full((HKV, nc, m), 0x7FFFFFFF, np.int32), dev)
    nsel = tvm.runtime.tensor(np.full((HKV, nc), 0x7FFFFFFF, np.int32), dev)
    out_s = tvm.runtime.tensor(np.full(q.shape, np.nan, dtype), dev)
    out_d = tvm.runtime.tensor(np.full(q.shape, np.nan, dtype), dev)
    select_args = [t["q"], t["k"], t["b"], sel, nsel]
    sparse_args = [t["q"], t["k"], t["v"], t["b"], sel, nsel, out_s]
    per = args.seconds_per_point
    rec: dict[str, Any] = {"length": length, "dtype": dtype, "phase": "prefill"}
    rec["select_s"] = time_tvm(bundle, KernelSpec(op=OP_SELECT, **base), select_args, per / 4)
    rec["sparse_s"] = time_tvm(bundle, KernelSpec(op=OP_SPARSE, **base), sparse_args, per)
    rec["dhsa_s"] = rec["select_s"] + rec["sparse_s"]
    kept = dhsa_kept_scores(sel.numpy(), nsel.numpy(), bnd, SINKS)
    rec["dhsa_gflops"] = kept * 4 * D / rec["dhsa_s"] / 1e9
    # K/V expanded to the query heads (a view): with enable_gqa, fp32 SDPA falls back to the math
    # kernel, which materialises L x L scores (64 GiB at 64K); without it the fused kernels run.
    tq = torch.from_numpy(q).cuda()[None]
    tk, tv = (torch.from_numpy(x).cuda()[None].expand(1, HQ, length, D) for x in (k, v))

    def sdpa():
        with sdpa_kernel(FUSED_SDPA):
            return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)

    rec["sdpa_s"] = time_torch(sdpa, per)
    want = sdpa()[0].float().cpu().numpy()
    if length <= args.dense_max_length:
        rec["dense_s"] = time_tvm(bundle, KernelSpec(op=OP_DENSE, **base), [t["q"], t["k"], t["v"], out_d], per)
        rec["dense_vs_sdpa_err"] = rel_err(out_d.numpy(), want)
        rec["dense_gflops"] = dense_flops(length) / rec["dense_s"] / 1e9
    rec["sdpa_gflops"] = dense_flops(length) / rec["sdpa_s"] / 1e9
    # DHSA keeps budget-limited scores only, so compare it with SDPA where budget >= L (rows before 2K).
    head = min(length, BUDGET)
    rec["dhsa_head_vs_sdpa_err"] = rel_err(out_s.numpy()[:, :head], want[:, :head])
    recs = [rec]
    # decode: the last query against the whole cache
    q1 = np.ascontiguousarray(q[:, -1:])
    t1 = tvm.runtime.tensor(q1, dev)
    sel1 = tvm.runtime.tensor(np.full((HKV, 1, m), 0x7FFFFFFF, np.int32), dev)
    nsel1 = tvm.runtime.tensor(np.full((HKV, 1), 0x7FFFFFFF, np.int32), dev)
    o1 = tvm.runtime.tensor(np.full(q1.shape, np.nan, dtype), dev)
    o2 = tvm.runtime.tensor(np.full(q1.shape, np.nan, dtype), dev)
    drec: dict[str, Any] = {"length": length, "dtype": dtype, "phase": "decode"}
    drec["select_s"] = time_tvm(bundle, KernelSpec(op=OP_SELECT, **base), [t1, t["k"], t["b"], sel1, nsel1], per / 8)
    dspec = KernelSpec(op=OP_SPARSE, decode=True, **base)
    drec["sparse_s"] = time_tvm(bundle, dspec, [t1, t["k"], t["v"], t["b"], sel1, nsel1, o1], per / 8)
    drec["dhsa_s"] = drec["select_s"] + drec["sparse_s"]
    drec["dense_s"] = time_tvm(bundle, KernelSpec(op=OP_DENSE, decode=True, **base), [t1, t["k"], t["v"], o2], per / 8)
    tq1 = tq[:, :, -1:]

    def sdpa_decode():
        with sdpa_kernel(FUSED_SDPA):
            return torch.nn.functional.scaled_dot_product_attention(tq1, tk, tv)

    drec["sdpa_s"] = time_torch(sdpa_decode, per / 8)
    drec["dense_vs_sdpa_err"] = rel_err(o2.numpy(), want[:, -1:])
    recs.append(drec)
    for r in recs:
        r["dense_x_sdpa"] = r["sdpa_s"] / r["dense_s"] if r.get("dense_s") else None
        r["dhsa_x_sdpa"] = r["sdpa_s"] / r["dhsa_s"]
        r["select_share"] = r["select_s"] / r["dhsa_s"]
    return recs


COLUMNS = [
    ("length", "L"),
    ("dtype", "dtype"),
    ("phase", "phase"),
    ("sdpa_ms", "SDPA ms"),
    ("dense_ms", "TVM dense ms"),
    ("dhsa_ms", "TVM DHSA ms"),
    ("select_share", "select share"),
    ("dense_x_sdpa", "dense x SDPA"),
    ("dhsa_x_sdpa", "DHSA x SDPA"),
    ("sdpa_gflops", "SDPA GFLOP/s"),
    ("dense_gflops", "dense GFLOP/s"),
    ("dense_vs_sdpa_err", "dense err vs SDPA"),
]


def cmd_run(args: argparse.Namespace) -> int:
    import torch
    import tvm
    from _common import cpu_model, table, write_json

    from edgeattn.kernels_tvm.prebuilt import CUDA_LOADS, Bundle, BundleError, gpu_arch

    try:
        bundle = Bundle.load(args.bundle)
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    dev = bundle.device()
    if not dev.exist:
        print(f"error: no {bundle.manifest['family']} device here for bundle {args.bundle}", file=sys.stderr)
        return 2
    meta = {
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else dev.device_name,
        "compute_version": dev.compute_version,
        "bundle_target": bundle.target,
        "tvm": tvm.__version__,
        "torch": torch.__version__,
        "host_cpu": cpu_model(),
        "python": platform.python_version(),
    }
    print(" | ".join(f"{k}: {v}" for k, v in meta.items()), flush=True)
    checks = [] if args.skip_checks else run_checks(bundle, dev)
    failed = [c for c in checks if not c["ok"]]
    print(f"checks: {len(checks) - len(failed)}/{len(checks)} passed", flush=True)
    records = []
    for length in [int(x) for x in args.lengths.split(",") if x]:
        for dtype in args.dtypes.split(","):
            t0 = time.perf_counter()
            try:
                recs = time_length(bundle, dev, length, dtype, args)
            except Exception as exc:  # one length failing (memory) must not lose the others
                print(f"error: L={length} {dtype}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                failed.append({"case": f"timing L={length} {dtype}", "kernel": type(exc).__name__})
                continue
            finally:
                torch.cuda.empty_cache()
            print(f"timed L={length} {dtype} in {time.perf_counter() - t0:.1f} s: " + json.dumps(recs), flush=True)
            records += recs
    for r in records:
        for key in ("sdpa", "dense", "dhsa"):
            r[f"{key}_ms"] = r[f"{key}_s"] * 1e3 if r.get(f"{key}_s") is not None else None
    title = f"TVM CUDA kernels vs PyTorch SDPA | GPU: {meta['gpu']} ({gpu_arch(dev)})"
    print(f"\n{title}\nhost CPU: {meta['host_cpu']} | bundle: {bundle.target}", end="")
    print(f" | TVM {meta['tvm']} | torch {meta['torch']}")
    print(f"shape: {HQ} query heads, {HKV} KV head, head_dim {D}; DHSA budget {BUDGET}, chunk {CHUNK}, sinks {SINKS}")
    print(table(records, COLUMNS))
    loads = CUDA_LOADS
    print(f"CUDA modules loaded from the bundle's cubins: {loads['prebuilt']}, compiled here: {loads['compiled']}")
    if args.json:
        write_json(args.json, records, {**meta, "checks": checks})
        print(f"wrote {args.json}")
    if failed:
        names = "; ".join(f"{c['case']} {c['kernel']}" for c in failed)
        print(f"error: {len(failed)} checks failed: {names}", file=sys.stderr)
        return 1
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bundle", help="compile the kernels (here: TVM compiler + nvcc; no GPU needed)")
    b.add_argument("--target", default="cuda-sm90", help="a CUDA profile from kernels_tvm/targets.py")
    b.add_argument("--out", required=True, help="bundle folder to write (replaced if it exists)")
    r = sub.add_parser("run", help="check and time a bundle on the GPU (TVM runtime + torch with CUDA)")
    r.add_argument("--bundle", required=True)
    r.add_argument("--lengths", default="4096,16384,32768,65536")
    r.add_argument("--dtypes", default="float32,float16")
    r.add_argument("--dense-max-length", type=int, default=65536, help="skip TVM dense prefill above this length")
    r.add_argument("--seconds-per-point", type=float, default=1.0, help="timing budget per kernel and length")
    r.add_argument("--skip-checks", action="store_true")
    r.add_argument("--json", metavar="PATH")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return cmd_bundle(args) if args.cmd == "bundle" else cmd_run(args)


if __name__ == "__main__":
    sys.exit(main())
