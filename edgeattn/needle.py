"""Needle-in-a-haystack prompts and the needle's fate in a selection: what the selection diagnostic
(benchmarks/selection.py) and the real-model retrieval test measure.

A fact is hidden at a depth in real prose and the prompt ends by asking for it, completion style
(the default model is a 270M base model: it continues text, it does not follow instructions).
The *needle chunk* of a partition is the key chunk, among those holding the fact's tokens, with the
most dense attention from the last query chunk, the one that produces the answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from edgeattn import dhsa
from edgeattn.config import AttentionConfig

NEEDLE = " The secret passcode of the blue lighthouse is {fact}. "
QUESTION = "\n\nWhat is the secret passcode of the blue lighthouse? The secret passcode of the blue lighthouse is"
FACTS = ("73519", "48263", "91547", "26081", "58372")


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    fact: str
    span: tuple[int, int]  # [start, end) token positions of the fact


def build_prompt(
    tokenizer: Any,
    body: list[int],
    length: int,
    depth: float,
    fact: str,
    needle: str = NEEDLE,
    question_text: str = QUESTION,
) -> Prompt:
    """Exactly ``length`` tokens: BOS, prose ``body`` with the needle at ``depth`` (0..1), the question.

    ``needle`` (holding ``{fact}`` once) and ``question_text`` default to the blue-lighthouse fact;
    the passkey eval passes its own."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    head, tail = needle.split("{fact}")
    pre = tokenizer(head, add_special_tokens=False).input_ids
    fact_ids = tokenizer(fact, add_special_tokens=False).input_ids
    post = tokenizer(tail, add_special_tokens=False).input_ids
    question = tokenizer(question_text, add_special_tokens=False).input_ids
    filler = length - 1 - len(pre) - len(fact_ids) - len(post) - len(question)
    if filler < 0 or filler > len(body):
        raise ValueError(f"cannot build a {length}-token prompt from {len(body)} tokens of prose")
    at = int(filler * depth)
    ids = [tokenizer.bos_token_id] + body[:at] + pre + fact_ids + post + body[at:filler] + question
    start = 1 + at + len(pre)
    return Prompt(ids, fact, (start, start + len(fact_ids)))


def needle_in_selection(
    q: torch.Tensor,
    k: torch.Tensor,
    scaling: float,
    boundaries: torch.Tensor,
    cfg: AttentionConfig,
    span: tuple[int, int],
) -> dict[str, Any]:
    """For prefill q [1,Hq,Lq,D], k [1,Hkv,L,D] (q the last Lq positions: a whole prefill, or the
    continuation of a cached prefix): the needle chunk, its rank among the candidates of the
    last query chunk by selection score and by dense attention mass (1 = first), whether ``cfg``'s
    selection keeps it (in every KV head), and the selection itself (``keep``).  A fact inside the
    last query chunk (possible with adaptive chunks at depth ~1) is reported as that chunk with
    ranks 0: the own chunk is always kept.  With an observation window (``cfg.observe``) the needle
    chunk is kept when the window pins it (``pinned``) or its score ranks it in."""
    length, q_len = k.shape[2], q.shape[2]
    qb = dhsa.query_boundaries(boundaries, q_len, length)
    scores = dhsa.chunk_scores(q, k, qb, boundaries, normalize=cfg.kind == "dhsa")
    pinned = None
    if cfg.vertical_tokens:
        pinned = dhsa.vertical_chunks(q, k, boundaries, cfg.observe, cfg.vertical_tokens, cfg.sinks)
    keep = dhsa.select_chunks(scores, boundaries, cfg.budget, cfg.sinks, cfg.local, pinned)
    last_q = scores.shape[-2] - 1  # the last query chunk, which is the last key chunk
    last = scores.shape[-1] - 1
    own_start = int(boundaries[last])
    hq, hkv = q.shape[1], k.shape[1]
    rows = q[0, :, own_start - (length - q_len) :]
    logits = torch.stack([rows[h] @ k[0, h // (hq // hkv)].T for h in range(hq)]) * scaling
    causal = dhsa.causal_mask(length - own_start, length, None)
    probs = torch.softmax(logits.masked_fill(~causal, -torch.inf), -1).mean(dim=(0, 1))  # [L]
    kc = dhsa.chunk_of_token(boundaries, length)
    chunk_mass = torch.zeros(len(boundaries) - 1, dtype=probs.dtype).index_add_(0, kc, probs)[:last]
    row = scores[0, :, last_q, :last].mean(0)
    candidates = sorted({int(kc[t]) for t in range(*span)} - {last})
    if not candidates:  # the fact lies in the last query chunk itself (an adaptive chunk at depth ~1): always kept
        return {"needle_chunk": last, "candidates": last, "rank_score": 0, "rank_mass": 0, "kept": True, "keep": keep}
    needle = max(candidates, key=lambda x: float(chunk_mass[x]))
    return {
        "needle_chunk": needle,
        "candidates": last,
        "rank_score": int((row > row[needle]).sum()) + 1,
        "rank_mass": int((chunk_mass > chunk_mass[needle]).sum()) + 1,
        "kept": bool(keep[0, :, last_q, needle].all()),
        "pinned": bool(pinned[0, :, needle].all()) if pinned is not None else False,
        "keep": keep,
    }
