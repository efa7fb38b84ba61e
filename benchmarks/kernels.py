"""Attention kernels side by side on this CPU: TVM DHSA, TVM dense flash, PyTorch SDPA, ONNX Runtime.

One attention layer of the default model's global layers (Gemma 3 270M: 4 query heads sharing
1 KV head, head_dim 256), causal prefill at each length, DHSA budget 2048 tokens, chunks of 32,
4 sinks.  Prints latency, GFLOP/s and speed-up over SDPA, with the CPU model and thread count.

FLOPs: dense counts 2·2·D·L²/2 per query head (causal); DHSA counts the scores it actually keeps
(kept key tokens per query, from the selection the kernel made) × 2·2·D.  The DHSA time is
selection (pooling + chunk scores + budgeted selection) + sparse attention; both are shown.
"peak extra MiB" is the growth of the process RSS during the call (inputs/outputs excluded).

    python benchmarks/kernels.py                         # L = 4K, 16K, 32K, 64K, 2 threads
    python benchmarks/kernels.py --quick                 # smoke run (1K, 4K)
    python benchmarks/kernels.py --lengths 4096,16384 --json out/kernels.json
    python benchmarks/kernels.py --baseline-max-length 16384   # skip SDPA/ORT/TVM dense above 16K
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

HQ, HKV, D = 4, 1, 256
CHUNK, SINKS = 32, 4
IMPLS = ("tvm-dhsa", "tvm-dense", "torch-sdpa", "ort-gqa")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="4096,16384,32768,65536", help="comma-separated sequence lengths")
    p.add_argument("--budget", type=int, default=2048, help="DHSA token budget N_b")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=0, help="timed runs per point (default: 3 up to 8K, 1 above)")
    p.add_argument(
        "--baseline-max-length", type=int, default=0, help="skip the dense baselines above this length (0: never)"
    )
    p.add_argument("--impls", default=",".join(IMPLS), help=f"subset of {','.join(IMPLS)}")
    p.add_argument("--check-max-length", type=int, default=4096, help="check DHSA against the reference up to here")
    p.add_argument("--json", metavar="PATH", help="write one record per implementation and length")
    p.add_argument("--quick", action="store_true", help="smoke run: lengths 1024,4096, one repeat")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def dense_flops(length: int) -> float:
    return HQ * 2 * 2 * D * length * length / 2


def dhsa_kept_scores(sel, nsel, bnd, sinks: int) -> int:
    """Kept (query, key) scores of a prefill selection, all query heads (what DHSA computes)."""
    import numpy as np

    lens = np.diff(bnd).astype(np.int64)
    starts = bnd[:-1].astype(np.int64)
    ends = bnd[1:].astype(np.int64)
    charge = lens - np.clip(np.minimum(ends, sinks) - np.minimum(starts, sinks), 0, None)
    total = 0
    hkv, nq, m = sel.shape
    for h in range(hkv):
        n = nsel[h].astype(np.int64)
        ids = sel[h].astype(np.int64)
        valid = np.arange(m)[None, :] < (n[:, None] - 1)  # kept chunks other than the own one
        outside = np.where(valid, charge[np.clip(ids, 0, None)], 0).sum(1)
        own = np.arange(nq) + len(lens) - nq
        outside += np.minimum(sinks, starts[own])
        rows = lens[own]
        total += int((rows * outside + rows * (rows + 1) // 2).sum())
    return total * (HQ // HKV)


def ort_session(threads: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    node = helper.make_node(
        "GroupQueryAttention",
        ["query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length"],
        ["output", "present_key", "present_value"],
        domain="com.microsoft",
        num_heads=HQ,
        kv_num_heads=HKV,
        scale=1.0 / math.sqrt(D),
    )
    f = TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("query", f, [1, "L", HQ * D]),
        helper.make_tensor_value_info("key", f, [1, "L", HKV * D]),
        helper.make_tensor_value_info("value", f, [1, "L", HKV * D]),
        helper.make_tensor_value_info("past_key", f, [1, HKV, "P", D]),
        helper.make_tensor_value_info("past_value", f, [1, HKV, "P", D]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
    ]
    outputs = [
        helper.make_tensor_value_info("output", f, [1, "L", HQ * D]),
        helper.make_tensor_value_info("present_key", f, None),
        helper.make_tensor_value_info("present_value", f, None),
    ]
    graph = helper.make_graph([node], "gqa", inputs, outputs)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = C.set_threads(args.threads)  # before TVM starts its thread pool

    import numpy as np
    import torch
    import torch.nn.functional as F
    from edgeattn import dhsa
    from edgeattn.config import AttentionConfig
    from edgeattn.kernels_tvm import registry
    from edgeattn.kernels_tvm.abi import OP_DENSE, OP_SELECT, OP_SPARSE
    from edgeattn.runtime.measure import MIB, PeakRSS

    lengths = [1024, 4096] if args.quick else [int(x) for x in args.lengths.split(",") if x]
    impls = [x for x in args.impls.split(",") if x]
    for x in impls:
        if x not in IMPLS:
            raise SystemExit(f"unknown implementation {x!r}; choose from {', '.join(IMPLS)}")
    cfg = AttentionConfig(kind="dhsa", budget=args.budget, chunk_size=CHUNK, sinks=SINKS)
    target = registry.host_target()
    common = dict(heads_q=HQ, heads_kv=HKV, head_dim=D)
    sel_k = registry.get_kernel(OP_SELECT, target, budget=cfg.budget, sinks=SINKS, **common)
    sparse_k = registry.get_kernel(OP_SPARSE, target, sinks=SINKS, **common)
    dense_k = registry.get_kernel(OP_DENSE, target, **common)
    compile_s = sel_k.compile_s + sparse_k.compile_s + dense_k.compile_s
    ort_sess = ort_session(threads) if "ort-gqa" in impls else None

    print(C.header(f"Attention kernels, Hq={HQ} Hkv={HKV} D={D}, causal prefill, DHSA budget {cfg.budget}, "
                   f"chunk {CHUNK}, sinks {SINKS}", threads))
    print(f"TVM target: {target} (kernels compiled in {compile_s:.1f}s, once for every length)", flush=True)

    records = []
    gen = torch.Generator().manual_seed(args.seed)
    # start every thread pool once (TVM, torch, ORT) on a small problem
    registry.run_layer(torch.randn(1, HQ, 256, D), torch.randn(1, HKV, 256, D), torch.randn(1, HKV, 256, D), cfg)
    registry.run_layer(torch.randn(1, HQ, 256, D), torch.randn(1, HKV, 256, D), torch.randn(1, HKV, 256, D),
                       AttentionConfig(kind="dense"))
    for length in lengths:
        reps = args.repeats or (1 if args.quick or length > 8192 else 3)
        q = torch.randn(1, HQ, length, D, generator=gen)
        k = torch.randn(1, HKV, length, D, generator=gen)
        v = torch.randn(1, HKV, length, D, generator=gen)
        q0, k0, v0 = q[0], k[0], v[0]
        bnd = dhsa.fixed_boundaries(length, CHUNK).to(torch.int32)
        bt = registry.empty(bnd.shape, "int32").copy_(bnd)
        nc = len(bnd) - 1
        m = registry.selection_width(bnd.numpy(), cfg.budget, SINKS)
        sel = registry.empty((HKV, nc, m), "int32")
        nsel = registry.empty((HKV, nc), "int32")
        out = registry.empty((HQ, length, D))
        baselines = not args.baseline_max_length or length <= args.baseline_max_length
        sdpa_s = None
        rows = {}

        def record(impl, times, flops, peak, **extra):
            lat = C.median(times)
            rec = dict(impl=impl, length=length, latency_s=lat, min_s=min(times), times_s=times,
                       gflops=flops / lat / 1e9, peak_extra_mib=peak / MIB, threads=threads, budget=cfg.budget,
                       heads_q=HQ, heads_kv=HKV, head_dim=D, chunk=CHUNK, sinks=SINKS, **extra)
            rows[impl] = rec
            return rec

        if "tvm-dhsa" in impls:
            sel_k(q0, k0, bt, sel, nsel)  # warm: thread pool, workspace pool at this length
            if length <= 8192:
                sparse_k(q0, k0, v0, bt, sel, nsel, out)
            sel_t, att_t = [], []
            with PeakRSS() as mem:
                for _ in range(reps):
                    t = C.time_it(lambda: sel_k(q0, k0, bt, sel, nsel))[0]
                    a = C.time_it(lambda: sparse_k(q0, k0, v0, bt, sel, nsel, out))[0]
                    sel_t.append(t)
                    att_t.append(a)
            tot = [s + a for s, a in zip(sel_t, att_t)]
            kept = dhsa_kept_scores(sel.numpy(), nsel.numpy(), bnd.numpy(), SINKS)
            err = None
            if length <= args.check_max_length:
                ref = dhsa.attention(q, k, v, cfg)[0]
                err = float((out - ref).abs().max() / ref.abs().max())
            record("tvm-dhsa", tot, kept * 2 * 2 * D, mem.extra, select_s=C.median(sel_t),
                   attention_s=C.median(att_t), select_frac=C.median(sel_t) / C.median(tot),
                   kept_fraction=kept / (HQ * length * (length + 1) / 2), rel_err=err)
        if baselines and "tvm-dense" in impls:
            if length <= 8192:
                dense_k(q0, k0, v0, out)
            with PeakRSS() as mem:
                times = C.time_it(lambda: dense_k(q0, k0, v0, out), reps)
            record("tvm-dense", times, dense_flops(length), mem.extra)
            dense_out = out.clone() if length <= args.check_max_length else None
        if baselines and "torch-sdpa" in impls:
            def sdpa():
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

            if length <= 8192:
                sdpa()
            with PeakRSS() as mem:
                times = C.time_it(sdpa, reps)
            rec = record("torch-sdpa", times, dense_flops(length), mem.extra)
            sdpa_s = rec["latency_s"]
            if "tvm-dense" in rows and dense_out is not None:
                ref = sdpa()[0]
                rows["tvm-dense"]["rel_err"] = float((dense_out - ref).abs().max() / ref.abs().max())
        if baselines and ort_sess is not None:
            feed = dict(
                query=q.transpose(1, 2).reshape(1, length, HQ * D).numpy(),
                key=k.transpose(1, 2).reshape(1, length, HKV * D).numpy(),
                value=v.transpose(1, 2).reshape(1, length, HKV * D).numpy(),
                past_key=np.zeros((1, HKV, 0, D), np.float32),
                past_value=np.zeros((1, HKV, 0, D), np.float32),
                seqlens_k=np.array([length - 1], np.int32),
                total_sequence_length=np.array(length, np.int32),
            )
            if length <= 8192:
                ort_sess.run(["output"], feed)
            with PeakRSS() as mem:
                times = C.time_it(lambda: ort_sess.run(["output"], feed), reps)
            record("ort-gqa", times, dense_flops(length), mem.extra)
        for impl in IMPLS:
            if impl in rows:
                rec = rows[impl]
                rec["speedup_vs_sdpa"] = sdpa_s / rec["latency_s"] if sdpa_s else None
                records.append(rec)
                line = C.table([rec], COLUMNS).splitlines()[-1]
                print(line if len(records) > 1 else C.table([rec], COLUMNS), flush=True)
        del q, k, v, q0, k0, v0, out

    print()
    print(C.header("Summary", threads))
    print(C.table(records, COLUMNS))
    dh = {r["length"]: r for r in records if r["impl"] == "tvm-dhsa"}
    for length, r in dh.items():
        if r.get("speedup_vs_sdpa"):
            print(f"L={length}: TVM DHSA {r['speedup_vs_sdpa']:.1f}x SDPA, selection {100 * r['select_frac']:.1f}% "
                  f"of DHSA time, keeps {100 * r['kept_fraction']:.1f}% of the causal scores")
    if args.json:
        C.write_json(args.json, records, meta=dict(threads=threads, target=str(target), lengths=lengths,
                                                   budget=cfg.budget, compile_s=compile_s))
        print(f"wrote {args.json}")
    return 0


COLUMNS = [
    ("impl", "implementation"),
    ("length", "L"),
    ("latency_s", "latency s"),
    ("select_s", "select s"),
    ("gflops", "GFLOP/s"),
    ("speedup_vs_sdpa", "x SDPA"),
    ("peak_extra_mib", "peak extra MiB"),
    ("rel_err", "rel err"),
]

if __name__ == "__main__":
    sys.exit(main())
