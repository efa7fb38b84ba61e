"""Does adaptive chunking keep more of the dense attention than fixed chunks?  And what does it cost?

For the default model on real text (held-out pydoc prose by default, or a
``--haystack`` folder of .txt files), this captures the queries and keys of
every global layer, and for each boundary source (fixed, shift rule, trained
predictor) and each token budget measures the **attention mass kept**: the
dense softmax weight that falls on the keys DHSA keeps, summed per query and
averaged over queries and heads (1.0 = DHSA sees everything dense attention
uses).  As a control it also runs fixed chunks whose length matches each
adaptive source's mean chunk length, since shorter chunks alone help.

Cost: boundary computation time per layer next to the time of that layer's
attention (dense SDPA, the fastest attention here, so the ratio is an upper bound).

    python benchmarks/chunking.py                      # L=2048, budgets 256/512/1024
    python benchmarks/chunking.py --lengths 2048,4096 --haystack /work/shared/data/PaulGrahamEssays --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from edgeattn import calibrate, chunking, dhsa, models, text
from edgeattn.config import DEFAULT_CHUNK_SIZE, AttentionConfig
from edgeattn.coverage import SCORINGS, dense_probs, kept_mass
from edgeattn.runtime.measure import cpu_model

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

# The calibration data are the first 16 x 1023 tokens of the pydoc text; start well after them.
PYDOC_OFFSET = 50_000


def run(args: argparse.Namespace) -> dict[str, Any]:
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    torch.set_num_threads(args.threads)
    loaded = models.load(args.model)
    tok = loaded.tokenizer
    if args.haystack:
        source, source_name, offset = text.haystack_dir(args.haystack), str(args.haystack), args.offset or 0
    else:
        source, source_name = text.pydoc_text(), "pydoc_data.topics (held out from calibration)"
        offset = PYDOC_OFFSET if args.offset is None else args.offset
    body = tok(source, add_special_tokens=False).input_ids
    layers = models.global_layers(loaded.config)
    base = AttentionConfig(
        kind="dhsa",
        budget=max(args.budgets),
        chunk_size=args.chunk_size,
        sinks=args.sinks,
        min_chunk=args.min_chunk,
        max_chunk=args.max_chunk,
    )
    sources: dict[str, Any] = {
        "shift": chunking.boundary_fn_for(base.with_(chunking="shift"), loaded),
        "predictor": chunking.boundary_fn_for(base.with_(chunking="predictor"), loaded, predictor=args.predictor),
    }
    rows: list[dict[str, Any]] = []
    timing: list[dict[str, Any]] = []
    for length in args.lengths:
        need = length - 1
        if offset + need > len(body):
            raise SystemExit(f"the text has {len(body)} tokens; --offset {offset} + {length} does not fit")
        ids = [tok.bos_token_id] + body[offset : offset + need]
        t0 = time.perf_counter()
        store = calibrate.capture(loaded.model, ids, layers, with_queries=True)
        print(f"[bench] L={length}: captured q/k in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        for layer in layers:
            q, k, scaling = store[layer]["q"], store[layer]["k"], store[layer]["scaling"]
            v = torch.randn_like(k)
            bounds = {"fixed": dhsa.fixed_boundaries(length, args.chunk_size)}
            for name, fn in sources.items():
                bounds[name] = fn(k, None)
                mean_len = length / (len(bounds[name]) - 1)
                bounds[f"fixed@{name}"] = dhsa.fixed_boundaries(length, max(1, round(mean_len)))
            attn_s = C.median(
                C.time_it(
                    lambda q=q, k=k, v=v, sc=scaling: F.scaled_dot_product_attention(
                        q, k, v, is_causal=True, scale=sc, enable_gqa=True
                    ),
                    args.reps,
                )
            )
            dhsa_cfg = base.with_(budget=min(args.budgets))
            dhsa_s = C.median(
                C.time_it(lambda q=q, k=k, v=v, c=dhsa_cfg, sc=scaling: dhsa.attention(q, k, v, c, scaling=sc))
            )
            for name, fn in sources.items():
                bt = C.median(C.time_it(lambda fn=fn, k=k: fn(k, None), args.reps))
                timing.append(
                    {
                        "length": length,
                        "layer": layer,
                        "source": name,
                        "boundary_ms": bt * 1e3,
                        "dense_attention_ms": attn_s * 1e3,
                        "dhsa_reference_ms": dhsa_s * 1e3,
                    }
                )
            probs = dense_probs(q, k, scaling)  # shared by every source, budget and scoring below
            for budget in args.budgets:
                for name, b in bounds.items():
                    cfg = base.with_(budget=budget, chunk_size=args.chunk_size)
                    if name.startswith("fixed@"):
                        cfg = cfg.with_(chunk_size=int(b[1] - b[0]))
                    row = {"length": length, "layer": layer, "budget": budget, "source": name, "chunks": len(b) - 1}
                    row["mass"] = kept_mass(q, k, scaling, cfg, b, probs=probs)
                    for scoring in args.diagnostics:
                        row[f"mass_{scoring}"] = kept_mass(q, k, scaling, cfg, b, scoring, probs=probs)
                    rows.append(row)
            print(f"[bench] L={length} layer {layer} done", file=sys.stderr, flush=True)
    return {
        "load_average_at_start": load_at_start,
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "model": loaded.name,
        "text": source_name,
        "offset": offset,
        "layers": layers,
        "config": {
            "chunk_size": args.chunk_size,
            "min_chunk": args.min_chunk,
            "max_chunk": args.max_chunk,
            "sinks": args.sinks,
        },
        "mass": rows,
        "timing": timing,
    }


def table(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        f"CPU {result['cpu']} | {result['threads']} threads | load average at start "
        f"{result['load_average_at_start']} | model {result['model']} | text {result['text']}",
        f"global layers {result['layers']} | fixed chunk {cfg['chunk_size']} | adaptive chunks in "
        f"[{cfg['min_chunk']}, {cfg['max_chunk']}] | sinks {cfg['sinks']}",
        "",
        "attention mass kept (mean over layers, queries, heads; 1.0 = all of dense)",
    ]
    budgets = sorted({r["budget"] for r in result["mass"]})
    order = ["fixed", "shift", "predictor", "fixed@shift", "fixed@predictor"]
    metrics = [("mass", "")]
    notes = {
        "uncentred": " [diagnostic: sqrt(len) pooling without DHSA's centring term]",
        "plain-mean": " [diagnostic: plain-mean chunk pooling (block-sparse's), not DHSA's]",
    }
    for scoring, note in notes.items():
        if any(f"mass_{scoring}" in r for r in result["mass"]):
            metrics.append((f"mass_{scoring}", note))
    for (metric, note), length in [(m, n) for m in metrics for n in sorted({r["length"] for r in result["mass"]})]:
        lines.append("")
        lines.append(f"L = {length}{note}")
        lines.append(f"{'source':<17}{'mean chunk':>11}" + "".join(f"{'N_b=' + str(b):>11}" for b in budgets))
        for src in order:
            sel = [r for r in result["mass"] if r["length"] == length and r["source"] == src]
            if not sel:
                continue
            chunks = statistics.mean(r["chunks"] for r in sel if r["budget"] == budgets[0])
            cells = "".join(f"{statistics.mean(r[metric] for r in sel if r['budget'] == b):>11.4f}" for b in budgets)
            lines.append(f"{src:<17}{length / chunks:>11.1f}{cells}")
    lines.append("")
    lines.append("boundary time per layer (median), next to that layer's attention")
    lines.append(
        f"{'L':>6}{'source':>11}{'boundary ms':>13}{'dense SDPA ms':>15}{'ratio':>8}{'DHSA ref ms':>13}{'ratio':>8}"
    )
    for length in sorted({t["length"] for t in result["timing"]}):
        for src in ("shift", "predictor"):
            sel = [t for t in result["timing"] if t["length"] == length and t["source"] == src]
            b = statistics.mean(t["boundary_ms"] for t in sel)
            a = statistics.mean(t["dense_attention_ms"] for t in sel)
            d = statistics.mean(t["dhsa_reference_ms"] for t in sel)
            lines.append(f"{length:>6}{src:>11}{b:>13.2f}{a:>15.2f}{b / a:>8.1%}{d:>13.1f}{b / d:>8.1%}")
    return "\n".join(lines)


def _diagnostics(value: str) -> list[str]:
    names = [x for x in value.split(",") if x]
    unknown = [x for x in names if x not in SCORINGS or x == "dhsa"]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown diagnostic {unknown[0]!r}; choose from uncentred, plain-mean")
    return names


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model spec (default: the built-in gemma3-270m)")
    p.add_argument("--haystack", type=Path, default=None, help="folder of .txt files instead of pydoc prose")
    p.add_argument("--offset", type=int, default=None, help="first token of the text to use")
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[2048])
    p.add_argument("--budgets", type=lambda s: [int(x) for x in s.split(",")], default=[256, 512, 1024])
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    p.add_argument("--min-chunk", type=int, default=8)
    p.add_argument("--max-chunk", type=int, default=64)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--predictor", type=Path, default=None, help="predictor file (default: the one for the model)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument(
        "--diagnostics",
        type=_diagnostics,
        default=[],
        help="also score chunks these other ways: uncentred (sqrt(len) pooling of raw keys), plain-mean",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = p.parse_args(argv)
    result = run(args)
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
