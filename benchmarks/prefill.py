"""End-to-end prefill of the default model: transformers as shipped, dense on our kernels, DHSA, per backend.

Every (row, length) runs in its own child process -- the same `edgeattn run`
machinery (``edgeattn.runtime.host``), one row at a time -- so each peak RSS is
that run's alone and no row inherits another's allocator state.  Per length the
table also gives the FLOPs of dense and DHSA prefill (GEMMs + attention) and
their ratio: the most a sparse global layer can buy when the MLPs stay dense.

    python benchmarks/prefill.py --lengths 4K,8K,16K,32K --json benchmarks/results/prefill.json
    python benchmarks/prefill.py --lengths 16K --rows transformers,torch-dense,torch-dhsa
    python benchmarks/prefill.py --lengths 8K --rows torch-dense,torch-dense-unfused   # the fused elementwise ops
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from edgeattn.config import DEFAULT_BUDGET, DEFAULT_CHUNK_SIZE, parse_token_counts

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model, header, set_threads, table, write_json  # noqa: E402

# row name -> (backend, attention, kernels); "transformers" is the model as shipped
ROWS: dict[str, tuple[str, str, str]] = {
    "transformers": ("transformers", "dense", "sdpa"),
    "torch-dense": ("torch", "dense", "tvm"),
    "torch-dhsa": ("torch", "dhsa", "tvm"),
    "torch-dhsa-ref": ("torch", "dhsa", "reference"),
    "ort-dense": ("ort", "dense", "tvm"),
    "ort-gqa": ("ort", "dense", "gqa"),  # ORT's own best dense: GroupQueryAttention in every layer
    "ort-dhsa": ("ort", "dhsa", "tvm"),
    "tvm-dense": ("tvm", "dense", "tvm"),
    "tvm-dhsa": ("tvm", "dhsa", "tvm"),
    # the torch backend with transformers' own elementwise ops (EDGEATTN_FUSED_OPS=0): what fusing them buys
    "torch-dense-unfused": ("torch", "dense", "tvm"),
    "torch-dhsa-unfused": ("torch", "dhsa", "tvm"),
}
DEFAULT_ROWS = "transformers,torch-dense,torch-dhsa,ort-gqa,ort-dense,ort-dhsa"

COLUMNS = [
    ("length", "tokens"),
    ("row", "row"),
    ("prefill_s", "prefill s"),
    ("tok_s", "tok/s"),
    ("vs_shipped", "x transformers"),
    ("vs_dense", "x dense (same backend)"),
    ("flop_ratio", "dense/DHSA FLOPs"),
    ("of_flop_ratio", "speed-up / FLOP ratio"),
    ("cpu_vs_shipped", "x transformers (CPU s)"),
    ("cpu_vs_dense", "x dense (CPU s)"),
    ("utilisation", "CPU util"),
    ("peak_rss_mib", "peak RSS MiB"),
    ("planned_peak_mib", "planned MiB"),
]


PROFILE_COLUMNS = [
    ("attention_global_s", "global attn s"),
    ("attention_sliding_s", "sliding attn s"),
    ("mlp_s", "MLP s"),
    ("other_s", "other s"),
]


def time_modules(loaded: Any, length: int) -> dict[str, float]:
    """Wall seconds of the prompt's prefill per module class (global / sliding attention, MLP), filled in
    as it runs: forward hooks that count only calls over ``length`` tokens (not the warm-up, not decode).

    Why: the speed-up's gap to the FLOP ratio is a question of where the time goes.  Torch rows only.
    """
    from edgeattn import models

    sparse = set(models.global_layers(loaded.config))
    totals: dict[str, float] = {}
    started: dict[int, float] = {}

    def tokens(a: tuple, kw: dict) -> int:
        x = kw.get("hidden_states", a[0] if a else None)
        return int(x.shape[-2]) if x is not None and x.dim() >= 2 else 0

    def watch(module: Any, name: str) -> None:
        def pre(m: Any, a: tuple, kw: dict) -> None:
            if tokens(a, kw) == length:
                started[id(m)] = time.perf_counter()

        def post(m: Any, a: tuple, kw: dict, out: Any) -> None:
            t0 = started.pop(id(m), None)
            if t0 is not None:
                totals[name] = totals.get(name, 0.0) + time.perf_counter() - t0

        module.register_forward_pre_hook(pre, with_kwargs=True)
        module.register_forward_hook(post, with_kwargs=True)

    for i, layer in enumerate(loaded.model.model.layers):
        watch(layer.self_attn, "attention_global_s" if i in sparse else "attention_sliding_s")
        watch(layer.mlp, "mlp_s")
    return totals


def run_child(row: str, length: int, args: argparse.Namespace) -> dict[str, Any]:
    """One (row, length) in this process: what the parent's child process prints as JSON."""
    set_threads(args.threads)
    if row.endswith("-unfused"):
        from edgeattn import fused_ops

        os.environ[fused_ops.ENV_SWITCH] = "0"
    from edgeattn import models
    from edgeattn.config import AttentionConfig
    from edgeattn.runtime.flops import prefill_flops
    from edgeattn.runtime.host import RunRequest, run_on_host

    backend, attention, kernels = ROWS[row]
    cfg = AttentionConfig(kind=attention, budget=args.budget, chunk_size=args.chunk_size)  # type: ignore[arg-type]
    loaded = models.load()
    # at the model's whole context (32K) the prompt leaves room for the decoded tokens, as in `edgeattn bench`
    context = int(getattr(loaded.config, "max_position_embeddings", 0) or 0)
    requested, length = length, min(length, context - args.new_tokens) if context else length
    req = RunRequest(
        configs=[] if backend == "transformers" else [cfg],
        synthetic_length=length,
        max_new_tokens=args.new_tokens,
        threads=args.threads,
        backends=[] if backend == "transformers" else [backend],
        kernels="tvm" if kernels in ("sdpa", "gqa") else kernels,
        shipped_baseline=backend == "transformers",
        ort_dense_op="gqa" if kernels == "gqa" else None,
    )
    modules = time_modules(loaded, length) if args.profile and backend in ("torch", "transformers") else None
    _, (res,) = run_on_host(req, loaded=loaded)
    sparse = models.global_layers(loaded.config) if attention != "dense" else []
    flops = prefill_flops(loaded.config, length, sparse, args.budget if sparse else None)
    return {
        "row": row,
        "backend": res.backend,
        "attention": res.attention,
        "kernels": res.kernels,
        "length": length,
        "requested_length": requested,
        "prefill_s": res.prefill_s,
        "prefill_cpu_s": res.prefill_cpu_s,
        "tok_s": res.tok_s,
        "decode_tok_s": res.decode_tok_s,
        "peak_rss_mib": res.peak_rss_mib,
        "planned_peak_mib": res.planned_peak_mib,
        "flops": flops["total"],
        "flops_gemm": flops["gemm"],
        "flops_attention": flops["attention"],
        "threads": args.threads,
        "cpu": cpu_model(),
        "budget": args.budget if sparse else None,
        "chunk_size": args.chunk_size if sparse else None,
        "first_token": res.token_ids[0] if res.token_ids else None,
        **(
            {**modules, "other_s": res.prefill_s - sum(modules.values())} if modules else {}
        ),  # --profile: where the prefill's time went
    }


def run_isolated(row: str, length: int, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", f"{row}:{length}", "--threads", str(args.threads)]
    cmd += ["--budget", str(args.budget), "--chunk-size", str(args.chunk_size), "--new-tokens", str(args.new_tokens)]
    cmd += ["--profile"] if args.profile else []
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"row": row, "length": length, "error": " / ".join(tail) or f"exit {proc.returncode}"}
    rec = json.loads(lines[-1])
    rec["wall_s"] = time.perf_counter() - t0
    return rec


def add_ratios(records: list[dict[str, Any]]) -> None:
    """Speed-ups against the model as shipped and against dense on the same backend, same length."""
    by = {(r["length"], r["row"]): r for r in records if "error" not in r}
    for r in records:
        if "error" in r:
            continue
        shipped = by.get((r["length"], "transformers"))
        twin = r["row"].replace("-dhsa", "-dense")  # torch-dhsa-unfused -> torch-dense-unfused
        dense = by.get((r["length"], twin)) or by.get((r["length"], f"{r['backend']}-dense"))
        r["vs_shipped"] = shipped["prefill_s"] / r["prefill_s"] if shipped else None
        r["vs_dense"] = dense["prefill_s"] / r["prefill_s"] if dense and r["attention"] != "dense" else None
        # the same ratios in CPU seconds: what holds when other work shares the machine
        r["cpu_vs_shipped"] = shipped["prefill_cpu_s"] / r["prefill_cpu_s"] if shipped else None
        r["cpu_vs_dense"] = dense["prefill_cpu_s"] / r["prefill_cpu_s"] if r.get("vs_dense") else None
        r["utilisation"] = r["prefill_cpu_s"] / (r["prefill_s"] * r["threads"])
        if dense and r["attention"] != "dense":
            r["flop_ratio"] = dense["flops"] / r["flops"]
            r["of_flop_ratio"] = r["vs_dense"] / r["flop_ratio"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="4K,8K,16K,32K", help="prompt lengths (K = 1024)")
    p.add_argument("--rows", default=DEFAULT_ROWS, help=f"comma list of {', '.join(ROWS)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget", type=int, default=DEFAULT_BUDGET, help="DHSA budget N_b")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="DHSA chunk length")
    p.add_argument("--new-tokens", type=int, default=4, help="greedy tokens after the prefill (decode is timed too)")
    p.add_argument("--json", metavar="PATH", help="write the records here")
    p.add_argument(
        "--profile",
        action="store_true",
        help="torch rows: also time the prefill per module class (global / sliding attention, MLPs, other)",
    )
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        row, length = args.child.split(":")
        print(json.dumps(run_child(row, int(length), args)))
        return 0
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        p.error(f"unknown rows {bad}; choose from {', '.join(ROWS)}")
    print(header("End-to-end prefill, Gemma 3 270M (fp32), each row in its own process", args.threads), flush=True)
    records = []
    for length in parse_token_counts(args.lengths):
        for row in rows:
            rec = run_isolated(row, length, args)
            records.append(rec)
            status = rec.get("error") or f"{rec['prefill_s']:.2f} s, peak {rec['peak_rss_mib']:.0f} MiB"
            print(f"  {row} @ {length}: {status}", file=sys.stderr, flush=True)
    add_ratios(records)
    shown = [
        {**r, "peak_rss_mib": round(r["peak_rss_mib"]), "planned_peak_mib": round(r["planned_peak_mib"])}
        for r in records
        if "error" not in r
    ]
    print(table(shown, COLUMNS + (PROFILE_COLUMNS if args.profile else [])))
    for r in records:
        if "error" in r:
            print(f"{r['row']} @ {r['length']}: failed: {r['error']}")
    if args.json:
        write_json(args.json, records, {"threads": args.threads, "command": " ".join(sys.argv)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
