"""`edgeattn eval niah` / `eval passkey`: a length x depth grid per attention mode, scored by exact match.

Each cell prefills its prompt through a :class:`~edgeattn.runtime.torch_backend.TorchSession`
(every attention layer on the TVM kernels by default, the sparse modes on the global layers; the
sliding-window layers keep their window) and decodes greedily until the answer's first number is
complete.  For every sparse cell the q and k of the global layers are captured during that
prefill and :func:`edgeattn.needle.needle_in_selection` records, per layer, the rank of the
fact's chunk by selection score and by dense attention mass and whether the selection kept it:
the "why" of a miss is in the report, not a guess.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from edgeattn.evals import prompts
from edgeattn.evals.grid import GridReport
from edgeattn.evals.modes import Mode, boundary_fn

DEFAULT_MAX_NEW_TOKENS = 12  # a space, 5 digits and what follows, with room to spare


@dataclass
class RetrievalStats:
    evaluated: int = 0
    skipped: int = 0


def cells_of(lengths: list[int], depths: list[float], modes: list[Mode]) -> list[tuple[int, float, Mode]]:
    """Length-major order: a run stopped early has every mode at the shorter lengths."""
    return [(n, d, m) for n in lengths for d in depths for m in modes]


def shared_prefix(modes: list[Mode], length: int) -> int:
    """Tokens every mode of ``modes`` computes exactly as dense attention does (0: nothing to share).

    A query whose chunk ends at or before the budget keeps every earlier key, so up to
    ``floor(budget / chunk) * chunk`` tokens (less the sinks for the window modes, whose band must
    also cover the first chunk) the KV cache of every mode is the dense one, up to rounding.
    Computing that prefix once per prompt and continuing each mode from a copy saves up to
    half of a 4K grid.  Only modes with fixed chunks share it: an adaptive partition may straddle
    the cut, where a chunked prefill would pool the straddling chunk's queries differently.
    """
    if any(m.cfg.kind != "dense" and m.chunking != "fixed" for m in modes):
        raise ValueError("adaptive modes do not share a prefix")
    sparse = [m.cfg for m in modes if m.cfg.kind != "dense"]
    if not sparse:
        return 0
    ends = [(c.budget - (c.sinks if c.local else 0)) // c.chunk_size * c.chunk_size for c in sparse]
    cut = min(ends)
    chunk = max(c.chunk_size for c in sparse)
    last = (length - 1) // chunk * chunk  # leave at least one token to continue with
    return min(cut, last)


def run_grid(
    task_name: str,
    loaded: Any,
    body: list[int],
    lengths: list[int],
    depths: list[float],
    modes: list[Mode],
    report: GridReport,
    *,
    kernels: str,
    seed: int,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    share_prefix: bool = True,
    on_cell: Callable[[dict[str, Any] | None], None] = lambda _c: None,
) -> RetrievalStats:
    """Evaluate every cell ``report`` does not hold yet; ``on_cell`` sees each (None for a skipped one).

    With ``share_prefix`` the fixed-chunk modes of a prompt continue from one dense prefill of
    :func:`shared_prefix` tokens (a copy of its KV cache each); adaptive modes prefill whole.
    """
    from edgeattn.config import DENSE
    from edgeattn.runtime.torch_backend import TorchSession

    t = prompts.task(task_name)
    stats = RetrievalStats()
    sessions: dict[str, Any] = {}
    fns: dict[str, Any] = {}
    prefix_session = TorchSession(loaded, DENSE, kernels=kernels)
    for length in lengths:
        for depth in depths:
            todo = [m for m in modes if not report.done(mode=m.name, length=length, depth=depth)]
            stats.skipped += len(modes) - len(todo)
            for _ in range(len(modes) - len(todo)):
                on_cell(None)
            if not todo:
                continue
            fact = prompts.fact_for(seed, task_name, length, depth)
            prompt = prompts.build(t, loaded.tokenizer, body, length, depth, fact)
            fixed = [m for m in todo if m.cfg.kind == "dense" or m.chunking == "fixed"]
            cut = shared_prefix(fixed, length) if share_prefix and len(fixed) > 1 else 0
            prefix: Any = None
            prefix_s = 0.0
            if cut:
                t0 = time.perf_counter()
                prefix_session.reset()
                prefix_session.append(prompt.ids[:cut])
                prefix = prefix_session._cache  # the DynamicCache of the dense prefix, copied per mode
                prefix_session._cache = None
                prefix_s = time.perf_counter() - t0
            for mode in todo:
                if mode.name not in sessions:
                    fns[mode.name] = boundary_fn(mode, loaded)
                    sessions[mode.name] = TorchSession(loaded, mode.cfg, kernels=kernels, boundary_fn=fns[mode.name])
                start = cut if mode in fixed else 0
                cell = evaluate_cell(sessions[mode.name], mode, fns[mode.name], prompt, loaded, max_new_tokens,
                                     prefix=prefix if start else None, start=start)  # fmt: skip
                cell.update(mode=mode.name, length=length, depth=depth, shared_prefix=start,
                            shared_prefix_s=round(prefix_s, 3) if start else 0.0)  # fmt: skip
                report.add(cell)
                stats.evaluated += 1
                on_cell(cell)
            del prefix
    for s in [prefix_session, *sessions.values()]:
        s.close()
    return stats


def _continue_from(session: Any, cache: Any, tokens: int) -> None:
    """Start ``session`` from a copy of a KV cache of ``tokens`` tokens (the shared dense prefix).

    TorchSession has no public way to adopt a cache; it keeps it in ``_cache`` / ``_cached``.
    """
    import copy

    session.reset()
    session._cache = copy.deepcopy(cache)
    session._cached = tokens


def evaluate_cell(
    session: Any,
    mode: Mode,
    fn: Any,
    prompt: Any,
    loaded: Any,
    max_new_tokens: int,
    prefix: Any = None,
    start: int = 0,
) -> dict[str, Any]:
    """Prefill (after ``start`` cached tokens, from ``prefix``), greedy answer, score; for sparse
    modes the needle's fate in each global layer's selection."""
    from edgeattn import models, patching

    tok = loaded.tokenizer
    layers = models.global_layers(loaded.config)
    sparse = mode.cfg.kind != "dense"
    if prefix is not None:
        _continue_from(session, prefix, start)
    else:
        session.reset()
        start = 0
    rest = prompt.ids[start:]
    t0 = time.perf_counter()
    if sparse:
        with patching.capture_attention(loaded.model, layers) as calls:
            logits = session.append(rest)
    else:
        calls = {}
        logits = session.append(rest)
    prefill_s = time.perf_counter() - t0
    eos = getattr(loaded.config, "eos_token_id", None)
    stop = set([eos] if isinstance(eos, int) else (eos or []))
    tokens = [int(logits.argmax())]
    text = tok.decode(tokens, skip_special_tokens=True)
    while len(tokens) < max_new_tokens and tokens[-1] not in stop and not prompts.answer_complete(text):
        tokens.append(int(session.append([tokens[-1]]).argmax()))
        text = tok.decode(tokens, skip_special_tokens=True)
    session.reset()
    cell: dict[str, Any] = {
        "fact": prompt.fact,
        "answer": text,
        "hit": prompts.score(text, prompt.fact),
        "fact_span": list(prompt.span),
        "prefill_s": round(prefill_s, 3),
        "new_tokens": len(tokens),
    }
    if sparse:
        cell["needle"] = needle_fate(calls, mode, fn, prompt.span)
        del calls
    return cell


def needle_fate(calls: dict[int, list[Any]], mode: Mode, fn: Any, span: tuple[int, int]) -> list[dict[str, Any]]:
    """Per global layer, from the q/k this prefill computed: did the selection keep the fact's chunk?"""
    from edgeattn import dhsa, needle

    out = []
    for layer, captured in sorted(calls.items()):
        c = captured[0]
        k = c.k
        bnd = fn(k, None) if fn is not None else dhsa.fixed_boundaries(k.shape[2], mode.cfg.chunk_size)
        scaling = c.scaling if c.scaling is not None else c.q.shape[-1] ** -0.5
        with torch.inference_mode():
            r = needle.needle_in_selection(c.q, k, scaling, bnd, mode.cfg, span)
        r.pop("keep")
        out.append({"layer": layer, **r})
    return out


def summary(report: GridReport, lengths: list[int], modes: list[str]) -> dict[str, dict[str, Any]]:
    """Accuracy (% of depths answered exactly) per mode and length, over the cells present."""
    out: dict[str, dict[str, Any]] = {}
    for m in modes:
        row: dict[str, Any] = {}
        for n in lengths:
            cells = report.select(mode=[m], length=[n])
            row[str(n)] = {"hits": sum(bool(c["hit"]) for c in cells), "cells": len(cells)}
        out[m] = row
    return out


def format_summary(table: dict[str, dict[str, Any]], lengths: list[int]) -> str:
    """Accuracy per mode (rows) and length (columns): 'hits/cells'."""
    head = f"{'mode':<16}" + "".join(f"{_k(n):>10}" for n in lengths)
    lines = [head]
    for m, row in table.items():
        cols = []
        for n in lengths:
            r = row[str(n)]
            cols.append(f"{r['hits']}/{r['cells']}" if r["cells"] else "-")
        lines.append(f"{m:<16}" + "".join(f"{c:>10}" for c in cols))
    return "\n".join(lines)


def explain_misses(report: GridReport) -> list[str]:
    """One line per sparse cell that missed where dense (same length and depth) hit: per global
    layer, whether the selection kept the fact's chunk and its rank by score / by dense mass."""
    dense = {(c["length"], c["depth"]): c["hit"] for c in report.cells if c["mode"] == "dense"}
    lines = []
    for c in sorted(report.cells, key=lambda c: (c["length"], c["depth"], c["mode"])):
        if c["mode"] == "dense" or c["hit"] or not dense.get((c["length"], c["depth"])):
            continue
        layers = ", ".join(
            f"L{x['layer']} {'kept' if x['kept'] else 'DROPPED'} (score #{x['rank_score']}, mass #{x['rank_mass']}"
            f" of {x['candidates']})"
            for x in c.get("needle", [])
        )
        lines.append(f"{c['mode']} {_k(c['length'])} depth {c['depth']}: {c['answer']!r} -- {layers}")
    return lines


def _k(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


# ----------------------------------------------------------------- one eval, end to end


@dataclass
class RetrievalRequest:
    """Everything `edgeattn eval niah|passkey` was asked, parsed (see the CLI for the meaning)."""

    task: str
    lengths: list[int]
    depths: list[float]
    mode_spec: str
    json_path: Any
    png_path: Any = None
    model: str | None = None
    budget: int = 2048
    chunk_size: int = 16
    sinks: int = 4
    min_chunk: int = 8
    max_chunk: int = 64
    seed: int = 0
    haystack: Any = None
    kernels: str = "tvm"
    threads: int = 1
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    fresh: bool = False


def prepare(req: RetrievalRequest, loaded: Any = None) -> tuple[list[Mode], GridReport, Any]:
    """Every check that can fail, before the model loads or a byte is written: (modes, report, path)."""
    from edgeattn.config import ConfigError
    from edgeattn.evals import inputs
    from edgeattn.evals.modes import parse_modes
    from edgeattn.patching import KERNELS
    from edgeattn.runtime.measure import cpu_model

    if req.task not in prompts.TASKS:
        raise ConfigError(f"unknown task {req.task!r}; choose from {', '.join(prompts.TASKS)}")
    if req.kernels not in KERNELS:
        raise ConfigError(f"--kernels must be one of {', '.join(KERNELS)}, got {req.kernels!r}")
    if req.max_new_tokens < 6:
        raise ConfigError(f"--max-new-tokens {req.max_new_tokens} cannot hold a 5-digit answer; use >= 6")
    modes = parse_modes(req.mode_spec, req.budget, chunk=req.chunk_size, sinks=req.sinks,
                        min_chunk=req.min_chunk, max_chunk=req.max_chunk)  # fmt: skip
    if req.task == "niah":
        inputs.check_haystack_dir(req.haystack)
    elif req.haystack is not None:
        raise ConfigError("--haystack is for niah; passkey hides its key in fixed filler sentences")
    if loaded is not None:
        path, context = loaded.path, int(getattr(loaded.config, "max_position_embeddings", 0) or 0)
    else:
        path, context = inputs.model_context(req.model)
    inputs.check_lengths(req.lengths, context, req.max_new_tokens)
    name = loaded.name if loaded is not None else str(req.model or "gemma3-270m")
    default_text = "pydoc_data.topics" if req.task == "niah" else "passkey filler"
    haystack = str(req.haystack) if req.haystack is not None else default_text
    settings = {
        "model": name,
        "budget": req.budget,
        "chunk_size": req.chunk_size,
        "sinks": req.sinks,
        "min_chunk": req.min_chunk,
        "max_chunk": req.max_chunk,
        "seed": req.seed,
        "haystack": haystack,
        "haystack_offset": inputs.PYDOC_OFFSET if (req.task == "niah" and req.haystack is None) else 0,
        "backend": "torch",
        "kernels": req.kernels,
        "layers": "global",
        "max_new_tokens": req.max_new_tokens,
        "scoring": "exact match: the first number of the greedy continuation equals the hidden 5-digit fact",
    }
    run_info = {"commit": inputs.git_commit(), "cpu": cpu_model(), "threads": req.threads}
    report = GridReport(req.json_path, req.task, settings, ("mode", "length", "depth"), run_info, fresh=req.fresh)
    return modes, report, path


def run(
    req: RetrievalRequest,
    loaded: Any = None,
    on_cell: Callable[[dict[str, Any] | None], None] = lambda _c: None,
    log: Callable[[str], None] = lambda _m: None,
) -> tuple[GridReport, RetrievalStats]:
    """Check, load, run the missing cells (the report is rewritten after each), draw the heatmaps."""
    from edgeattn import models
    from edgeattn.evals import inputs, plots
    from edgeattn.runtime.threads import set_threads

    modes, report, path = prepare(req, loaded)
    set_threads(req.threads)
    tokenizer = loaded.tokenizer if loaded is not None else models._load_tokenizer(path)
    need = max(req.lengths)
    if req.task == "niah":
        hay = inputs.load_haystack(tokenizer, req.haystack, need)  # a short haystack fails before the model loads
        body = hay.ids
    else:
        body = prompts.passkey_body(tokenizer, need)
    if loaded is None:
        log(f"loading {req.model or models.DEFAULT_MODEL}")
        loaded = models.load(req.model)
    report.extra = {
        "modes": {m.name: m.describe() for m in modes},
        "lengths": req.lengths,
        "depths": req.depths,
        "global_layers": models.global_layers(loaded.config),
    }
    stats = run_grid(req.task, loaded, body, req.lengths, req.depths, modes, report, kernels=req.kernels,
                     seed=req.seed, max_new_tokens=req.max_new_tokens, on_cell=on_cell)  # fmt: skip
    all_lengths = sorted({c["length"] for c in report.cells})
    all_modes = list(dict.fromkeys([*(m.name for m in modes), *(c["mode"] for c in report.cells)]))
    report.extra["summary"] = summary(report, all_lengths, all_modes)
    wanted = {(m.name, n, d) for m in modes for n in req.lengths for d in req.depths}
    report.write(complete=wanted <= {report.key(c) for c in report.cells})
    png = req.png_path or _png_beside(req.json_path)
    plots.retrieval_heatmaps(report.to_dict(True), png)
    return report, stats


def _png_beside(json_path: Any) -> Any:
    from pathlib import Path

    p = Path(json_path)
    return p.with_suffix(".png")
