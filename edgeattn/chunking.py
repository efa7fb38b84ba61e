"""Step 1 of DHSA: where the key sequence is cut into chunks.

Three boundary sources give the same kind of result, a partition
``b_0 = 0 < b_1 < ... < b_Nc = L`` of the keys of one layer:

* ``fixed``: chunks of ``chunk_size`` (what :func:`edgeattn.dhsa.attention`
  does when it gets no boundaries, so :func:`boundary_fn_for` returns None);
* ``shift``: a training-free rule: a chunk starts where the similarity of
  consecutive keys drops far below its local level (a z-score against a
  moving window), i.e. where the content of the key sequence shifts;
* ``predictor``: the small trained network of :mod:`edgeattn.predictor`.

Both adaptive sources produce a *boundary score* per position and hand it to
:func:`boundaries_from_scores`, which is the only place that decides cuts.
It walks left to right and starts a new chunk at the first position whose
score passes the threshold inside the window the length bounds allow, and
cuts at ``max_chunk`` when none does.  So every chunk length lies in
[min_chunk, max_chunk] (whenever L admits such a partition at all), the
result is deterministic, and the cost is O(L) tensor work plus one small
step per chunk.

Positions follow one convention everywhere: score ``t`` (1 <= t < L) is the
evidence that a chunk *starts* at token ``t``; score 0 is unused.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from edgeattn.config import AttentionConfig

if TYPE_CHECKING:
    from edgeattn.patching import BoundaryFn
    from edgeattn.predictor import BoundaryPredictor

# Shift rule defaults, chosen on the calibration half of the pydoc text (see CHUNKING.md).
SHIFT_WINDOW = 64  # tokens of local statistics on each side
SHIFT_Z = 1.0  # a boundary where similarity is this many local std below the local mean


# ---------------------------------------------------------------- features


def key_features(keys: torch.Tensor) -> torch.Tensor:
    """Keys [B, Hkv, L, D] -> unit-norm per-head features, concatenated: [B, L, Hkv*D].

    Each head is L2-normalised before concatenation, so the dot product of two
    features is the cosine similarity *averaged over KV heads* (times Hkv) and
    layers with different key scales look alike to the predictor.
    """
    if keys.dim() != 4:
        raise ValueError(f"keys must be [batch, kv_heads, length, head_dim], got shape {tuple(keys.shape)}")
    b, h, length, d = keys.shape
    unit = F.normalize(keys.float(), dim=-1)
    return unit.permute(0, 2, 1, 3).reshape(b, length, h * d)


def consecutive_similarity(keys: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of key t-1 and key t, averaged over KV heads and batch: [L] (entry 0 = 1)."""
    unit = F.normalize(keys.float(), dim=-1)
    sim = (unit[:, :, 1:] * unit[:, :, :-1]).sum(-1).mean(dim=(0, 1))
    return torch.cat([sim.new_ones(1), sim])


def _moving_mean(x: torch.Tensor, window: int) -> torch.Tensor:
    """Mean of x over [t - window, t + window] clipped to the sequence (centered, O(L))."""
    length = x.shape[0]
    csum = F.pad(x.cumsum(0), (1, 0))
    idx = torch.arange(length, device=x.device)
    lo = (idx - window).clamp(min=0)
    hi = (idx + window + 1).clamp(max=length)
    return (csum[hi] - csum[lo]) / (hi - lo).to(x.dtype)


def shift_scores(keys: torch.Tensor, window: int = SHIFT_WINDOW) -> torch.Tensor:
    """Boundary evidence of the training-free rule, [L] float: a local z-score of the similarity drop.

    ``z_t = (mean_local(sim) - sim_t) / std_local(sim)`` with sim_t the cosine
    of keys t-1 and t (pooled over KV heads) and the statistics over a centered
    window of ``2*window+1`` positions.  Large z means "this step is far less
    similar than its neighbourhood": a content shift.
    """
    sim = consecutive_similarity(keys).double()
    if sim.numel() < 2:
        return torch.zeros_like(sim).float()
    body = sim.clone()
    body[0] = sim[1:].mean()  # position 0 is no transition; keep it out of the statistics
    mean = _moving_mean(body, window)
    var = (_moving_mean(body * body, window) - mean * mean).clamp(min=0)
    z = (mean - body) / (var.sqrt() + 1e-6)
    z[0] = 0.0
    return z.float()


# ------------------------------------------------------ lengths and cuts


def _feasible_remainders(length: int, min_chunk: int, max_chunk: int) -> list[bool]:
    """feasible[r]: r tokens can be split into chunks with lengths in [min_chunk, max_chunk]."""
    if max_chunk >= 2 * min_chunk - 1:  # then every r >= min_chunk works
        return [r == 0 or r >= min_chunk for r in range(length + 1)]
    feasible = [False] * (length + 1)
    feasible[0] = True
    for r in range(min_chunk, length + 1):
        feasible[r] = any(feasible[r - n] for n in range(min_chunk, min(max_chunk, r) + 1))
    return feasible


def boundaries_from_scores(scores: torch.Tensor, threshold: float, min_chunk: int, max_chunk: int) -> torch.Tensor:
    """Cut [0, L) where ``scores`` pass ``threshold``, with every chunk length in [min_chunk, max_chunk].

    Greedy, left to right: from a chunk start s, the next start is the first
    position p in [s + min_chunk, s + max_chunk] with score > threshold whose
    remainder L - p can still be partitioned; with no such p, the chunk is cut
    as long as allowed.  If L itself admits no valid partition (L < min_chunk,
    or min/max so close that some lengths are unreachable) the last chunk is
    allowed to be short: that is the only way a chunk leaves the bounds.
    Returns int64 boundaries [Nc + 1] on the scores' device.
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D [L], got shape {tuple(scores.shape)}")
    if not 1 <= min_chunk <= max_chunk:
        raise ValueError(f"need 1 <= min_chunk <= max_chunk, got {min_chunk}, {max_chunk}")
    length = scores.numel()
    if length < 1:
        raise ValueError("cannot chunk an empty sequence")
    feasible = _feasible_remainders(length, min_chunk, max_chunk)
    strict = feasible[length]  # False: no valid partition exists, the last chunk may be short
    above = (scores.detach().float().cpu() > threshold).tolist()
    cuts = [0]
    s = 0
    while True:
        rest = length - s
        allowed = [
            p
            for p in range(s + min_chunk, min(s + max_chunk, length - 1) + 1)
            if (feasible[length - p] if strict else True)
        ]
        nxt = next((p for p in allowed if above[p]), None)
        if nxt is None:
            if rest <= max_chunk or not allowed:
                break  # [s, L) is the last chunk
            nxt = allowed[-1]  # no shift inside the window: cut as late as the bounds allow
        cuts.append(nxt)
        s = nxt
    cuts.append(length)
    return torch.tensor(cuts, dtype=torch.int64, device=scores.device)


def check_lengths(boundaries: torch.Tensor, length: int, min_chunk: int, max_chunk: int) -> None:
    """Raise ValueError unless ``boundaries`` partition [0, length) into chunks within the bounds."""
    from edgeattn.dhsa import check_boundaries

    check_boundaries(boundaries, length)
    lengths = (boundaries[1:] - boundaries[:-1]).tolist()
    if length >= min_chunk and any(n < min_chunk or n > max_chunk for n in lengths):
        raise ValueError(f"chunk lengths {lengths} leave [{min_chunk}, {max_chunk}]")


# ------------------------------------------------------- boundary sources


@dataclass(frozen=True)
class ShiftBoundaries:
    """The training-free rule as a BoundaryFn: ``(keys, module) -> boundaries``."""

    min_chunk: int = 8
    max_chunk: int = 64
    window: int = SHIFT_WINDOW
    z: float = SHIFT_Z

    def scores(self, keys: torch.Tensor) -> torch.Tensor:
        return shift_scores(keys, self.window)

    def __call__(self, keys: torch.Tensor, module: Any = None) -> torch.Tensor:
        return boundaries_from_scores(self.scores(keys), self.z, self.min_chunk, self.max_chunk)


@dataclass(frozen=True)
class PredictorBoundaries:
    """The trained predictor as a BoundaryFn; one network serves every layer (see CHUNKING.md)."""

    predictor: BoundaryPredictor
    min_chunk: int = 8
    max_chunk: int = 64
    threshold: float | None = None  # logit threshold; None = the one stored with the predictor

    def scores(self, keys: torch.Tensor) -> torch.Tensor:
        """Boundary logits [L] (batch averaged: one partition serves the whole batch)."""
        feats = key_features(keys)
        if feats.shape[-1] != self.predictor.config.in_dim:
            raise ValueError(
                f"the boundary predictor expects keys of {self.predictor.config.in_dim} features "
                f"(kv_heads x head_dim) but this layer has {feats.shape[-1]}; calibrate a predictor for "
                "this model with `edgeattn calibrate MODEL`"
            )
        with torch.inference_mode():
            return self.predictor(feats).mean(0)

    def __call__(self, keys: torch.Tensor, module: Any = None) -> torch.Tensor:
        thr = self.predictor.config.threshold if self.threshold is None else self.threshold
        return boundaries_from_scores(self.scores(keys), thr, self.min_chunk, self.max_chunk)


# ------------------------------------------------------- choosing a source


def boundary_fn_for(
    cfg: AttentionConfig,
    model_or_path: Any = None,
    predictor: str | os.PathLike[str] | BoundaryPredictor | None = None,
) -> BoundaryFn | None:
    """The BoundaryFn that ``cfg.chunking`` asks for, ready for :func:`edgeattn.patching.patch`.

    Returns None for fixed chunks (and for non-DHSA kinds), since
    :func:`edgeattn.dhsa.attention` then makes the fixed partition itself.
    ``model_or_path`` is the LoadedModel (or HF model, or model / export
    directory) the predictor must fit; ``predictor`` overrides the lookup
    with a file or a loaded network.  Lookup order for ``predictor``
    chunking: the explicit file, ``boundary_predictor.safetensors`` in the
    given directory or the model's directory, the calibrate cache for this
    model, and finally the predictor shipped for the built-in model.
    """
    if cfg.kind != "dhsa" or cfg.chunking == "fixed":
        return None
    if cfg.chunking == "shift":
        return ShiftBoundaries(cfg.min_chunk, cfg.max_chunk)
    from edgeattn import predictor as pred

    if isinstance(predictor, pred.BoundaryPredictor):
        net = predictor
    else:
        path = Path(predictor) if predictor is not None else find_predictor(model_or_path)
        net = pred.load(path)
    config = _model_config(model_or_path)
    if config is not None:
        pred.check_compatible(net, config)
    return PredictorBoundaries(net, cfg.min_chunk, cfg.max_chunk)


def _model_config(model_or_path: Any) -> Any:
    if model_or_path is None or isinstance(model_or_path, (str, os.PathLike)):
        return None
    model = getattr(model_or_path, "model", model_or_path)
    return getattr(model, "config", None)


def find_predictor(model_or_path: Any = None) -> Path:
    """Where the predictor for ``model_or_path`` lives (see :func:`boundary_fn_for`); clear error if nowhere."""
    from edgeattn import predictor as pred

    tried: list[str] = []
    dirs: list[Path] = []
    if isinstance(model_or_path, (str, os.PathLike)):
        p = Path(model_or_path)
        if p.is_file():
            return p
        dirs.append(p)
    elif model_or_path is not None and getattr(model_or_path, "path", None) is not None:
        dirs.append(Path(model_or_path.path))
    for d in dirs:
        candidate = d / pred.FILE_NAME
        if candidate.is_file():
            return candidate
        tried.append(str(candidate))
    config = _model_config(model_or_path)
    if config is not None:
        cached = pred.cache_path(config)
        if cached.is_file():
            return cached
        tried.append(str(cached))
        if pred.shipped_matches(config):
            return pred.SHIPPED_PATH
        tried.append(f"{pred.SHIPPED_PATH} (shipped, for the built-in gemma3-270m only)")
    elif model_or_path is None:
        return pred.SHIPPED_PATH
    raise FileNotFoundError(
        "no boundary predictor for this model (looked in: " + "; ".join(tried) + "). Train one with "
        "`edgeattn calibrate MODEL` (a few minutes on a CPU), pass its file explicitly, or use --chunking shift."
    )


def _log(msg: str) -> None:
    print(f"[edgeattn] {msg}", file=sys.stderr, flush=True)
