"""`edgeattn eval fidelity`: how far each sparse mode moves the model from dense, as the budget moves.

On one prompt of real prose (pydoc, or ``--haystack``), against dense attention:

* **per global layer**, on the dense model's own q/k/v (captured once): the relative error of the
  attention output ``||o - o_dense|| / ||o_dense||`` over every query, and the dense attention mass
  the selection keeps (:func:`edgeattn.coverage.kept_mass_streamed`);
* **end to end**, every global layer sparse, the rest of the model as dense: over the last
  ``scored`` positions, KL(dense || mode) of the next-token distributions, top-1 agreement with
  dense, and perplexity on the text itself;
* the **measured prefill latency** of that forward (TVM kernels by default, after an untimed
  warm-up), so accuracy can be plotted against time.

Every (mode, budget) is one cell of a resumable :class:`~edgeattn.evals.grid.GridReport`.  The
dense reference (hidden states, log-probabilities of the scored positions, attention outputs) is
recomputed at each start: it is one forward.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from edgeattn.evals.grid import GridReport
from edgeattn.evals.modes import Mode, boundary_fn

DEFAULT_LENGTH = 4096
DEFAULT_BUDGETS = (256, 512, 1024, 2048)
DEFAULT_SCORED = 512
LOGIT_ROWS = 128  # positions per lm_head block (128 x 262K vocab x 4 B = 128 MiB)


@dataclass
class DenseReference:
    """What every cell compares against, computed once."""

    ids: list[int]
    logprobs: torch.Tensor  # [scored, vocab] log-softmax of dense at the scored positions
    targets: torch.Tensor  # [scored] the next tokens of the text
    captured: dict[int, Any]  # layer -> (q, k, v, scaling, softcap)
    outputs: dict[int, torch.Tensor]  # layer -> dense attention output [1, Hq, L, D]
    prefill_s: float
    perplexity: float


@dataclass
class FidelityRequest:
    json_path: Any
    png_path: Any = None
    length: int = DEFAULT_LENGTH
    budgets: list[int] = field(default_factory=lambda: list(DEFAULT_BUDGETS))
    mode_spec: str = "dhsa,dhsa-shift,dhsa-predictor,block-sparse,window,sinks-window"
    scored: int = DEFAULT_SCORED
    model: str | None = None
    chunk_size: int = 16
    sinks: int = 4
    min_chunk: int = 8
    max_chunk: int = 64
    haystack: Any = None
    kernels: str = "tvm"
    threads: int = 1
    fresh: bool = False


def _logits(loaded: Any, hidden: torch.Tensor) -> torch.Tensor:
    logits = loaded.model.lm_head(hidden)
    cap = getattr(loaded.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def _forward(loaded: Any, ids: list[int], mode: Mode, fn: Any, kernels: str, capture: list[int] | None = None):
    """One timed prefill with ``mode`` on the global layers; (final hidden states [L, H], seconds, captured)."""
    from edgeattn import patching

    model = loaded.model
    x = torch.tensor([ids])
    warm = torch.tensor([ids[:64]])
    patching.patch(model, mode.cfg, "global", fn, kernels=kernels)
    try:
        with torch.inference_mode():
            if kernels == "tvm":
                model.model(input_ids=warm, use_cache=False)  # untimed: kernel compilation / loading
            if capture:
                with patching.capture_attention(model, capture) as calls:
                    t0 = time.perf_counter()
                    h = model.model(input_ids=x, use_cache=False).last_hidden_state[0]
                    seconds = time.perf_counter() - t0
            else:
                calls = {}
                t0 = time.perf_counter()
                h = model.model(input_ids=x, use_cache=False).last_hidden_state[0]
                seconds = time.perf_counter() - t0
    finally:
        patching.unpatch(model)
    return h, seconds, calls


def dense_reference(loaded: Any, ids: list[int], scored: int, kernels: str) -> DenseReference:
    from edgeattn import dhsa, models
    from edgeattn.evals.modes import make_mode

    layers = models.global_layers(loaded.config)
    h, seconds, calls = _forward(loaded, ids, make_mode("dense", 0), None, kernels, capture=layers)
    pos = torch.arange(len(ids) - 1 - scored, len(ids) - 1)
    targets = torch.tensor(ids)[pos + 1]
    with torch.inference_mode():
        logprobs = torch.cat([torch.log_softmax(_logits(loaded, h[pos[a : a + LOGIT_ROWS]]).float(), -1)
                              for a in range(0, scored, LOGIT_ROWS)])  # fmt: skip
        nll = -logprobs.gather(1, targets[:, None]).mean()
        captured, outputs = {}, {}
        for layer in layers:
            c = calls[layer][0]
            scaling = c.scaling if c.scaling is not None else c.q.shape[-1] ** -0.5
            captured[layer] = (c.q, c.k, c.v, scaling, c.softcap)
            outputs[layer] = dhsa.dense_attention(c.q, c.k, c.v, scaling, c.softcap)
    return DenseReference(ids, logprobs, targets, captured, outputs, seconds, math.exp(float(nll)))


def layer_fidelity(ref: DenseReference, mode: Mode, fn: Any) -> list[dict[str, Any]]:
    """Per global layer, on dense q/k/v: output relative error and the dense attention mass kept."""
    from edgeattn import dhsa
    from edgeattn.coverage import kept_mass_streamed

    out = []
    for layer, (q, k, v, scaling, softcap) in ref.captured.items():
        bnd = fn(k, None) if fn is not None else dhsa.fixed_boundaries(k.shape[2], mode.cfg.chunk_size)
        with torch.inference_mode():
            o = dhsa.attention(q, k, v, mode.cfg, scaling=scaling, softcap=softcap, boundaries=bnd)
            d = ref.outputs[layer]
            rel = float((o - d).norm() / d.norm())
            _, keep = dhsa.select_for(q, k, mode.cfg, bnd)
            mass = kept_mass_streamed(q, k, scaling, {"m": (bnd, keep, mode.cfg.sinks)})["m"]
        out.append({"layer": layer, "rel_error": rel, "mass": mass, "chunks": len(bnd) - 1})
    return out


def end_to_end(loaded: Any, ref: DenseReference, mode: Mode, fn: Any, kernels: str) -> dict[str, Any]:
    """Every global layer on ``mode``: KL vs dense, top-1 agreement, perplexity, prefill seconds."""
    h, seconds, _ = _forward(loaded, ref.ids, mode, fn, kernels)
    scored = ref.targets.shape[0]
    pos = torch.arange(len(ref.ids) - 1 - scored, len(ref.ids) - 1)
    kl = agree = nll = 0.0
    with torch.inference_mode():
        for a in range(0, scored, LOGIT_ROWS):
            lp = torch.log_softmax(_logits(loaded, h[pos[a : a + LOGIT_ROWS]]).float(), -1)
            dp = ref.logprobs[a : a + LOGIT_ROWS]
            kl += float((dp.exp() * (dp - lp)).sum())
            agree += float((lp.argmax(-1) == dp.argmax(-1)).sum())
            nll -= float(lp.gather(1, ref.targets[a : a + LOGIT_ROWS, None]).sum())
    return {"kl": kl / scored, "top1": agree / scored, "perplexity": math.exp(nll / scored), "prefill_s": seconds}


def prepare(req: FidelityRequest, loaded: Any = None) -> tuple[list[tuple[int, Mode]], GridReport, Any]:
    """Every check that can fail, before the model loads or a byte is written."""
    from edgeattn.config import ConfigError
    from edgeattn.evals import inputs
    from edgeattn.evals.modes import parse_modes
    from edgeattn.patching import KERNELS
    from edgeattn.runtime.measure import cpu_model

    if req.kernels not in KERNELS:
        raise ConfigError(f"--kernels must be one of {', '.join(KERNELS)}, got {req.kernels!r}")
    if not req.budgets:
        raise ConfigError("--budgets is empty; use e.g. 256,512,1024,2048")
    if not 1 <= req.scored < req.length:
        raise ConfigError(f"--scored {req.scored} must be between 1 and --length - 1 ({req.length - 1})")
    inputs.check_haystack_dir(req.haystack)
    modes = [
        (b, m) for b in req.budgets
        for m in parse_modes(req.mode_spec, b, chunk=req.chunk_size, sinks=req.sinks, min_chunk=req.min_chunk,
                             max_chunk=req.max_chunk)
        if m.name != "dense"
    ]  # fmt: skip
    if loaded is not None:
        path, context = loaded.path, int(getattr(loaded.config, "max_position_embeddings", 0) or 0)
    else:
        path, context = inputs.model_context(req.model)
    inputs.check_lengths([req.length], context, 0)
    settings = {
        "model": loaded.name if loaded is not None else str(req.model or "gemma3-270m"),
        "length": req.length,
        "scored": req.scored,
        "chunk_size": req.chunk_size,
        "sinks": req.sinks,
        "min_chunk": req.min_chunk,
        "max_chunk": req.max_chunk,
        "haystack": str(req.haystack) if req.haystack is not None else "pydoc_data.topics",
        "haystack_offset": 0 if req.haystack is not None else inputs.PYDOC_OFFSET,
        "backend": "torch",
        "kernels": req.kernels,
        "layers": "global",
        "seed": 0,  # nothing is drawn at random; recorded so every report states its seed
    }
    run_info = {"commit": inputs.git_commit(), "cpu": cpu_model(), "threads": req.threads}
    report = GridReport(req.json_path, "fidelity", settings, ("mode", "budget"), run_info, fresh=req.fresh)
    return modes, report, path


def run(
    req: FidelityRequest,
    loaded: Any = None,
    on_cell: Callable[[dict[str, Any] | None], None] = lambda _c: None,
    log: Callable[[str], None] = lambda _m: None,
) -> tuple[GridReport, int]:
    """Check, load, measure the missing (mode, budget) cells, draw the curves; returns (report, evaluated)."""
    from edgeattn import models
    from edgeattn.evals import inputs, plots
    from edgeattn.runtime.threads import set_threads

    modes, report, path = prepare(req, loaded)
    set_threads(req.threads)
    torch.manual_seed(0)
    tokenizer = loaded.tokenizer if loaded is not None else models._load_tokenizer(path)
    hay = inputs.load_haystack(tokenizer, req.haystack, req.length - 1)
    if loaded is None:
        log(f"loading {req.model or models.DEFAULT_MODEL}")
        loaded = models.load(req.model)
    ids = [tokenizer.bos_token_id, *hay.ids[: req.length - 1]]
    report.extra = {"modes": {f"{m.name}@{b}": m.describe() for b, m in modes}, "budgets": req.budgets,
                    "global_layers": models.global_layers(loaded.config)}  # fmt: skip
    todo = [(b, m) for b, m in modes if not report.done(mode=m.name, budget=b)]
    for _ in range(len(modes) - len(todo)):
        on_cell(None)
    evaluated = 0
    if todo or not report.done(mode="dense", budget=0):
        log(f"dense reference: {req.length} tokens")
        ref = dense_reference(loaded, ids, req.scored, req.kernels)
        report.add({"mode": "dense", "budget": 0, "kl": 0.0, "top1": 1.0, "perplexity": ref.perplexity,
                    "prefill_s": ref.prefill_s, "layers": []})  # fmt: skip
        fns: dict[str, Any] = {}
        for budget, mode in todo:
            if mode.name not in fns:
                fns[mode.name] = boundary_fn(mode, loaded)
            layers = layer_fidelity(ref, mode, fns[mode.name])
            cell = {"mode": mode.name, "budget": budget, "config": mode.describe(),
                    **end_to_end(loaded, ref, mode, fns[mode.name], req.kernels), "layers": layers,
                    "rel_error": sum(x["rel_error"] for x in layers) / len(layers),
                    "mass": sum(x["mass"] for x in layers) / len(layers)}  # fmt: skip
            report.add(cell)
            evaluated += 1
            on_cell(cell)
    report.write(complete=True)
    plots.fidelity_curves(report.to_dict(True), req.png_path or _png(req.json_path))
    return report, evaluated


def _png(json_path: Any) -> Any:
    from pathlib import Path

    return Path(json_path).with_suffix(".png")


def format_table(report: GridReport) -> str:
    """One row per (mode, budget): KL, top-1, perplexity, rel. error, mass, prefill seconds."""
    lines = [f"{'mode':<16}{'budget':>8}{'KL':>10}{'top-1':>8}{'ppl':>9}{'rel err':>9}{'mass':>8}{'prefill s':>11}"]
    for c in sorted(report.cells, key=lambda c: (c["mode"] != "dense", c["mode"], c["budget"])):
        rel = f"{c['rel_error']:.4f}" if "rel_error" in c else "-"
        mass = f"{c['mass']:.4f}" if "mass" in c else "-"
        lines.append(
            f"{c['mode']:<16}{c['budget'] or '-':>8}{c['kl']:>10.4f}{c['top1']:>8.3f}{c['perplexity']:>9.3f}"
            f"{rel:>9}{mass:>8}{c['prefill_s']:>11.2f}"
        )
    return "\n".join(lines)
