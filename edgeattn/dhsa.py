"""DHSA in PyTorch: the reference every other backend is tested against.

This module implements steps 2-5 of the operator contract in DESIGN.md for one
set of boundaries (step 1 lives in :mod:`edgeattn.chunking`).  Two decisions
that every backend shares:

* **Selection is made per KV head.**  The chunk scores of the query heads that
  share a KV head (GQA) are averaged before the key chunks are chosen, so one
  K/V tile serves the whole group in a kernel.  The scores are linear in the
  pooled queries, so this equals scoring with the group's mean pooled query.
* **The budget is filled greedily in score order, as a prefix.**  Key chunks
  strictly before the query's own chunk are sorted by score (ties: lower chunk
  index first) and taken while the running token count fits in
  ``budget - |own chunk| - sinks outside it``.  A prefix rule is what ONNX
  (TopK + CumSum) and TIR express without data-dependent loops, and with
  ``budget >= L`` it keeps every key, so DHSA equals dense attention.
* **Keys are scored relative to the mean of the candidate keys.**  Step 2's
  length normalisation sqrt(|c|)·mean(k) is unbiased only for zero-mean keys;
  real keys share a large common component μ, and sqrt(|c|)·q̄·μ then ranks
  long chunks first (and long chunks also cost more budget).  Attention itself
  is blind to μ (softmax ignores a per-query constant q·μ), so DHSA scores key
  chunk x for query chunk c as ``q̄_c·k̄_x - sqrt(|x|)·q̄_c·μ_c`` with μ_c the
  mean of the keys before the own chunk (the candidates; causal, and
  computable from the prefix sums the pooling already has).  Adding any
  constant vector to every key then leaves the selection unchanged, as it
  leaves attention unchanged; with fixed chunks the ranking is the same as
  without the term.  Block-sparse (plain means) needs no correction: there
  the term is a per-row constant.  See CHUNKING.md for what it changes.
* **The last queries pick "vertical" chunks exactly** (``AttentionConfig.observe``, on by
  default).  A chunk mean buries one salient key, and the keys a prompt's end asks for are
  exactly those.  The call's last ``observe`` queries score every key (O(observe·L·D)), and the
  chunks holding their largest q·k take up to ``vertical`` tokens of the budget in every query
  chunk's selection (:func:`vertical_chunks`).  With fixed chunks this is what makes DHSA differ
  from block-sparse, and what finds needles the chunk means lose (CHUNKING.md).  Two things it
  gives up: the window is per call, so a prefill split into calls (chunked prefill) pins per
  call and equals one-shot prefill only with ``observe=0``; and its max over several queries is
  not blind to a vector added to every key, as the chunk scores are.

Queries may be a suffix of the keys (decode with a KV cache): query ``i`` sits
at absolute position ``k_len - q_len + i``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from edgeattn.config import AttentionConfig

# ---------------------------------------------------------------- boundaries


def fixed_boundaries(length: int, chunk_size: int, device: torch.device | None = None) -> torch.Tensor:
    """Boundaries b_0=0 < ... < b_Nc=length of fixed-size chunks (the last may be shorter)."""
    if length < 1:
        raise ValueError(f"sequence length must be >= 1, got {length}")
    b = torch.arange(0, length, chunk_size, dtype=torch.int64, device=device)
    return torch.cat([b, torch.tensor([length], dtype=torch.int64, device=device)])


def check_boundaries(boundaries: torch.Tensor, length: int) -> None:
    """Raise ValueError unless ``boundaries`` is a valid partition of [0, length)."""
    b = boundaries
    if b.dim() != 1 or b.numel() < 2:
        raise ValueError(f"boundaries must be a 1-D tensor with >= 2 entries, got shape {tuple(b.shape)}")
    if int(b[0]) != 0 or int(b[-1]) != length:
        raise ValueError(f"boundaries must start at 0 and end at {length}, got {int(b[0])}..{int(b[-1])}")
    if not bool((b[1:] > b[:-1]).all()):
        raise ValueError("boundaries must be strictly increasing")


def chunk_lengths(boundaries: torch.Tensor) -> torch.Tensor:
    return boundaries[1:] - boundaries[:-1]


def chunk_of_token(boundaries: torch.Tensor, length: int) -> torch.Tensor:
    """Chunk id of every token position, shape [length]."""
    pos = torch.arange(length, device=boundaries.device)
    return torch.bucketize(pos, boundaries[1:], right=True)


# ------------------------------------------------------- chunk-level stage


def prefix_sums(x: torch.Tensor) -> torch.Tensor:
    """Exclusive prefix sums of x [B, H, L, D] along the tokens: [B, H, L+1, D], entry j = sum of x[:j]."""
    return F.pad(x.cumsum(dim=2), (0, 0, 1, 0))


def pool_chunks(
    x: torch.Tensor, boundaries: torch.Tensor, normalize: bool = True, csum: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of ``x`` [B, H, L, D] over each chunk -> [B, H, Nc, D].

    With ``normalize`` the mean is scaled by sqrt(chunk length) (DHSA's length
    normalization, so long chunks are not penalized by averaging); without it
    this is the plain mean pooling of block-sparse attention.
    """
    lengths = chunk_lengths(boundaries).to(x.dtype)
    csum = prefix_sums(x) if csum is None else csum
    sums = csum[:, :, boundaries[1:]] - csum[:, :, boundaries[:-1]]
    scale = lengths.rsqrt() if normalize else 1.0 / lengths
    return sums * scale[None, None, :, None]


def candidate_mean_term(
    qbar: torch.Tensor, ksum: torch.Tensor, k_boundaries: torch.Tensor, offset: int
) -> torch.Tensor:
    """sqrt(|x|)·q̄_c·μ_c: what the keys' common component adds to score[c, x] (see the module docstring).

    μ_c is the mean of the keys before query chunk c's own chunk (key chunk
    c + offset), read from the prefix sums; 0 when there are none.  Returns
    [B, Hkv, Nq, Nk], to be subtracted from the sqrt-normalised scores.
    """
    starts = k_boundaries[:-1]
    own_start = starts[offset : offset + qbar.shape[2]]  # [Nq]
    before = ksum[:, :, own_start]  # [B, Hkv, Nq, D]: sum of the keys before each own chunk
    m = (qbar * before).sum(-1) / own_start.clamp(min=1).to(qbar.dtype)  # q̄_c·μ_c
    return chunk_lengths(k_boundaries).to(qbar.dtype).sqrt() * m[..., None]


def chunk_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    q_boundaries: torch.Tensor,
    k_boundaries: torch.Tensor,
    normalize: bool = True,
    center: bool = True,
) -> torch.Tensor:
    """Causal chunk-to-chunk scores, one matrix per KV head: [B, Hkv, Nq, Nk].

    Query heads of a GQA group are averaged (see the module docstring).  Key
    chunks after the query chunk get -inf.  ``q_boundaries`` partition the
    query positions, ``k_boundaries`` the keys; in prefill they are equal.
    ``center=False`` drops the centring term of DHSA scores: a diagnostic
    (benchmarks/chunking.py), not what any backend computes.
    """
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    qbar = pool_chunks(q, q_boundaries, normalize)
    qbar = qbar.view(b, hkv, hq // hkv, -1, d).mean(dim=2)
    ksum = prefix_sums(k)
    kbar = pool_chunks(k, k_boundaries, normalize, csum=ksum)
    scores = qbar @ kbar.transpose(-1, -2)
    nq, nk = scores.shape[-2:]
    offset = nk - nq  # query chunk i is key chunk i + offset
    if normalize and center:
        scores = scores - candidate_mean_term(qbar, ksum, k_boundaries, offset)
    future = torch.ones(nq, nk, dtype=torch.bool, device=q.device).triu(offset + 1)
    return scores.masked_fill(future, float("-inf"))


def select_chunks(
    scores: torch.Tensor,
    k_boundaries: torch.Tensor,
    budget: int,
    sinks: int,
    local: int = 0,
    pinned: torch.Tensor | None = None,
) -> torch.Tensor:
    """Key chunks each query chunk keeps: bool [B, H, Nq, Nk], own chunk included.

    The query chunks are the last Nq key chunks.  Sink tokens are kept apart
    from this mask (every query keeps keys < ``sinks``); chunks are charged
    only for their tokens outside the sinks, so the kept set is exactly
    own chunk ∪ sinks ∪ selected chunks and its size is at most ``budget``.
    ``local`` > 0: the key chunks that reach into the ``local`` tokens before the
    own chunk (end > start(own) - local) rank first (score +inf), so they are kept
    whenever the budget holds them: a band of recent keys, beside the sinks.
    ``pinned`` (bool [B, Hkv, Nk], from :func:`vertical_chunks`): key chunks that rank first too
    (score +inf) wherever they are candidates.
    """
    nq, nk = scores.shape[-2:]
    offset = nk - nq
    lengths = chunk_lengths(k_boundaries)
    starts = k_boundaries[:-1]
    sink_overlap = (torch.clamp(k_boundaries[1:], max=sinks) - torch.clamp(starts, max=sinks)).clamp(min=0)
    charge = lengths - sink_overlap
    own = torch.arange(nq, device=scores.device) + offset
    remaining = budget - lengths[own] - torch.clamp(starts[own], max=sinks)

    eligible = torch.arange(nk, device=scores.device)[None, :] < own[:, None]  # strictly before own chunk
    if local > 0:
        near = k_boundaries[1:][None, :] > (starts[own] - local)[:, None]
        scores = scores.masked_fill(eligible & near, float("inf"))
    if pinned is not None:
        scores = scores.masked_fill(eligible & pinned[..., None, :], float("inf"))
    ranked = scores.masked_fill(~eligible, float("-inf"))
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
    taken_charge = charge[order].masked_fill(~eligible.expand_as(ranked).gather(-1, order), 0)
    fits = taken_charge.cumsum(-1) <= remaining[:, None]
    keep_sorted = fits & eligible.expand_as(ranked).gather(-1, order)
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    keep[..., torch.arange(nq), own] = True
    return keep


# -------------------------------------------------------------- token masks


def query_boundaries(k_boundaries: torch.Tensor, q_len: int, k_len: int) -> torch.Tensor:
    """Boundaries of the query positions: the key chunks cut to the query range.

    Returns boundaries relative to the first query; the query chunks are the
    last ``len(result) - 1`` key chunks.
    """
    start = k_len - q_len
    inner = k_boundaries[(k_boundaries > start) & (k_boundaries < k_len)] - start
    zero = torch.zeros(1, dtype=torch.int64, device=k_boundaries.device)
    end = torch.full((1,), q_len, dtype=torch.int64, device=k_boundaries.device)
    return torch.cat([zero, inner, end])


def greedy_prefix(score: torch.Tensor, charge: torch.Tensor, tokens: int) -> torch.Tensor:
    """Bool mask of the entries kept when taken in descending ``score`` order (ties: lower index)
    while their running ``charge`` fits ``tokens``: the budget rule every selection shares."""
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    fits = charge[order].cumsum(-1) <= tokens
    return torch.zeros_like(fits).scatter(-1, order, fits)


def vertical_chunks(
    q: torch.Tensor, k: torch.Tensor, k_boundaries: torch.Tensor, observe: int, tokens: int, sinks: int
) -> torch.Tensor:
    """Key chunks the call's last ``observe`` queries single out, up to ``tokens`` tokens: bool [B, Hkv, Nk].

    Why: a chunk score is a mean over a chunk's queries and keys, and one salient key (a fact
    the prompt's end asks for) sinks below the noise in it.  The last queries of a prompt are
    the ones that produce the answer, and scoring them exactly costs O(observe·L·D), little next to
    the prefill.  Each key chunk's score is the largest q·k between a window query (any head of
    the KV head's group) and a key of the chunk; the chunks that rank highest are taken, in score
    order while their tokens outside the sinks fit ``tokens``, among the chunks strictly before the
    one holding the window's first query.  Every query chunk then ranks them first (as a
    "vertical" pattern of MInference and FlexPrefill, estimated from the final queries as they do).
    """
    b, hq, q_len, d = q.shape
    hkv, k_len = k.shape[1], k.shape[2]
    window = min(observe, q_len)
    first = k_len - window  # absolute position of the window's first query
    kc = chunk_of_token(k_boundaries, k_len)
    nk = len(k_boundaries) - 1
    limit = int(kc[first])  # candidates: chunks strictly before the window's first chunk
    pinned = torch.zeros(b, hkv, nk, dtype=torch.bool, device=q.device)
    if limit == 0 or tokens <= 0:
        return pinned
    end = int(k_boundaries[limit])
    qw = q[:, :, q_len - window :].reshape(b, hkv, (hq // hkv) * window, d)
    logits = qw @ k[:, :, :end].transpose(-1, -2)  # [B, Hkv, G*W, end]: every key is causal here
    best = logits.amax(dim=2)  # [B, Hkv, end]
    score = torch.full((b, hkv, limit), float("-inf"), dtype=best.dtype, device=q.device)
    score = score.scatter_reduce(-1, kc[:end].expand(b, hkv, end), best, "amax")
    starts, ends = k_boundaries[:limit], k_boundaries[1 : limit + 1]
    charge = ends - starts - (ends.clamp(max=sinks) - starts.clamp(max=sinks)).clamp(min=0)
    pinned[..., :limit] = greedy_prefix(score, charge, tokens)
    return pinned


def select_for(
    q: torch.Tensor, k: torch.Tensor, cfg: AttentionConfig, k_boundaries: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk selection for DHSA or block-sparse: (q_boundaries, keep [B,Hkv,Nq,Nk])."""
    q_len, k_len = q.shape[2], k.shape[2]
    qb = query_boundaries(k_boundaries, q_len, k_len)
    scores = chunk_scores(q, k, qb, k_boundaries, normalize=cfg.kind == "dhsa")
    pinned = None
    if cfg.vertical_tokens:
        pinned = vertical_chunks(q, k, k_boundaries, cfg.observe, cfg.vertical_tokens, cfg.sinks)
    return qb, select_chunks(scores, k_boundaries, cfg.budget, cfg.sinks, cfg.local, pinned)


def kept_token_mask(
    keep: torch.Tensor,
    k_boundaries: torch.Tensor,
    q_len: int,
    sinks: int,
    window: int | None = None,
) -> torch.Tensor:
    """Token-level kept mask [B, H, Lq, Lk] from a chunk selection (tests and small L only)."""
    k_len = int(k_boundaries[-1])
    nk = keep.shape[-1]
    nq = keep.shape[-2]
    kc = chunk_of_token(k_boundaries, k_len)
    qpos = torch.arange(k_len - q_len, k_len, device=keep.device)
    qc = chunk_of_token(k_boundaries, k_len)[qpos] - (nk - nq)
    kpos = torch.arange(k_len, device=keep.device)
    chunk_kept = keep[:, :, qc][:, :, :, kc]  # [B,H,Lq,Lk]
    mask = (chunk_kept | (kpos < sinks)[None, None, None, :]) & causal_mask(q_len, k_len, window, keep.device)
    return mask


def causal_mask(q_len: int, k_len: int, window: int | None, device: torch.device | None = None) -> torch.Tensor:
    """Bool [Lq, Lk]: key j visible from query i (causal, optional sliding window)."""
    qpos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    kpos = torch.arange(k_len, device=device)[None, :]
    mask = kpos <= qpos
    if window is not None:
        mask &= (qpos - kpos) < window
    return mask


# ------------------------------------------------------------ attention


def _softcapped(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    if softcap is None:
        return scores
    return torch.tanh(scores / softcap) * softcap


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scaling: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Exact softmax attention under an explicit bool mask [.., Lq, Lk]; O(L^2) memory."""
    hq, hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(hq // hkv, dim=1)
    v = v.repeat_interleave(hq // hkv, dim=1)
    if mask.dim() == 4 and mask.shape[1] == hkv and hkv != hq:
        mask = mask.repeat_interleave(hq // hkv, dim=1)
    scores = _softcapped((q @ k.transpose(-1, -2)) * scaling, softcap)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scaling: float,
    softcap: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Causal dense attention [B,Hq,Lq,D]; SDPA's fused kernel whenever it applies."""
    q_len, k_len = q.shape[2], k.shape[2]
    if window is not None and window < k_len and q_len >= 4 * window:
        return banded_attention(q, k, v, scaling, softcap, window)
    if softcap is None:
        if window is None or window >= k_len:
            if q_len == k_len:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True)
            if q_len == 1:
                return F.scaled_dot_product_attention(q, k, v, scale=scaling, enable_gqa=True)
        mask = causal_mask(q_len, k_len, window, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)
    return masked_attention(q, k, v, causal_mask(q_len, k_len, window, q.device), scaling, softcap)


def banded_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scaling: float,
    softcap: float | None,
    window: int,
) -> torch.Tensor:
    """Sliding-window causal attention in query blocks of ``window`` rows: O(L·window), not O(L²).

    Block ``[a, a + window)`` of queries sees keys ``[a - window + 1, a + window)`` at most, so
    each block is one masked attention over 2·window keys.  Same result as the full masked
    attention (the masked keys get weight 0 either way); what makes long prompts affordable
    for Gemma's sliding layers, which transformers computes with an L×L mask.
    """
    q_len, k_len = q.shape[2], k.shape[2]
    q_start = k_len - q_len
    out = torch.empty_like(q)
    for a in range(0, q_len, window):
        b = min(q_len, a + window)
        lo = max(0, q_start + a - window + 1)
        hi = q_start + b
        qb, kb, vb = q[:, :, a:b], k[:, :, lo:hi], v[:, :, lo:hi]
        mask = causal_mask(b - a, hi - lo, window, q.device)  # queries are the last rows of [lo, hi)
        if softcap is None:
            out[:, :, a:b] = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scaling, enable_gqa=True)
        else:
            out[:, :, a:b] = masked_attention(qb, kb, vb, mask, scaling, softcap)
    return out


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    k_boundaries: torch.Tensor,
    scaling: float,
    sinks: int,
    softcap: float | None = None,
    window: int | None = None,
    max_elements: int = 1 << 25,
) -> torch.Tensor:
    """Exact softmax over the kept keys, a group of query chunks at a time.

    Each query chunk gathers only its kept keys (padded to the longest list in
    the group), so memory is O(Lq · budget), never O(L^2); the query heads of a
    GQA group share one gathered K/V.  This is the formulation the TVM kernels
    implement: a query chunk against its key ranges.  ``max_elements`` caps the
    score tile of one group.
    """
    bsz, hq, q_len, d = q.shape
    hkv, k_len = k.shape[1], k.shape[2]
    g = hq // hkv
    nq, nk = keep.shape[-2:]
    offset = nk - nq
    q_start = k_len - q_len
    dev = q.device
    # query rows of every query chunk, padded to the longest chunk
    q_lo = torch.clamp(k_boundaries[offset:-1], min=q_start)
    q_hi = k_boundaries[offset + 1 :]
    c_max = int((q_hi - q_lo).max())
    q_pos = q_lo[:, None] + torch.arange(c_max, device=dev)[None, :]  # [Nq, Cmax]
    q_valid = q_pos < q_hi[:, None]
    q_pos = torch.where(q_valid, q_pos, q_hi[:, None] - 1)
    key_chunk = chunk_of_token(k_boundaries, k_len)
    key_pos = torch.arange(k_len, device=dev)
    out = torch.zeros(bsz, hkv, g, q_len, d, dtype=q.dtype, device=dev)
    qg = q.view(bsz, hkv, g, q_len, d)
    for b in range(bsz):
        for h in range(hkv):
            # token-level kept keys of each query chunk (bounded by the chunk's own end: causal)
            kept = keep[b, h][:, key_chunk] | (key_pos < sinks)[None, :]
            kept &= key_pos[None, :] < q_hi[:, None]
            counts = kept.sum(-1)
            k_max = int(counts.max())
            group = max(1, max_elements // max(1, g * c_max * k_max))
            for c0 in range(0, nq, group):
                c1 = min(nq, c0 + group)
                idx, k_valid = _gather_index(kept[c0:c1], k_max)
                kg, vg = k[b, h][idx], v[b, h][idx]  # [G, Kmax, D]
                rows = q_pos[c0:c1] - q_start  # [G, Cmax]
                qc = qg[b, h][:, rows].permute(1, 0, 2, 3).reshape(c1 - c0, g * c_max, d)
                scores = _softcapped((qc @ kg.transpose(-1, -2)) * scaling, softcap)
                qp = q_pos[c0:c1].repeat(1, g)[:, :, None]  # [G, g*Cmax, 1]
                visible = k_valid[:, None, :] & (idx[:, None, :] <= qp)
                if window is not None:
                    visible &= (qp - idx[:, None, :]) < window
                probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
                res = (probs @ vg).view(c1 - c0, g, c_max, d)
                valid = q_valid[c0:c1]
                out[b, h][:, rows[valid]] = res.permute(1, 0, 2, 3)[:, valid]
    return out.view(bsz, hq, q_len, d)


def _gather_index(kept: torch.Tensor, k_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise positions of the True entries of ``kept`` [G, L], padded to ``k_max``."""
    slot = kept.cumsum(-1) - 1
    idx = torch.zeros(kept.shape[0], k_max, dtype=torch.int64, device=kept.device)
    rows, cols = kept.nonzero(as_tuple=True)
    idx[rows, slot[rows, cols]] = cols
    valid = torch.arange(k_max, device=kept.device)[None, :] < kept.sum(-1, keepdim=True)
    return idx, valid


def key_ranges(chunks: list[int], starts: list[int], ends: list[int], sinks: int, limit: int) -> list[tuple[int, int]]:
    """Merged [start, end) key ranges of the sinks and the kept chunks (what kernels iterate)."""
    ranges = sorted([(0, min(sinks, limit))] + [(starts[c], ends[c]) for c in chunks])
    merged: list[tuple[int, int]] = []
    for s, e in ranges:
        if e <= s:
            continue
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: AttentionConfig,
    scaling: float | None = None,
    softcap: float | None = None,
    window: int | None = None,
    boundaries: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of q [B,Hq,Lq,D] over k, v [B,Hkv,Lk,D] as ``cfg`` says.

    ``boundaries`` partition the keys [0, Lk); by default fixed chunks of
    ``cfg.chunk_size``.  Block-sparse attention always uses fixed blocks.
    """
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of KV heads ({k.shape[1]})")
    scaling = 1.0 / math.sqrt(q.shape[-1]) if scaling is None else scaling
    if cfg.kind == "dense":
        return dense_attention(q, k, v, scaling, softcap, window)
    k_len = k.shape[2]
    if boundaries is None or cfg.kind == "block-sparse":
        boundaries = fixed_boundaries(k_len, cfg.chunk_size, q.device)
    check_boundaries(boundaries, k_len)
    _, keep = select_for(q, k, cfg, boundaries)
    return sparse_attention(q, k, v, keep, boundaries, scaling, cfg.sinks, softcap, window)


def kept_fraction(keep: torch.Tensor, k_boundaries: torch.Tensor, q_len: int, sinks: int) -> float:
    """Fraction of the causal Lq×Lk score matrix a selection computes (all heads averaged)."""
    k_len = int(k_boundaries[-1])
    kept = kept_token_mask(keep, k_boundaries, q_len, sinks).sum().item()
    causal = causal_mask(q_len, k_len, None, keep.device).sum().item() * keep.shape[0] * keep.shape[1]
    return kept / causal


def computed_scores(keep: torch.Tensor, k_boundaries: torch.Tensor, q_len: int, sinks: int) -> int:
    """Number of query-key scores computed, without building an L×L mask (scales to 64K)."""
    k_len = int(k_boundaries[-1])
    starts, ends = k_boundaries[:-1].tolist(), k_boundaries[1:].tolist()
    nq, nk = keep.shape[-2:]
    offset = nk - nq
    q_start = k_len - q_len
    total = 0
    keep_cpu = keep.cpu()
    for b in range(keep.shape[0]):
        for h in range(keep.shape[1]):
            for c in range(nq):
                kc = c + offset
                qs, qe = max(starts[kc], q_start), ends[kc]
                chunks = keep_cpu[b, h, c].nonzero().flatten().tolist()
                others = [x for x in chunks if x != kc]
                ranges = key_ranges(others, starts, ends, sinks, starts[kc])
                outside = sum(e - s for s, e in ranges)
                # own chunk is causal: query at p sees p - starts[kc] + 1 keys of it
                own = sum(p - starts[kc] + 1 for p in range(qs, qe))
                total += (qe - qs) * outside + own
    return total
