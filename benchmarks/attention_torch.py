"""One attention layer of the default model in PyTorch: dense (SDPA) vs DHSA vs block-sparse.

Shape of Gemma 3 270M's global layers: 4 query heads, 1 KV head, head_dim 256,
fp32, causal.  Each (implementation, length) runs in a fresh child process so
its peak RSS is its own.  Only ratios measured in one run compare: the table is
headed by the CPU model and thread count.

    python benchmarks/attention_torch.py                      # 4K, 16K, 64K
    python benchmarks/attention_torch.py --lengths 4096 --json out.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time

from edgeattn.config import DEFAULT_BUDGET, DEFAULT_CHUNK_SIZE

IMPLS = ("dense", "dhsa", "block-sparse")


def _measure(kind: str, length: int, budget: int, chunk: int, sinks: int, threads: int, repeat: int, out) -> None:
    import torch

    from edgeattn import dhsa
    from edgeattn.config import AttentionConfig
    from edgeattn.runtime.measure import PeakRSS

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, length, 256, generator=gen)
    k = torch.randn(1, 1, length, 256, generator=gen)
    v = torch.randn(1, 1, length, 256, generator=gen)
    cfg = AttentionConfig(kind=kind, budget=budget, chunk_size=chunk, sinks=sinks)  # type: ignore[arg-type]
    times = []
    with torch.inference_mode(), PeakRSS() as mem:
        for _ in range(repeat):
            t0 = time.perf_counter()
            dhsa.attention(q, k, v, cfg)
            times.append(time.perf_counter() - t0)
        fraction = 1.0
        if kind != "dense":
            bounds = dhsa.fixed_boundaries(length, chunk)
            _, keep = dhsa.select_for(q, k, cfg, bounds)
            causal = length * (length + 1) // 2
            fraction = dhsa.computed_scores(keep, bounds, length, sinks) / causal
    out.put({"seconds": statistics.median(times), "extra_mib": mem.extra / 2**20, "fraction": fraction})


def measure(kind: str, length: int, args: argparse.Namespace) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    repeat = args.repeat if args.repeat else (3 if length <= 4096 else 1)
    proc = ctx.Process(
        target=_measure, args=(kind, length, args.budget, args.chunk_size, args.sinks, args.threads, repeat, queue)
    )
    proc.start()
    result = queue.get()
    proc.join()
    return {"impl": kind, "length": length, **result}


def main(argv: list[str] | None = None) -> int:
    from edgeattn.runtime.measure import cpu_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="4096,16384,65536", help="comma list of sequence lengths")
    p.add_argument("--budget", type=int, default=DEFAULT_BUDGET, help="DHSA token budget N_b")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=0, help="runs per point (default: 3 up to 4K, else 1)")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--json", dest="json_path", help="write the rows as JSON to this path")
    args = p.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    impls = [x for x in args.impls.split(",") if x]
    header = {
        "benchmark": "attention_torch",
        "cpu": cpu_model(),
        "threads": args.threads,
        "shape": "Hq=4 Hkv=1 D=256 fp32 causal",
        "budget": args.budget,
        "chunk_size": args.chunk_size,
        "sinks": args.sinks,
    }
    print(
        f"# {header['cpu']} | {args.threads} threads | {header['shape']} | budget {args.budget}, "
        f"chunk {args.chunk_size}, sinks {args.sinks}"
    )
    print(f"{'L':>7} {'impl':<13}{'latency s':>11}{'vs SDPA':>9}{'extra MiB':>11}{'scores computed':>17}")
    rows = []
    for length in lengths:
        base = None
        for kind in impls:
            print(f"  ... {kind} at L={length}", file=sys.stderr, flush=True)
            row = measure(kind, length, args)
            base = row["seconds"] if kind == "dense" else base
            row["speedup_vs_sdpa"] = base / row["seconds"] if base else None
            rows.append(row)
            ratio = f"{row['speedup_vs_sdpa']:.2f}x" if row["speedup_vs_sdpa"] else "-"
            print(
                f"{length:>7} {kind:<13}{row['seconds']:>11.3f}{ratio:>9}{row['extra_mib']:>11.0f}"
                f"{row['fraction']:>16.1%}",
                flush=True,
            )
    if args.json_path:
        from edgeattn.atomic import write_text

        write_text(args.json_path, json.dumps({**header, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
