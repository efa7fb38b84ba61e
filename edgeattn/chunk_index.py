"""An incremental chunk index beside the KV cache of each sparse layer: DHSA decode in O(#chunks).

Without it, every decode step re-chunks the whole key cache and re-pools every chunk
(CHUNKING.md, "Known limits"), so a step costs O(context) before any attention is done.
The index keeps what the selection of one new query needs and nothing it can recompute cheaply:

* the boundaries of the **closed** chunks ``0 = b_0 < ... < b_n = s`` (``s`` = start of the open
  trailing chunk ``[s, L)``, which grows until the chunking rule closes it);
* per closed chunk its representation ``k̄_x`` (sqrt(|x|)·mean for DHSA, plain mean for
  block-sparse) and its length;
* the key prefix sums **at chunk starts**, ``P_x = Σ keys before b_x``: the centred score of
  :mod:`edgeattn.dhsa` subtracts ``sqrt(|x|)·q̄·μ`` with ``μ`` the mean of the keys before the
  query's own chunk, i.e. ``P_own / b_own``.

Appending a token costs O(D) amortised: a chunk is summed once, when it closes, and never again.
A decode step scores the n closed chunks (one [n, D] mat-vec), fills the budget greedily in
score order exactly as :func:`edgeattn.dhsa.select_chunks` does, and attends over the kept keys
only (sinks, kept chunks, own chunk).

**Causal chunking rules.**  An index can only close a chunk on evidence that no later token
changes, so each source exposes the *final* part of its boundary scores:

* ``fixed``: a chunk closes when it holds ``chunk_size`` tokens (the partition is identical to
  :func:`edgeattn.dhsa.fixed_boundaries`, so index-based decode equals the reference's decode);
* ``shift``: the z-score of position t uses the similarities in [t - w, t + w]; it is final
  once key t + w exists.  Unlike :func:`edgeattn.chunking.shift_scores` (which sees the whole
  prompt), the window is clipped at position 1 instead of substituting the global mean for
  position 0, so a score never changes after it is final;
* ``predictor``: the network reads keys [t - w, t + w - 1]; final once key t + w - 1 exists.

The cut walk is :func:`edgeattn.chunking.boundaries_from_scores`' rule without the
whole-sequence feasibility look-ahead: from chunk start s the first final position p in
[s + min, s + max) with a score above the threshold starts the next chunk, else the chunk is cut
at s + max once every score before it is final.  The open chunk may therefore reach
max + window tokens for the adaptive sources (the decision lags by the rule's window); its
tokens are always kept, like the reference's own chunk.  The prefill attention itself keeps
using the boundary source on the whole prompt; only decode reads the index.

``ChunkIndex.build(keys)`` computes the same index from scratch (batch scores, one cut walk,
pooling from prefix sums): tests check that appending token by token gives the same result.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from edgeattn import dhsa
from edgeattn.config import AttentionConfig, ConfigError
from edgeattn.runtime.threads import one_torch_thread

# ------------------------------------------------------------------ chunking rules


@dataclass(frozen=True)
class FixedRule:
    """Chunks of ``chunk_size`` tokens: no scores, a chunk closes when full."""

    chunk_size: int

    @property
    def min_chunk(self) -> int:
        return self.chunk_size

    @property
    def max_chunk(self) -> int:
        return self.chunk_size

    def final_positions(self, length: int) -> int:
        return length

    def above(self, keys: torch.Tensor, start: int, stop: int) -> list[bool]:
        return [False] * (stop - start)

    def describe(self) -> dict[str, Any]:
        return {"source": "fixed", "chunk_size": self.chunk_size}


@dataclass(frozen=True)
class ShiftRule:
    """The training-free similarity-shift rule with causal (final) scores; see the module docstring."""

    min_chunk: int
    max_chunk: int
    window: int
    z: float

    def final_positions(self, length: int) -> int:
        """Positions < this have a final score (their window [t - w, t + w] is complete)."""
        return max(0, length - self.window)

    def above(self, keys: torch.Tensor, start: int, stop: int) -> list[bool]:
        """Score > z for positions [start, stop), all final for ``keys`` [B, H, L, D]."""
        if stop <= start:
            return []
        w = self.window
        lo = max(1, start - w)
        hi = stop + w  # similarities at positions [lo, hi)
        sims = _consecutive_sims(keys, lo, hi)
        # padded[j] = similarity at position start - w + j; positions < 1 (no transition) are NaN
        padded = torch.cat([sims.new_full((lo - (start - w),), float("nan")), sims])
        rows = padded.unfold(0, 2 * w + 1, 1)[: stop - start]  # row of t: positions [t - w, t + w]
        centre = rows[:, w]
        mean = rows.nanmean(-1)
        var = ((rows * rows).nanmean(-1) - mean * mean).clamp(min=0)
        zs = (mean - centre) / (var.sqrt() + 1e-6)
        zs = zs.nan_to_num(nan=float("-inf"))  # position 0 is no transition
        return (zs > self.z).tolist()

    def describe(self) -> dict[str, Any]:
        return {"source": "shift", "min": self.min_chunk, "max": self.max_chunk, "window": self.window, "z": self.z}


def _consecutive_sims(keys: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """cos(k_{t-1}, k_t) averaged over batch and KV heads, for t in [lo, hi), lo >= 1: float64 [hi - lo]."""
    unit = F.normalize(keys[:, :, lo - 1 : hi].float(), dim=-1)
    sim = (unit[:, :, 1:] * unit[:, :, :-1]).sum(-1).mean(dim=(0, 1))
    return sim.double()


@dataclass(frozen=True)
class PredictorRule:
    """The trained boundary predictor with final scores (its receptive field is [t - w, t + w - 1])."""

    boundaries: Any  # chunking.PredictorBoundaries
    min_chunk: int
    max_chunk: int
    threshold: float

    @property
    def window(self) -> int:
        return int(self.boundaries.predictor.config.window)

    def final_positions(self, length: int) -> int:
        return max(0, length - self.window + 1)

    def above(self, keys: torch.Tensor, start: int, stop: int) -> list[bool]:
        if stop <= start:
            return []
        w = self.window
        lo, hi = max(0, start - w), stop + w - 1
        logits = self.boundaries.scores(keys[:, :, lo:hi])[start - lo : stop - lo]
        out = (logits > self.threshold).tolist()
        if start == 0:
            out[0] = False
        return out

    def describe(self) -> dict[str, Any]:
        pred = self.boundaries.predictor
        weights = hashlib.sha256()
        for t in pred.state_dict().values():
            weights.update(t.detach().cpu().numpy().tobytes())
        return {
            "source": "predictor",
            "min": self.min_chunk,
            "max": self.max_chunk,
            "threshold": self.threshold,
            "weights": weights.hexdigest()[:16],
        }


ChunkRule = FixedRule | ShiftRule | PredictorRule


def rule_for(cfg: AttentionConfig, boundary_fn: Any = None) -> ChunkRule:
    """The causal chunking rule behind ``cfg`` and the boundary source the prefill uses.

    ``boundary_fn`` is what :func:`edgeattn.chunking.boundary_fn_for` returned (None: fixed chunks;
    block-sparse always uses fixed blocks).
    """
    from edgeattn.chunking import PredictorBoundaries, ShiftBoundaries

    if boundary_fn is None or cfg.kind != "dhsa":
        return FixedRule(cfg.chunk_size)
    if isinstance(boundary_fn, ShiftBoundaries):
        return ShiftRule(boundary_fn.min_chunk, boundary_fn.max_chunk, boundary_fn.window, boundary_fn.z)
    if isinstance(boundary_fn, PredictorBoundaries):
        thr = boundary_fn.predictor.config.threshold if boundary_fn.threshold is None else boundary_fn.threshold
        return PredictorRule(boundary_fn, boundary_fn.min_chunk, boundary_fn.max_chunk, float(thr))
    raise ConfigError(
        f"the incremental chunk index supports the fixed, shift and predictor boundary sources, not "
        f"{type(boundary_fn).__name__}; pass incremental=False to decode by re-chunking the cache"
    )


# ------------------------------------------------------------------ the index


@dataclass
class _Walk:
    """Where the cut walk stands: open chunk start, next position to examine, scores known so far."""

    start: int = 0
    scanned: int = 0
    above: list[bool] = field(default_factory=list)  # above[t]: final score of position t passes the threshold


def _walk(walk: _Walk, rule: ChunkRule, final: int, length: int) -> list[int]:
    """Advance the cut walk with scores final below ``final`` and ``length`` keys; returns new cuts."""
    cuts = []
    while True:
        s = walk.start
        p = max(walk.scanned, s + rule.min_chunk)
        cut = None
        while p < s + rule.max_chunk and p < final:
            if walk.above[p]:
                cut = p
                break
            p += 1
        if cut is None:
            if p >= s + rule.max_chunk and s + rule.max_chunk <= length:
                cut = s + rule.max_chunk
            else:
                walk.scanned = p
                return cuts
        cuts.append(cut)
        walk.start = walk.scanned = cut


def _room_for(chunks: int) -> int:
    """Capacity for ``chunks`` closed chunks and the decode steps after them: 1/8 more + 64, as the KV
    cache's GrowingLayer grows (a doubling would hold 4 MiB per Gemma 3 270M layer unused at 32K)."""
    return chunks + chunks // 8 + 64


class ChunkIndex:
    """The chunk index of one layer (see the module docstring); batch items share one partition."""

    def __init__(self, rule: ChunkRule, normalize: bool, keys_like: torch.Tensor, capacity: int = 64) -> None:
        b, h, _, d = keys_like.shape
        self.rule = rule
        self.normalize = normalize
        self.shape = (b, h, d)
        self.length = 0
        self.bounds: list[int] = [0]  # closed boundaries; bounds[-1] = open chunk start
        self._walk = _Walk()
        self._kbar = torch.zeros(b, h, capacity, d)
        self._csum = torch.zeros(b, h, capacity + 1, d)  # _csum[:, :, x] = sum of keys before chunk x
        self._lens = torch.zeros(capacity, dtype=torch.int64)
        self._sqrt_lens = torch.zeros(capacity)  # sqrt(|x|): the centring term's weight
        self._b32 = torch.zeros(capacity + 2, dtype=torch.int32)  # boundaries for the TVM kernel

    # ---------------------------------------------------------- state

    @property
    def closed(self) -> int:
        """Number of closed chunks."""
        return len(self.bounds) - 1

    @property
    def open_start(self) -> int:
        return self.bounds[-1]

    def kbar(self) -> torch.Tensor:
        return self._kbar[:, :, : self.closed]

    def start_sums(self) -> torch.Tensor:
        """Key prefix sums at the closed chunks' starts and the open start: [B, H, n + 1, D]."""
        return self._csum[:, :, : self.closed + 1]

    def lengths(self) -> torch.Tensor:
        return self._lens[: self.closed]

    def boundaries(self) -> list[int]:
        """Every chunk of the keys, the open one included: [0, ..., L]."""
        return self.bounds + ([self.length] if self.length > self.open_start else [])

    # ---------------------------------------------------------- building

    @classmethod
    def build(cls, keys: torch.Tensor, rule: ChunkRule, normalize: bool = True) -> ChunkIndex:
        """The index of ``keys`` [B, H, L, D] computed from scratch (batch scores, prefix-sum pooling)."""
        length = keys.shape[2]
        idx = cls(rule, normalize, keys, capacity=_room_for(length // max(1, rule.min_chunk)))
        final = rule.final_positions(length)
        idx._walk.above = rule.above(keys, 0, final)
        idx._walk.scanned = 0
        cuts = _walk(idx._walk, rule, final, length)
        bounds = torch.tensor([0, *cuts], dtype=torch.int64)
        n = len(cuts)
        if n:
            csum = F.pad(keys.float().cumsum(dim=2), (0, 0, 1, 0))[:, :, bounds]  # [B, H, n + 1, D]
            lens = bounds[1:] - bounds[:-1]
            idx._csum[:, :, : n + 1] = csum
            idx._lens[:n] = lens
            idx._sqrt_lens[:n] = lens.float().sqrt()
            idx._kbar[:, :, :n] = (csum[:, :, 1:] - csum[:, :, :-1]) * _scale(lens, normalize)[None, None, :, None]
            idx._b32[: n + 1] = bounds.to(torch.int32)
        idx.bounds = [0, *cuts]
        idx.length = length
        return idx

    def append(self, keys: torch.Tensor) -> None:
        """Take the keys the cache gained: ``keys`` [B, H, L_new, D] is the whole cache after the update."""
        b, h, length, d = keys.shape
        if (b, h, d) != self.shape:
            raise ValueError(
                f"this chunk index was built for keys of batch {self.shape[0]}, {self.shape[1]} KV heads, head dim "
                f"{self.shape[2]}; the cache now has {b}, {h}, {d}: the index belongs to another model or cache"
            )
        if length < self.length:
            raise ValueError(
                f"the chunk index holds {self.length} tokens but the KV cache only {length}: it belongs to another "
                "cache; reset the session (or rebuild the index) before decoding"
            )
        if length == self.length:
            return
        final_before = self.rule.final_positions(self.length)
        final = self.rule.final_positions(length)
        self._walk.above.extend(self.rule.above(keys, final_before, final))
        cuts = _walk(self._walk, self.rule, final, length)
        for cut in cuts:
            self._close(keys, cut)
        self.length = length

    def _close(self, keys: torch.Tensor, end: int) -> None:
        n, s = self.closed, self.open_start
        if n + 1 > self._lens.numel():
            self._grow()
        chunk_sum = keys[:, :, s:end].float().sum(2)
        self._csum[:, :, n + 1] = self._csum[:, :, n] + chunk_sum
        self._lens[n] = end - s
        self._sqrt_lens[n] = math.sqrt(end - s)
        self._kbar[:, :, n] = chunk_sum * float(_scale(torch.tensor([end - s]), self.normalize)[0])
        self._b32[n + 1] = end
        self.bounds.append(end)

    def _grow(self) -> None:
        cap = _room_for(self._lens.numel())
        b, h, d = self.shape
        kbar, csum, lens, sq, b32 = self._kbar, self._csum, self._lens, self._sqrt_lens, self._b32
        self._kbar = torch.zeros(b, h, cap, d)
        self._csum = torch.zeros(b, h, cap + 1, d)
        self._lens = torch.zeros(cap, dtype=torch.int64)
        self._sqrt_lens = torch.zeros(cap)
        self._b32 = torch.zeros(cap + 2, dtype=torch.int32)
        self._kbar[:, :, : kbar.shape[2]] = kbar
        self._csum[:, :, : csum.shape[2]] = csum
        self._lens[: lens.numel()] = lens
        self._sqrt_lens[: sq.numel()] = sq
        self._b32[: b32.numel()] = b32

    # ---------------------------------------------------------- selection

    def select(self, q: torch.Tensor, cfg: AttentionConfig, keys: torch.Tensor | None = None) -> Selection:
        """The chunks the last query keeps: q [B, Hq, 1, D] at position L - 1 (its key already indexed).

        The same greedy prefix rule as :func:`edgeattn.dhsa.select_chunks` on the index's chunks;
        cost O(n·D) for n closed chunks.  With an observation window (``cfg.observe``) the step's
        query is its window, as in :func:`edgeattn.dhsa.vertical_chunks`: that needs the cached
        ``keys`` [B, Hkv, >= L, D] and costs the q·K pass of dense attention, O(L·D).
        """
        b, hkv, d = self.shape
        length = self.length
        if self.length > self.open_start:  # the query sits in the open chunk
            own, own_start = self.closed, self.open_start
        else:  # the last token just closed a chunk: that chunk is the query's own
            own, own_start = self.closed - 1, self.bounds[-2]
        own_len = length - own_start
        hq = q.shape[1]
        qbar = q[:, :, -1].float().reshape(b, hkv, hq // hkv, d).mean(2)  # [B, H, D]; one query: pooled = itself
        scores = (self._kbar[:, :, :own] @ qbar[..., None])[..., 0]
        if self.normalize:
            mu_dot = (qbar * self._csum[:, :, own]).sum(-1) / max(own_start, 1)
            scores -= self._sqrt_lens[:own] * mu_dot[..., None]
        if cfg.local > 0:
            ends = self._b32[1 : own + 1]
            scores.masked_fill_((ends > own_start - cfg.local)[None, None, :], float("inf"))
        charge = self._charge(own, cfg.sinks)
        if cfg.vertical_tokens and own > 0:
            if keys is None:
                raise ValueError("an observation window (observe > 0) needs the cached keys to select")
            scores.masked_fill_(self._vertical(q, keys, own, charge, cfg.vertical_tokens), float("inf"))
        remaining = cfg.budget - own_len - min(own_start, cfg.sinks)
        keep = torch.empty(b, hkv, own + 1, dtype=torch.bool)
        keep[:, :, :own] = dhsa.greedy_prefix(scores, charge, remaining)
        keep[:, :, own] = True
        return Selection(keep=keep, own=own, own_start=own_start, length=length)

    def _charge(self, own: int, sinks: int) -> torch.Tensor:
        """Tokens each chunk before ``own`` costs the budget: its length minus its overlap with the sinks."""
        charge = self._lens[:own]
        j = 0
        while j < own and self.bounds[j] < sinks:  # chunks reaching into the sinks pay for their other tokens
            if j == 0:
                charge = charge.clone()
            charge[j] -= min(self.bounds[j + 1], sinks) - self.bounds[j]
            j += 1
        return charge

    def _vertical(
        self, q: torch.Tensor, keys: torch.Tensor, own: int, charge: torch.Tensor, tokens: int
    ) -> torch.Tensor:
        """The step's vertical chunks among the ``own`` chunks before its own (bool [B, Hkv, own])."""
        b, hkv, d = self.shape
        end = self.bounds[own]
        qg = q[:, :, -1].float().reshape(b, hkv, -1, d)  # the group's query heads
        # keys @ q (not q @ keys^T): the mat-vec streams the cache row by row, 2.4x faster at 32K
        # one torch thread, as the rest of the step: switching torch's pool back to 2 threads for this
        # op made TVM's sparse kernel right after it 5x slower on 2 cores (the pools contend)
        best = (keys[:, :, :end].float() @ qg.transpose(-1, -2)).amax(-1)  # [B, H, end]
        chunk_of = torch.repeat_interleave(torch.arange(own), self._lens[:own].long()).expand(b, hkv, end)
        score = torch.full((b, hkv, own), float("-inf")).scatter_reduce(-1, chunk_of, best, "amax")
        return dhsa.greedy_prefix(score, charge, tokens)

    def kernel_boundaries(self) -> torch.Tensor:
        """int32 boundaries [Nc + 1] of every chunk (open one included) for the TVM kernels: a view."""
        n = self.closed
        if self.length > self.open_start:
            self._b32[n + 1] = self.length
            return self._b32[: n + 2]
        return self._b32[: n + 1]


def _scale(lens: torch.Tensor, normalize: bool) -> torch.Tensor:
    lens = lens.to(torch.float32)
    return lens.rsqrt() if normalize else 1.0 / lens


@dataclass
class Selection:
    """What a decode step keeps: keep [B, Hkv, own + 1] over the chunks up to the query's own."""

    keep: torch.Tensor
    own: int
    own_start: int
    length: int

    def chunk_ids(self, b: int, h: int) -> torch.Tensor:
        """Kept chunk ids of (batch item, KV head), ascending, own chunk last."""
        return self.keep[b, h].nonzero().flatten()


# ------------------------------------------------------------------ sparse decode


def kept_positions(sel: Selection, index: ChunkIndex, b: int, h: int, sinks: int) -> torch.Tensor:
    """Token positions (ascending) one KV head attends to: sinks ∪ kept chunks (own chunk included)."""
    ids = sel.chunk_ids(b, h)
    all_bounds = index.kernel_boundaries().long()  # the own chunk is the last
    sink_end = min(sinks, sel.length)
    starts = all_bounds[ids].clamp(min=sink_end)
    lens = (all_bounds[ids + 1] - starts).clamp(min=0)
    total = int(lens.sum())
    offsets = torch.arange(total) - torch.repeat_interleave(lens.cumsum(0) - lens, lens)
    return torch.cat([torch.arange(sink_end), torch.repeat_interleave(starts, lens) + offsets])


def attend_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sel: Selection,
    index: ChunkIndex,
    sinks: int,
    scaling: float,
    softcap: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Exact softmax of the one query per head over its kept keys (gathered): [B, Hq, 1, D]."""
    bsz, hq, _, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    out = torch.empty(bsz, hq, 1, d, dtype=q.dtype)
    for b in range(bsz):
        for h in range(hkv):
            pos = kept_positions(sel, index, b, h, sinks)
            if window is not None:
                pos = pos[pos > sel.length - 1 - window]
            kg, vg = k[b, h, pos][None, None], v[b, h, pos][None, None]
            qh = q[b, h * g : (h + 1) * g][None]
            if softcap is None:
                res = F.scaled_dot_product_attention(qh, kg, vg, scale=scaling, enable_gqa=True)
            else:
                s = (qh @ kg.transpose(-1, -2)) * scaling
                s = torch.tanh(s / softcap) * softcap
                res = torch.softmax(s, -1) @ vg
            out[b, h * g : (h + 1) * g] = res[0]
    return out


def attend_tvm(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: ChunkIndex,
    sel: Selection,
    cfg: AttentionConfig,
    scaling: float,
    softcap: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """The same step on the TIR sparse decode kernel: it reads the kept chunk ranges in place."""
    from edgeattn.kernels_tvm import registry
    from edgeattn.kernels_tvm.abi import OP_SPARSE

    bsz, hq, _, d = q.shape
    hkv = k.shape[1]
    kern = registry.layer_kernel(
        OP_SPARSE,
        None,
        decode=True,
        sinks=cfg.sinks,
        heads_q=hq,
        heads_kv=hkv,
        head_dim=d,
        scaling=scaling,
        softcap=softcap,
        window=window,
        kv_dtype=registry.kv_dtype_of(k, v),
    )
    bnd = index.kernel_boundaries()
    counts = sel.keep.sum(-1)  # [B, H]
    m = int(counts.max())
    out = registry.empty((bsz, hq, 1, d))
    for b in range(bsz):
        ids = torch.full((hkv, 1, m), -1, dtype=torch.int32)
        for h in range(hkv):
            c = sel.chunk_ids(b, h)
            ids[h, 0, : c.numel()] = c.to(torch.int32)
        nsel = counts[b].to(torch.int32).reshape(hkv, 1).contiguous()
        qb, kb, vb = (x[b] if registry.is_aligned(x[b]) else x[b].contiguous().clone() for x in (q.float(), k, v))
        kern(qb, kb, vb, bnd, ids, nsel, out[b])
    return out


# ------------------------------------------------------------------ per-session state


def model_signature(model: Any, cfg: AttentionConfig, rule: ChunkRule, layers: list[int]) -> dict[str, Any]:
    """What a past state depends on: the model (architecture and a hash of its key weights), the config, the rule."""
    from edgeattn.models import describe

    digest = hashlib.sha256()
    for layer in model.model.layers:  # a few rows of every key projection: another checkpoint differs here
        digest.update(layer.self_attn.k_proj.weight.detach()[:8].float().cpu().numpy().tobytes())
    return {
        "model": describe(model.config),
        "weights": digest.hexdigest()[:16],
        "attention": cfg.to_dict(),
        "chunking": rule.describe(),
        "layers": list(layers),
    }


def check_signature(have: dict[str, Any], need: dict[str, Any]) -> None:
    """Raise ConfigError unless a past state made under ``have`` fits a session that needs ``need``."""
    if have == need:
        return
    diff = [k for k in sorted(set(have) | set(need)) if have.get(k) != need.get(k)]
    detail = "; ".join(f"{k}: the state has {have.get(k)!r}, this session {need.get(k)!r}" for k in diff)
    raise ConfigError(
        f"this past state (KV cache + chunk index) was made by another model or configuration ({detail}); "
        "prefill the prompt again in this session instead of reusing the state"
    )


@dataclass
class PastState:
    """A session's decode state: the KV cache, the chunk indexes beside it, the token count, and the
    signature (model, attention config, chunking rule) of the session that made it."""

    cache: Any
    index: IndexState | None
    cached: int
    signature: dict[str, Any]

    def check_matches(self, signature: dict[str, Any]) -> None:
        check_signature(self.signature, signature)


class IndexState:
    """The chunk indexes of one session's sparse layers, kept beside its KV cache.

    Patched attention layers call :meth:`attend`: it builds a layer's index from the cached keys
    at the first decode step (one query), appends the keys of every later call, and runs decode
    steps on the index.  Calls with several queries (prefill, chunked prefill) only update an
    index that exists and return None, so the caller computes them as before.  Building at the
    first step instead of the prefill's end keeps the indexes out of the prefill's peak RSS; the
    index is a function of the cached keys, so when it is built does not change it (tested).
    """

    def __init__(self, cfg: AttentionConfig, rule: ChunkRule, signature: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.rule = rule
        self.signature = signature or {}
        self.layers: dict[int, ChunkIndex] = {}
        self.update_s = 0.0  # index upkeep + selection time, for the benchmark's share
        self.attend_s = 0.0

    def check_matches(self, signature: dict[str, Any]) -> None:
        check_signature(self.signature, signature)

    @one_torch_thread()
    def attend(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float | None,
        softcap: float | None,
        window: int | None,
        kernels: str,
    ) -> torch.Tensor | None:
        if window is not None:
            # a sliding layer's cache keeps only its last `window` keys, so an index over every token
            # since 0 cannot describe it: such layers (DHSA on --layers all) select over the cache as before
            return None
        t0 = time.perf_counter()
        q_len, k_len = query.shape[2], key.shape[2]
        idx = self.layers.get(layer)
        if idx is None:
            if q_len != 1:
                # built at the first decode step, not here: the prefill's peak (an MLP's activations in a
                # later layer) then excludes the indexes (24 MiB for Gemma 3 270M's 3 global layers at 32K)
                return None
            idx = self.layers[layer] = ChunkIndex.build(key, self.rule, normalize=self.cfg.kind == "dhsa")
        else:
            if idx.length != k_len - q_len:
                raise ValueError(
                    f"layer {layer}: the chunk index holds {idx.length} tokens but the KV cache held {k_len - q_len} "
                    "before this step: the index belongs to another cache; reset the session"
                )
            idx.append(key)
        if q_len != 1:
            self.update_s += time.perf_counter() - t0
            return None
        sel = idx.select(query, self.cfg, key)
        t1 = time.perf_counter()
        self.update_s += t1 - t0
        scale = 1.0 / math.sqrt(query.shape[-1]) if scaling is None else scaling
        if kernels == "tvm":
            out = attend_tvm(query, key, value, idx, sel, self.cfg, scale, softcap, window)
        else:
            out = attend_reference(query, key, value, sel, idx, self.cfg.sinks, scale, softcap, window)
        self.attend_s += time.perf_counter() - t1
        return out
