"""Attention kernels side by side on this CPU: TVM DHSA, TVM dense flash, PyTorch SDPA, ONNX Runtime.

One attention layer of the default model's global layers (Gemma 3 270M: 4 query heads sharing
1 KV head, head_dim 256), causal prefill at each length, DHSA budget 2048 tokens, the default
chunk length (edgeattn.config.DEFAULT_CHUNK_SIZE, --chunk-size), 4 sinks.  Prints latency, GFLOP/s
and speed-up over SDPA, with the CPU model and thread count.

FLOPs: dense counts 2·2·D·L²/2 per query head (causal); DHSA counts the scores it actually keeps
(kept key tokens per query, from the selection the kernel made) × 2·2·D.  The DHSA time is
selection (pooling + chunk scores + budgeted selection) + sparse attention; both are shown.
"peak extra MiB" is the growth of the process RSS during the call (inputs/outputs excluded).
"schedule" says whether a TVM kernel ran with a tuned schedule from kernels_tvm/tuning/x86-host.json
(applied only when it was measured on this CPU model; see kernels_tvm/tune.py) or the default.
"CPU util" = process CPU time / (wall time x threads): well below 1 means the machine was busy
with other work (or threads idled) and the wall times are pessimistic; "GFLOP/cpu-s" and
"x SDPA cpu-s" are the same figures per CPU second consumed, which other load disturbs far less.

    python benchmarks/kernels.py                         # L = 4K, 16K, 32K, 64K, 2 threads
    python benchmarks/kernels.py --quick                 # smoke run (1K, 4K)
    python benchmarks/kernels.py --lengths 4096,16384 --json out/kernels.json
    python benchmarks/kernels.py --baseline-max-length 16384   # skip SDPA/ORT/TVM dense above 16K
    python benchmarks/kernels.py --lengths 16384 --impls tvm-dense,torch-sdpa --pairs 9   # ratio spread
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
from _common import interleaved_ratios  # noqa: E402

from edgeattn.config import DEFAULT_BUDGET, DEFAULT_CHUNK_SIZE, DEFAULT_OBSERVE  # noqa: E402

HQ, HKV, D = 4, 1, 256
SINKS = 4
IMPLS = ("tvm-dhsa", "tvm-dense", "torch-sdpa", "ort-gqa")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="4096,16384,32768,65536", help="comma-separated sequence lengths")
    p.add_argument("--budget", type=int, default=DEFAULT_BUDGET, help="DHSA token budget N_b")
    p.add_argument(
        "--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="DHSA chunk length (default: the operator's)"
    )
    p.add_argument(
        "--observe",
        type=int,
        default=DEFAULT_OBSERVE,
        help="DHSA observation window: the last queries whose exact scores pick vertical chunks (0: off; "
        "default: the operator's)",
    )
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
    p.add_argument(
        "--pairs",
        type=int,
        default=0,
        metavar="N",
        help="also time TVM dense and SDPA in N alternating pairs per length and report the spread of the "
        "per-pair ratios (the dense-vs-SDPA target is within this machine's run-to-run noise)",
    )
    p.add_argument(
        "--isolate",
        action="store_true",
        help="time each implementation in its own process (same inputs), so that what ran before it in the "
        "process cannot change its time; measured: TVM dense is 7-12%% slower right after TVM DHSA",
    )
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


class Bench:
    """Everything one run needs: kernels, sessions, options; :meth:`length` measures one L."""

    def __init__(self, args: argparse.Namespace, threads: int) -> None:
        from edgeattn.config import AttentionConfig
        from edgeattn.kernels_tvm import registry
        from edgeattn.kernels_tvm.abi import OP_DENSE, OP_SELECT, OP_SPARSE

        self.args, self.threads, self.registry = args, threads, registry
        self.impls = [x for x in args.impls.split(",") if x]
        for x in self.impls:
            if x not in IMPLS:
                raise SystemExit(f"unknown implementation {x!r}; choose from {', '.join(IMPLS)}")
        self.cfg = AttentionConfig(
            kind="dhsa", budget=args.budget, chunk_size=args.chunk_size, sinks=SINKS, observe=args.observe
        )
        self.target = registry.host_target()
        common = dict(heads_q=HQ, heads_kv=HKV, head_dim=D)
        window = dict(observe=self.cfg.observe, vertical=self.cfg.vertical_tokens)
        self.sel_k = registry.get_kernel(OP_SELECT, self.target, budget=args.budget, sinks=SINKS, **window, **common)
        tile = registry.query_tile_for([0, args.chunk_size])  # the schedule hint run_layer gives
        self.sparse_k = registry.get_kernel(OP_SPARSE, self.target, sinks=SINKS, query_tile=tile, **common)
        self.dense_k = registry.get_kernel(OP_DENSE, self.target, **common)
        self.compile_s = self.sel_k.compile_s + self.sparse_k.compile_s + self.dense_k.compile_s
        self.ort = ort_session(threads) if "ort-gqa" in self.impls else None

    def warm_up(self) -> None:
        """Start every thread pool once (TVM, torch, ORT) on a small problem."""
        import torch

        from edgeattn.config import AttentionConfig

        small = (torch.randn(1, HQ, 256, D), torch.randn(1, HKV, 256, D), torch.randn(1, HKV, 256, D))
        self.registry.run_layer(*small, self.cfg)
        self.registry.run_layer(*small, AttentionConfig(kind="dense"))

    def length(self, length: int, gen) -> list[dict]:
        import numpy as np
        import torch
        import torch.nn.functional as F

        from edgeattn import dhsa
        from edgeattn.runtime.measure import MIB, PeakRSS

        args, reg, threads, impls = self.args, self.registry, self.threads, self.impls
        reps = args.repeats or (1 if args.quick or length > 8192 else 3)
        warm = length <= 8192  # an untimed first run where it is cheap
        q = torch.randn(1, HQ, length, D, generator=gen)
        k = torch.randn(1, HKV, length, D, generator=gen)
        v = torch.randn(1, HKV, length, D, generator=gen)
        q0, k0, v0 = q[0], k[0], v[0]
        bnd = dhsa.fixed_boundaries(length, args.chunk_size).to(torch.int32)
        bt = reg.empty(bnd.shape, "int32").copy_(bnd)
        nc = len(bnd) - 1
        m = reg.selection_width(bnd.numpy(), args.budget, SINKS)
        # outputs allocated and touched up front: "peak extra" is then the kernels' own memory
        sel = reg.empty((HKV, nc, m), "int32").fill_(-1)
        nsel = reg.empty((HKV, nc), "int32").fill_(-1)
        out = reg.empty((HQ, length, D)).fill_(float("nan"))
        baselines = not args.baseline_max_length or length <= args.baseline_max_length
        rows: dict[str, dict] = {}

        def measure(impl, fn, flops, warm=warm):
            time.sleep(0.5)  # let the previous library's spinning worker threads go idle
            if warm:
                fn()
            c0 = time.process_time()
            with PeakRSS() as mem:
                times = C.time_it(fn, reps)
            cpu_s = time.process_time() - c0
            lat = C.median(times)
            rows[impl] = dict(
                impl=impl, length=length, latency_s=lat, min_s=min(times), times_s=times,
                cpu_s=cpu_s, cpu_util=cpu_s / (sum(times) * threads), gflops=flops / lat / 1e9,
                peak_extra_mib=mem.extra / MIB, threads=threads, budget=args.budget, heads_q=HQ, heads_kv=HKV,
                head_dim=D, chunk=args.chunk_size, sinks=SINKS, observe=args.observe, flops=flops,
                gflops_cpu=flops * len(times) / cpu_s / 1e9,
            )  # fmt: skip
            return rows[impl]

        if "tvm-dhsa" in impls:
            parts = {"select": [], "attention": []}

            def dhsa_layer():
                t0 = time.perf_counter()
                self.sel_k(q0, k0, bt, sel, nsel)
                t1 = time.perf_counter()
                self.sparse_k(q0, k0, v0, bt, sel, nsel, out)
                parts["select"].append(t1 - t0)
                parts["attention"].append(time.perf_counter() - t1)

            self.sel_k(q0, k0, bt, sel, nsel)
            kept = dhsa_kept_scores(sel.numpy(), nsel.numpy(), bnd.numpy(), SINKS)
            if warm:
                self.sparse_k(q0, k0, v0, bt, sel, nsel, out)
            rec = measure("tvm-dhsa", dhsa_layer, kept * 2 * 2 * D, warm=False)
            sel_s, att_s = C.median(parts["select"]), C.median(parts["attention"])
            rec.update(select_s=sel_s, attention_s=att_s, select_frac=sel_s / (sel_s + att_s))
            rec["kept_fraction"] = kept / (HQ * length * (length + 1) / 2)
            if length <= args.check_max_length:
                ref = dhsa.attention(q, k, v, self.cfg)[0]
                rec["rel_err"] = float((out - ref).abs().max() / ref.abs().max())

        def dense():
            self.dense_k(q0, k0, v0, out)

        def sdpa():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        if baselines and "tvm-dense" in impls:
            rec = measure("tvm-dense", dense, dense_flops(length))
            if length <= args.check_max_length:
                ref = sdpa()[0]
                rec["rel_err"] = float((out - ref).abs().max() / ref.abs().max())
        if baselines and "torch-sdpa" in impls:
            measure("torch-sdpa", sdpa, dense_flops(length))
        if baselines and self.ort is not None:
            feed = dict(
                query=q.transpose(1, 2).reshape(1, length, HQ * D).numpy(),
                key=k.transpose(1, 2).reshape(1, length, HKV * D).numpy(),
                value=v.transpose(1, 2).reshape(1, length, HKV * D).numpy(),
                past_key=np.zeros((1, HKV, 0, D), np.float32),
                past_value=np.zeros((1, HKV, 0, D), np.float32),
                seqlens_k=np.array([length - 1], np.int32),
                total_sequence_length=np.array(length, np.int32),
            )
            measure("ort-gqa", lambda: self.ort.run(["output"], feed), dense_flops(length))
        if args.pairs and "tvm-dense" in rows and "torch-sdpa" in rows:
            rows["tvm-dense"]["pair_ratios"] = interleaved_ratios(dense, sdpa, args.pairs)
        for impl, kern in (("tvm-dhsa", self.sparse_k), ("tvm-dense", self.dense_k)):
            if impl in rows:
                rows[impl]["schedule"] = kern.schedule_source.split(" ")[0]
        if "tvm-dhsa" in rows and len(rows) > 1:
            # DHSA again after the (long) baselines: both halves see the same machine load
            rec = rows["tvm-dhsa"]
            time.sleep(0.5)
            c0 = time.process_time()
            with PeakRSS() as mem:
                times = C.time_it(dhsa_layer, reps)
            rec["times_s"] += times
            rec["cpu_s"] += time.process_time() - c0
            all_t = rec["times_s"]
            rec.update(latency_s=C.median(all_t), min_s=min(all_t), cpu_util=rec["cpu_s"] / (sum(all_t) * threads))
            rec["gflops_cpu"] = rec["flops"] * len(all_t) / rec["cpu_s"] / 1e9
            rec["peak_extra_mib"] = max(rec["peak_extra_mib"], mem.extra / MIB)
            rec["gflops"] = kept * 2 * 2 * D / rec["latency_s"] / 1e9
            sel_s, att_s = C.median(parts["select"]), C.median(parts["attention"])
            rec.update(select_s=sel_s, attention_s=att_s, select_frac=sel_s / (sel_s + att_s))
        records = [rows[i] for i in IMPLS if i in rows]
        add_ratios(records)
        return records


def _print_pair_lines(records: list[dict]) -> None:
    for r in records:
        ratios = r.get("pair_ratios")
        if ratios:
            wins = sum(x >= 1 for x in ratios)
            print(
                f"TVM dense vs SDPA at L={r['length']}, {len(ratios)} interleaved pairs: median "
                f"{C.median(ratios):.3f}x, range {min(ratios):.3f}-{max(ratios):.3f}x, {wins} of {len(ratios)} >= 1"
            )


def add_ratios(records: list[dict]) -> None:
    """Speed-ups against the torch-sdpa record of the same length, wall-clock and per CPU second."""
    sdpa = {r["length"]: r for r in records if r["impl"] == "torch-sdpa"}
    for rec in records:
        base = sdpa.get(rec["length"])
        rec["speedup_vs_sdpa"] = base["latency_s"] / rec["latency_s"] if base else None
        # the same ratio in CPU seconds per call (robust to other load on the machine)
        rec["cpu_speedup_vs_sdpa"] = (
            rec["gflops_cpu"] / rec["flops"] / (base["gflops_cpu"] / base["flops"]) if base else None
        )


def isolated(argv: list[str], impls: list[str]) -> list[dict]:
    """Run this script once per implementation (same seed, so the same inputs) and merge the records."""
    import subprocess
    import tempfile

    passed = [a for a in argv if a != "--isolate"]
    drop = {"--impls", "--json"}
    keep = [a for i, a in enumerate(passed) if a not in drop and (i == 0 or passed[i - 1] not in drop)]
    keep = [a for a in keep if not a.startswith(("--impls=", "--json="))]
    records: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="edgeattn-kernels-") as tmp:
        for impl in impls:
            path = Path(tmp) / f"{impl}.json"
            print(f"[isolate] {impl} in its own process ...", flush=True)
            cmd = [sys.executable, __file__, *keep, "--impls", impl, "--json", str(path)]
            done = subprocess.run(cmd, stdout=subprocess.DEVNULL, check=False)
            if done.returncode != 0:
                raise SystemExit(f"the {impl} run failed (exit {done.returncode}): {' '.join(cmd)}")
            records += json.loads(path.read_text())["records"]
    order = {i: n for n, i in enumerate(IMPLS)}
    records.sort(key=lambda r: (r["length"], order[r["impl"]]))
    add_ratios(records)
    return records


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    threads = C.set_threads(args.threads)  # before TVM starts its thread pool
    if args.isolate and args.pairs:
        raise SystemExit("--pairs times dense and SDPA in one process; it cannot be combined with --isolate")
    if args.isolate:
        impls = [x for x in args.impls.split(",") if x]
        records = isolated(argv, impls)
        print(C.header("Summary (each implementation timed in its own process)", threads))
        print(C.table(records, COLUMNS))
        _print_dhsa_lines(records)
        if args.json:
            C.write_json(args.json, records, meta=dict(threads=threads, isolate=True, argv=argv))
            print(f"wrote {args.json}")
        return 0

    import torch

    lengths = [1024, 4096] if args.quick else [int(x) for x in args.lengths.split(",") if x]
    bench = Bench(args, threads)
    print(
        C.header(
            f"Attention kernels, Hq={HQ} Hkv={HKV} D={D}, causal prefill, DHSA budget {args.budget}, "
            f"chunk {args.chunk_size}, sinks {SINKS}, observation window {args.observe}",
            threads,
        )
    )
    print(f"TVM target: {bench.target} (kernels compiled in {bench.compile_s:.1f}s, once for every length)")
    print(f"TVM schedules: dense {bench.dense_k.schedule_source}, DHSA {bench.sparse_k.schedule_source}")
    bench.warm_up()
    records: list[dict] = []
    gen = torch.Generator().manual_seed(args.seed)
    for length in lengths:
        new = bench.length(length, gen)
        lines = C.table(new, COLUMNS).splitlines()
        print("\n".join(lines if not records else lines[2:]), flush=True)
        records.extend(new)

    print()
    print(C.header("Summary", threads))
    print(C.table(records, COLUMNS))
    _print_dhsa_lines(records)
    _print_pair_lines(records)
    if args.json:
        meta = dict(threads=threads, target=str(bench.target), lengths=lengths, budget=args.budget)
        meta["schedules"] = {"tvm-dense": bench.dense_k.schedule_source, "tvm-dhsa": bench.sparse_k.schedule_source}
        C.write_json(args.json, records, meta=dict(meta, compile_s=bench.compile_s, argv=sys.argv[1:]))
        print(f"wrote {args.json}")
    return 0


def _print_dhsa_lines(records: list[dict]) -> None:
    for r in records:
        if r["impl"] == "tvm-dhsa" and r.get("speedup_vs_sdpa"):
            print(
                f"L={r['length']}: TVM DHSA {r['speedup_vs_sdpa']:.1f}x SDPA wall-clock "
                f"({r['cpu_speedup_vs_sdpa']:.1f}x in CPU seconds), selection "
                f"{100 * r['select_frac']:.1f}% of DHSA time, keeps {100 * r['kept_fraction']:.1f}% "
                "of the causal scores"
            )


COLUMNS = [
    ("impl", "implementation"),
    ("length", "L"),
    ("latency_s", "latency s"),
    ("select_s", "select s"),
    ("gflops", "GFLOP/s"),
    ("speedup_vs_sdpa", "x SDPA"),
    ("gflops_cpu", "GFLOP/cpu-s"),
    ("cpu_speedup_vs_sdpa", "x SDPA cpu-s"),
    ("cpu_util", "CPU util"),
    ("peak_extra_mib", "peak extra MiB"),
    ("rel_err", "rel err"),
    ("schedule", "schedule"),
]

if __name__ == "__main__":
    sys.exit(main())
