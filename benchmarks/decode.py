"""Per-token decode of the default model at long contexts: dense vs DHSA on the incremental chunk index.

For each context the KV cache is built once (a dense prefill of real prose on our kernels, in
chunks), then every row decodes from a copy of that same cache, so rows differ only in how a step
attends.  Per context and kernel family (``tvm``: our TIR kernels; ``reference``: the PyTorch
reference / SDPA) it measures:

* **end to end**: the median wall time of one whole-model decode step (``TorchSession.append``),
  dense vs DHSA, and the bytes such a step must read -- the weights once (Gemma's tied embedding
  counted once: the LM head reads it) plus the K/V entries its attention reads (dense: every cached
  key of a global layer, the window in a sliding layer; DHSA: the kept keys, measured from the
  selection, plus the index's chunk representations).  A decode step is memory-bound, so the
  target is DHSA tok/s / dense tok/s >= 0.85 x (dense bytes / DHSA bytes);
* **attention only**, on one global layer's real cached K/V: dense decode attention vs a DHSA
  step (index update for one token + selection + sparse attention); target >= 8x at 32K.
  For ``tvm`` the attention part of that step (the sparse decode kernel reading the kept chunk
  ranges in place) beside the alternative the index could feed: gather the kept keys and run
  the dense decode kernel on them (``gather+dense``), to show which is faster;
* the **index share**: index update + selection time as a share of the DHSA step (target <= 10 %).

    nice -n 5 python benchmarks/decode.py --contexts 4K,16K,32K --json benchmarks/results/decode_4k_32k.json

Figures are ratios measured side by side in one process, dense and DHSA steps interleaved (the
machine is shared); the machine is named in the header.  The torch backend's sessions keep K/V
in runtime/kv_cache.py's in-place layers, so no step pays transformers' whole-cache torch.cat.
The ort and tvm backends have no index yet (their exported decode re-chunks), so no rows here.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from edgeattn.config import DEFAULT_BUDGET, DEFAULT_CHUNK_SIZE, DEFAULT_OBSERVE, parse_token_counts
from edgeattn.runtime.threads import one_torch_thread

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, set_threads, table, time_it, write_json  # noqa: E402

COLUMNS = [
    ("context", "context"),
    ("kernels", "kernels"),
    ("dense_ms", "dense step ms"),
    ("dhsa_ms", "DHSA step ms"),
    ("speedup", "DHSA/dense tok/s"),
    ("dense_mb", "dense MB read"),
    ("dhsa_mb", "DHSA MB read"),
    ("bytes_ratio", "bytes ratio"),
    ("of_target", "tok/s ratio / (0.85 x bytes)"),
    ("index_share", "index+select share"),
    ("attn_dense_ms", "attn dense ms"),
    ("attn_dhsa_ms", "attn DHSA ms"),
    ("attn_ratio", "attn dense/DHSA"),
    ("attn_sparse_ms", "of which sparse kernel ms"),
    ("attn_gather_ms", "gather+dense kernel ms"),
]


def weight_bytes(model: Any) -> int:
    """Bytes of every parameter once (tied tensors once): what a decode step reads of the weights."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def kv_bytes(config: Any, layers_global: list[int], context: int, elem: int) -> tuple[int, int]:
    """K/V bytes a dense decode step reads: (all global layers, all sliding layers)."""
    per_token = 2 * config.num_key_value_heads * config.head_dim * elem
    window = getattr(config, "sliding_window", None) or context
    n_global = len(layers_global)
    n_sliding = config.num_hidden_layers - n_global
    return n_global * per_token * context, n_sliding * per_token * min(context, window)


def prefill_cache(loaded: Any, ids: list[int], chunk: int) -> tuple[Any, int]:
    """The KV cache of ``ids`` from a dense prefill on our kernels, in chunks (bounded activations)."""
    from edgeattn.config import AttentionConfig
    from edgeattn.runtime.torch_backend import TorchSession

    s = TorchSession(loaded, AttentionConfig(kind="dense"), kernels="tvm")
    logits = None
    for start in range(0, len(ids), chunk):
        logits = s.append(ids[start : start + chunk])
    cache = s.past().cache
    return cache, int(logits.argmax())


def session_on(loaded: Any, cfg: Any, kernels: str, cache: Any, context: int) -> Any:
    """A TorchSession resumed on a private copy of ``cache`` (DHSA: chunk index built from its keys)."""
    from edgeattn import chunk_index as ci
    from edgeattn.runtime.torch_backend import TorchSession

    s = TorchSession(loaded, cfg, kernels=kernels)
    mine = copy.deepcopy(cache)
    index = s._new_index()
    if index is not None:
        for i in s.layers:
            index.layers[i] = ci.ChunkIndex.build(mine.layers[i].keys, index.rule, cfg.kind == "dhsa")
    s.resume(ci.PastState(mine, index, context, s._signature()))
    return s


def decode_steps(sessions: dict[str, Any], first: int, steps: int, warmup: int) -> dict[str, list[float]]:
    """Per-step wall times of ``steps`` greedy steps (after ``warmup``) of each session, interleaved
    step by step, so that every row sees the same load on a shared machine."""
    tokens = dict.fromkeys(sessions, first)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for i in range(warmup + steps):
        for name, s in sessions.items():
            if i == warmup and s.index is not None:
                s.index.update_s = s.index.attend_s = 0.0
            t0 = time.perf_counter()
            tokens[name] = int(s.append([tokens[name]]).argmax())
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def kept_kv_bytes(s: Any, cfg: Any, config: Any, elem: int) -> tuple[int, int]:
    """K/V bytes the DHSA step read in its sparse layers (kept keys + index k̄, + every key with an
    observation window, whose q·K pass reads them all) and the kept-key count."""
    from edgeattn import chunk_index as ci

    total, kept_max = 0, 0
    g = config.num_attention_heads // config.num_key_value_heads
    for idx in s.index.layers.values():
        q = torch.zeros(1, config.num_attention_heads, 1, config.head_dim)
        q[:, :, 0] = idx.kbar()[:, :, -1].repeat_interleave(g, 1)  # a query like the recent keys
        sel = idx.select(q, cfg.with_(observe=0))  # the kept count; the window changes which chunks, not how many
        for h in range(config.num_key_value_heads):
            kept = ci.kept_positions(sel, idx, 0, h, cfg.sinks).numel()
            kept_max = max(kept_max, kept)
            total += 2 * kept * config.head_dim * elem + idx.closed * config.head_dim * 4
            if cfg.vertical_tokens:
                total += idx.length * config.head_dim * elem
    return total, kept_max


def attention_only(k: torch.Tensor, v: torch.Tensor, cfg: Any, kernels: str, reps: int) -> dict[str, float]:
    """One layer's decode attention on cached K/V [1, Hkv, L, D]: dense vs DHSA (update + select + attend)."""
    from edgeattn import chunk_index as ci
    from edgeattn import dhsa
    from edgeattn.config import AttentionConfig
    from edgeattn.kernels_tvm import registry

    _, hkv, length, d = k.shape
    hq = 4 * hkv
    g = torch.Generator().manual_seed(0)
    q = (k[:, :, -1:].repeat_interleave(hq // hkv, 1) + 0.3 * torch.randn(1, hq, 1, d, generator=g)).contiguous()
    scale = 1.0 / d**0.5
    if kernels == "tvm":
        dense_fn = lambda: registry.run_layer(q, k, v, AttentionConfig(kind="dense"), scaling=scale)  # noqa: E731
    else:
        dense_fn = lambda: dhsa.dense_attention(q, k, v, scale)  # noqa: E731
    # DHSA: the index holds L - reps - 3 keys; each timed call appends one key, selects, attends.
    # Dense and DHSA calls alternate, so both see the same load.
    base = length - reps - 3
    idx = ci.ChunkIndex.build(k[:, :, :base], ci.FixedRule(cfg.chunk_size))
    dense_times, times, attend, gather = [], [], [], []
    for i in range(reps + 2):
        n = base + i + 1
        kn, vn = k[:, :, :n], v[:, :, :n]
        dense_t = time_it(dense_fn)[0]
        t0 = time.perf_counter()
        with one_torch_thread():  # as IndexState.attend runs it
            idx.append(kn)
            sel = idx.select(q, cfg, kn)
            ta = time.perf_counter()
            if kernels == "tvm":
                ci.attend_tvm(q, kn, vn, idx, sel, cfg, scale)
            else:
                ci.attend_reference(q, kn, vn, sel, idx, cfg.sinks, scale)
        t1 = time.perf_counter()
        if kernels == "tvm":  # the alternative: gather the kept keys, dense decode kernel on them
            with one_torch_thread():
                pos = ci.kept_positions(sel, idx, 0, 0, cfg.sinks)
                kg, vg = kn[:, :, pos].contiguous(), vn[:, :, pos].contiguous()
            registry.run_layer(q, kg, vg, AttentionConfig(kind="dense"), scaling=scale)
            t2 = time.perf_counter()
            if i >= 2:
                gather.append(t2 - t1)
        if i >= 2:
            times.append(t1 - t0)
            attend.append(t1 - ta)
            dense_times.append(dense_t)
    dense_s = statistics.median(dense_times)
    dhsa_s = statistics.median(times)
    return {
        "attn_dense_ms": dense_s * 1e3,
        "attn_dhsa_ms": dhsa_s * 1e3,
        "attn_ratio": dense_s / dhsa_s,
        "attn_sparse_ms": statistics.median(attend) * 1e3,  # the attention part of the DHSA call
        "attn_gather_ms": statistics.median(gather) * 1e3 if gather else None,  # its alternative
    }


def synthetic(args: argparse.Namespace, argv: list[str] | None) -> int:
    """The attention-only rows on random keys (with a shared component, as real keys have)."""
    from edgeattn.config import AttentionConfig

    cfg = AttentionConfig(kind="dhsa", budget=args.budget, chunk_size=args.chunk_size, observe=args.observe)
    print(header(f"Decode attention, synthetic K/V: dense vs DHSA (budget {args.budget})", args.threads))
    records = []
    g = torch.Generator().manual_seed(0)
    for context in parse_token_counts(args.contexts):
        k = torch.randn(1, 1, context, 256, generator=g) + torch.randn(256, generator=g)
        v = torch.randn(1, 1, context, 256, generator=g)
        for kernels in [x.strip() for x in args.kernels.split(",") if x.strip()]:
            rec = {"context": context, "kernels": kernels, "kv": "synthetic"}
            rec.update(attention_only(k, v, cfg, kernels, args.attn_reps))
            records.append(rec)
            print(table([rec], [c for c in COLUMNS if c[0] in rec]), flush=True)
    if args.json:
        meta = {"threads": args.threads, "budget": args.budget, "chunk_size": args.chunk_size, "kv": "synthetic"}
        meta["observe"] = args.observe
        meta["command"] = "benchmarks/decode.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_json(args.json, records, meta)
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--contexts", default="4K,16K,32K", help="cached tokens before the timed steps, e.g. 4K,16K,32K")
    ap.add_argument("--budget", type=int, default=DEFAULT_BUDGET)
    ap.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    ap.add_argument(
        "--observe",
        type=int,
        default=DEFAULT_OBSERVE,
        help="DHSA observation window (0: the paper's selection; a step's window is its one query, whose q·K "
        "pass over the whole cache it adds)",
    )
    ap.add_argument("--kernels", default="tvm,reference", help="comma list of tvm, reference")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12, help="timed decode steps per row (median reported)")
    ap.add_argument("--attn-reps", type=int, default=20, help="timed attention-only calls")
    ap.add_argument("--prefill-chunk", type=int, default=4096, help="tokens per prefill call building the cache")
    ap.add_argument("--json", type=Path, default=None, help="write the records here (atomically)")
    ap.add_argument(
        "--synthetic-kv",
        action="store_true",
        help="attention only, on random K/V of Gemma 3 270M's shape (1 KV head, D 256): seconds, no model",
    )
    args = ap.parse_args(argv)
    set_threads(args.threads)
    if args.synthetic_kv:
        return synthetic(args, argv)
    from edgeattn import models, text
    from edgeattn.config import AttentionConfig

    contexts = parse_token_counts(args.contexts)
    kernel_list = [x.strip() for x in args.kernels.split(",") if x.strip()]
    loaded = models.load()
    config = loaded.model.config
    dense_cfg = AttentionConfig(kind="dense")
    dhsa_cfg = AttentionConfig(kind="dhsa", budget=args.budget, chunk_size=args.chunk_size, observe=args.observe)
    gl = models.global_layers(config)
    elem = next(loaded.model.parameters()).element_size()
    wbytes = weight_bytes(loaded.model)
    print(
        header(
            f"Decode step of {loaded.name}: dense vs DHSA (budget {args.budget}, chunk {args.chunk_size})", args.threads
        )
    )
    print(f"weights {wbytes / 1e6:.0f} MB ({next(loaded.model.parameters()).dtype}); global layers {gl}")
    records: list[dict[str, Any]] = []
    meta = {
        "threads": args.threads,
        "model": loaded.name,
        "budget": args.budget,
        "chunk_size": args.chunk_size,
        "observe": args.observe,
        "weights_bytes": wbytes,
        "command": "benchmarks/decode.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    for context in contexts:
        ids = text.token_ids(loaded.tokenizer, context)
        t0 = time.perf_counter()
        cache, first = prefill_cache(loaded, ids, args.prefill_chunk)
        print(f"[{context}] cache built by dense prefill in {time.perf_counter() - t0:.0f} s", flush=True)
        for kernels in kernel_list:
            rows = {
                "dense": session_on(loaded, dense_cfg, kernels, cache, context),
                "dhsa": session_on(loaded, dhsa_cfg, kernels, cache, context),
            }
            times = decode_steps(rows, first, args.steps, warmup=2)
            dense_t, dhsa_t = times["dense"], times["dhsa"]
            share = rows["dhsa"].index.update_s / sum(dhsa_t)
            sparse_kv, kept = kept_kv_bytes(rows["dhsa"], dhsa_cfg, config, elem)
            for s in rows.values():
                s.close()
            global_kv, sliding_kv = kv_bytes(config, gl, context, elem)
            dense_bytes = wbytes + sliding_kv + global_kv
            dhsa_bytes = wbytes + sliding_kv + sparse_kv
            dm, sm = statistics.median(dense_t), statistics.median(dhsa_t)
            rec: dict[str, Any] = {
                "context": context,
                "kernels": kernels,
                "dense_ms": dm * 1e3,
                "dhsa_ms": sm * 1e3,
                "speedup": dm / sm,
                "dense_mb": dense_bytes / 1e6,
                "dhsa_mb": dhsa_bytes / 1e6,
                "bytes_ratio": dense_bytes / dhsa_bytes,
                "kept_keys": kept,
                "index_share": share,
                "dense_step_s": dense_t,
                "dhsa_step_s": dhsa_t,
            }
            rec["of_target"] = rec["speedup"] / (0.85 * rec["bytes_ratio"])
            layer = cache.layers[gl[0]]
            rec.update(attention_only(layer.keys, layer.values, dhsa_cfg, kernels, args.attn_reps))
            records.append(rec)
            print(table([rec], COLUMNS), flush=True)
            if args.json:  # after every row: a long run that is stopped keeps what it measured
                write_json(args.json, sorted(records, key=lambda r: r["context"]), meta)
        del cache
    print()
    print(table(sorted(records, key=lambda r: r["context"]), COLUMNS))
    print(
        "\nstep ms: median whole-model decode step; bytes: weights + K/V entries read (DHSA: kept keys + index k̄);"
        "\nof_target >= 1 means DHSA/dense tok/s reaches 0.85x the bytes ratio; attn: one global layer, index"
        "\nupdate + selection + attention for DHSA; index+select share: of the DHSA step (all sparse layers)."
    )
    if args.json:
        write_json(args.json, sorted(records, key=lambda r: r["context"]), meta)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
