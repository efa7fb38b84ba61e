"""FLOPs of a prefill, dense vs sparse: what the speed-up of DHSA can be at most.

Counting the model's GEMMs and attention (2 FLOPs per multiply-add) tells what
a measured speed-up should be compared with: at 16K tokens the default model
spends most of its time in the MLPs and projections, so DHSA on 3 of 18 layers
can make the whole prefill only ~1.3x cheaper, however fast its kernel is.
"""

from __future__ import annotations

from typing import Any


def _visible_keys(length: int, limit: int | None) -> int:
    """Sum over queries i < length of min(i + 1, limit): causal keys, capped by a window or budget."""
    if limit is None or limit >= length:
        return length * (length + 1) // 2
    return limit * (limit + 1) // 2 + (length - limit) * limit


def prefill_flops(config: Any, length: int, sparse_layers: list[int], budget: int | None) -> dict[str, int]:
    """GEMM and attention FLOPs of a ``length``-token prefill (last position's LM head only).

    Sparse layers attend to at most ``budget`` keys per query (own chunk and sinks
    included: the budget bounds the kept set); sliding layers to their window.
    """
    h, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    hq, hkv = config.num_attention_heads, config.num_key_value_heads
    d = getattr(config, "head_dim", None) or h // hq
    n = config.num_hidden_layers
    types = list(getattr(config, "layer_types", None) or ["full_attention"] * n)
    window = getattr(config, "sliding_window", None)
    linear = h * (hq + 2 * hkv) * d + hq * d * h + 3 * h * inter
    gemm = 2 * length * n * linear + 2 * vocab * h
    attention = 0
    for i, t in enumerate(types):
        limit = window if t == "sliding_attention" else None
        if i in sparse_layers and budget is not None:
            limit = budget if limit is None else min(limit, budget)
        attention += 2 * 2 * hq * d * _visible_keys(length, limit)  # QK^T and PV
    return {"gemm": gemm, "attention": attention, "total": gemm + attention}
