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


def kept_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    scaling: float,
    cfg: AttentionConfig,
    boundaries: torch.Tensor,
    scoring: str = "dhsa",
) -> float:
    """Kept attention mass of DHSA's selection for prefill q [1, Hq, L, D], k [1, Hkv, L, D].

    ``scoring`` other than ``dhsa`` scores the chunks another way (see ``SCORINGS``).
    """
    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r}; choose from {', '.join(SCORINGS)}")
    length = k.shape[2]
    qb = dhsa.query_boundaries(boundaries, length, length)
    scores = dhsa.chunk_scores(q, k, qb, boundaries, **SCORINGS[scoring])
    keep = dhsa.select_chunks(scores, boundaries, cfg.budget, cfg.sinks)
    mask = dhsa.kept_token_mask(keep, boundaries, length, cfg.sinks)[0]  # [Hkv, L, L]
    causal = dhsa.causal_mask(length, length, None)
    hq, hkv = q.shape[1], k.shape[1]
    total = 0.0
    for h in range(hq):
        kv = h // (hq // hkv)
        p = torch.softmax(((q[0, h] @ k[0, kv].T) * scaling).masked_fill(~causal, float("-inf")), dim=-1)
        total += float((p * mask[kv]).sum(-1).mean())
    return total / hq
