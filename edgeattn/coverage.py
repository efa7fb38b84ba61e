"""How much of dense attention a DHSA selection keeps: the measure adaptive chunking is judged by.

The *kept attention mass* of a selection is the dense softmax weight that
falls on the keys it keeps, summed per query and averaged over queries and
query heads: 1.0 means DHSA sees every key dense attention uses.  It is the
quantity ``benchmarks/chunking.py`` reports and the real-model test of
adaptive chunking checks, so both compute it here.  It builds L x L masks:
meant for the few-thousand-token lengths of those measurements.
"""

from __future__ import annotations

import torch

from edgeattn import dhsa
from edgeattn.config import AttentionConfig

# How chunks can be scored: what every backend computes, and two diagnostics.
SCORINGS = {
    "dhsa": {"normalize": True, "center": True},
    "uncentred": {"normalize": True, "center": False},  # sqrt(len) pooling of raw keys
    "plain-mean": {"normalize": False, "center": False},  # block-sparse pooling
}


def dense_probs(q: torch.Tensor, k: torch.Tensor, scaling: float) -> torch.Tensor:
    """Causal dense softmax of prefill q [1, Hq, L, D] against k [1, Hkv, L, D]: [Hq, L, L].

    It does not depend on the chunks, the budget or the scoring, so a caller
    comparing many selections on one layer computes it once.
    """
    length = k.shape[2]
    causal = dhsa.causal_mask(length, length, None)
    hq, hkv = q.shape[1], k.shape[1]
    return torch.stack(
        [
            torch.softmax(((q[0, h] @ k[0, h // (hq // hkv)].T) * scaling).masked_fill(~causal, float("-inf")), -1)
            for h in range(hq)
        ]
    )


def kept_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    scaling: float,
    cfg: AttentionConfig,
    boundaries: torch.Tensor,
    scoring: str = "dhsa",
    probs: torch.Tensor | None = None,
) -> float:
    """Kept attention mass of DHSA's selection for prefill q [1, Hq, L, D], k [1, Hkv, L, D].

    ``scoring`` other than ``dhsa`` scores the chunks another way (see ``SCORINGS``).
    ``probs``: :func:`dense_probs` of the same q, k and scaling, when the caller has it.
    """
    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r}; choose from {', '.join(SCORINGS)}")
    length = k.shape[2]
    qb = dhsa.query_boundaries(boundaries, length, length)
    scores = dhsa.chunk_scores(q, k, qb, boundaries, **SCORINGS[scoring])
    keep = dhsa.select_chunks(scores, boundaries, cfg.budget, cfg.sinks)
    mask = dhsa.kept_token_mask(keep, boundaries, length, cfg.sinks)[0]  # [Hkv, L, L]
    probs = dense_probs(q, k, scaling) if probs is None else probs
    hq, hkv = q.shape[1], k.shape[1]
    return sum(float((probs[h] * mask[h // (hq // hkv)]).sum(-1).mean()) for h in range(hq)) / hq


def kept_mass_streamed(
    q: torch.Tensor,
    k: torch.Tensor,
    scaling: float,
    selections: dict[str, tuple[torch.Tensor, torch.Tensor, int]],
    rows: int = 256,
) -> dict[str, float]:
    """Kept attention mass of several prefill selections at once, without an L×L buffer.

    ``selections`` maps a name to ``(boundaries, keep [1, Hkv, Nc, Nc], sinks)`` (a
    :func:`edgeattn.dhsa.select_chunks` result).  The dense softmax is computed ``rows``
    queries at a time and shared by every selection, so 16K-32K tokens fit in memory.
    """
    length = k.shape[2]
    hq, hkv = q.shape[1], k.shape[1]
    g = hq // hkv
    kpos = torch.arange(length)
    chunk_ids = {name: dhsa.chunk_of_token(b, length) for name, (b, _, _) in selections.items()}
    totals = dict.fromkeys(selections, 0.0)
    for a in range(0, length, rows):
        e = min(length, a + rows)
        qpos = torch.arange(a, e)
        causal = kpos[None, :] <= qpos[:, None]
        logits = torch.stack([q[0, h, a:e] @ k[0, h // g, :e].T for h in range(hq)]) * scaling
        probs = torch.softmax(logits.masked_fill(~causal[:, :e], -torch.inf), -1)  # [Hq, rows, e]
        for name, (_, keep, sinks) in selections.items():
            kc = chunk_ids[name]
            kept = keep[0][:, kc[qpos]][:, :, kc[:e]] | (kpos[:e] < sinks)[None, None, :]  # [Hkv, rows, e]
            kept = kept.repeat_interleave(g, dim=0)
            totals[name] += float((probs * kept).sum())
    return {name: t / (hq * length) for name, t in totals.items()}


def oracle_selection(
    q: torch.Tensor, k: torch.Tensor, scaling: float, boundaries: torch.Tensor, budget: int, sinks: int, rows: int = 256
) -> torch.Tensor:
    """The best chunk selection a scorer could make: key chunks ranked by the dense attention mass
    the query chunk really gives them (summed over its queries and query heads), filled under the
    same budget rule (:func:`edgeattn.dhsa.select_chunks`).  Its kept mass is the ceiling of any
    chunk-level selection on these chunks: a diagnostic, not something a backend can compute."""
    length = k.shape[2]
    hq, hkv = q.shape[1], k.shape[1]
    g = hq // hkv
    kc = dhsa.chunk_of_token(boundaries, length)
    nc = len(boundaries) - 1
    mass = torch.zeros(hkv, nc, nc)
    kpos = torch.arange(length)
    for a in range(0, length, rows):
        e = min(length, a + rows)
        causal = kpos[None, :] <= torch.arange(a, e)[:, None]
        logits = torch.stack([q[0, h, a:e] @ k[0, h // g].T for h in range(hq)]) * scaling
        probs = torch.softmax(logits.masked_fill(~causal, -torch.inf), -1)  # [Hq, rows, L]
        per_chunk = torch.zeros(hq, e - a, nc).index_add_(2, kc, probs).view(hkv, g, e - a, nc).sum(1)
        mass.index_add_(1, kc[a:e], per_chunk)
    future = torch.ones(nc, nc, dtype=torch.bool).triu(1)
    return dhsa.select_chunks(mass.masked_fill(future, -torch.inf)[None], boundaries, budget, sinks)
