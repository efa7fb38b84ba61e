"""`edgeattn calibrate`: train the boundary predictor for a model on real text.

The recipe (DHSA's): run the model over real text, capture the keys its global
layers compute (after k_norm and RoPE, exactly what attention sees), label
each position from *similarity shifts of those keys* (a chunk starts where the
mean key of the next few tokens turns away from the mean key of the previous
few, markedly more than nearby), and fit :class:`~edgeattn.predictor.BoundaryPredictor`
to the labels with a weighted binary cross-entropy.  Sequences are split into
train / validation (picks the decision threshold) / test (reports F1), so the
F1 in the card is measured on text the network never saw.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from edgeattn import patching
from edgeattn.chunking import ShiftBoundaries, _moving_mean, boundaries_from_scores, key_features
from edgeattn.config import AttentionConfig, ConfigError
from edgeattn.predictor import BoundaryPredictor, PredictorConfig

# Label rule defaults (see CHUNKING.md for why these).
LABEL_WINDOW = 4  # keys averaged on each side of a candidate boundary
LABEL_RADIUS = 4  # a label must be the largest shift within +-radius
LABEL_Z = 1.0  # ... and this many local std above the local mean shift
LABEL_CONTEXT = 64  # half-width of the local statistics


def _log(msg: str) -> None:
    print(f"[edgeattn] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------- capture


def capture(
    model: Any, ids: list[int] | torch.Tensor, layers: Iterable[int], with_queries: bool = False
) -> dict[int, dict[str, Any]]:
    """One forward pass of the decoder stack (no LM head) over ``ids``; the captured q/k per layer.

    Returns ``layer -> {"k": [B,Hkv,L,D], "scaling": float (, "q": [B,Hq,L,D])}``, post-norm and
    post-RoPE, as :func:`edgeattn.patching.capture_attention` records them.
    """
    x = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
    body = getattr(model, "model", model)
    with patching.capture_attention(model, list(layers)) as calls, torch.inference_mode():
        body(input_ids=x, use_cache=False)
    store: dict[int, dict[str, Any]] = {}
    for layer, seen in calls.items():
        last = seen[-1]
        store[layer] = {"k": last.k, "scaling": last.scaling}
        if with_queries:
            store[layer]["q"] = last.q
    return store


# ------------------------------------------------------------- labels


def shift_signal(keys: torch.Tensor, window: int = LABEL_WINDOW) -> torch.Tensor:
    """1 - cos(mean of the ``window`` keys before t, mean of the ``window`` keys from t): [L].

    Uses the unit-normalised per-head keys (pooled over KV heads); 0 at the
    sequence ends where a side is empty.
    """
    feats = key_features(keys).mean(0)  # [L, F]
    length = feats.shape[0]
    csum = F.pad(feats.cumsum(0), (0, 0, 1, 0))
    t = torch.arange(length)
    lo, hi = (t - window).clamp(min=0), (t + window).clamp(max=length)
    left = csum[t] - csum[lo]
    right = csum[hi] - csum[t]
    shift = 1 - F.cosine_similarity(left, right, dim=-1, eps=1e-8)
    shift[(t == 0) | (t == length)] = 0
    return shift


def shift_labels(
    keys: torch.Tensor,
    window: int = LABEL_WINDOW,
    radius: int = LABEL_RADIUS,
    z: float = LABEL_Z,
    context: int = LABEL_CONTEXT,
) -> torch.Tensor:
    """Automatic boundary labels from key-similarity shifts: bool [L] ("a chunk starts at t").

    t is labelled when its shift signal is the largest within +-``radius``
    (one label per shift) and ``z`` local standard deviations above the local
    mean (over +-``context`` positions).  Deterministic; position 0 is never a label.
    """
    s = shift_signal(keys, window).double()
    mean = _moving_mean(s, context)
    std = (_moving_mean(s * s, context) - mean * mean).clamp(min=0).sqrt()
    peak = s >= F.max_pool1d(s[None, None], 2 * radius + 1, stride=1, padding=radius)[0, 0]
    labels = peak & (s > mean + z * std)
    labels[0] = False
    return labels


# ------------------------------------------------------------- data


@dataclass
class Sample:
    layer: int
    feats: torch.Tensor  # [L, F]
    labels: torch.Tensor  # [L] bool


def sequences(ids: list[int], seq_len: int, count: int, bos: int | None) -> list[list[int]]:
    """``count`` consecutive windows of ``seq_len`` tokens (each starting with BOS, like a prompt)."""
    step = seq_len - (1 if bos is not None else 0)
    out = []
    for i in range(count):
        chunk = ids[i * step : (i + 1) * step]
        if len(chunk) < step:
            break
        out.append(([bos] if bos is not None else []) + chunk)
    return out


def collect_samples(
    model: Any,
    seqs: list[list[int]],
    layers: list[int],
    label_fn: Callable[[torch.Tensor], torch.Tensor] = shift_labels,
    progress: Callable[[str], None] = _log,
) -> list[list[Sample]]:
    """Per sequence, one Sample per layer: key features and their automatic labels."""
    out: list[list[Sample]] = []
    t0 = time.perf_counter()
    for i, seq in enumerate(seqs):
        store = capture(model, seq, layers)
        out.append([Sample(layer, key_features(store[layer]["k"])[0], label_fn(store[layer]["k"])) for layer in layers])
        done = time.perf_counter() - t0
        eta = done / (i + 1) * (len(seqs) - i - 1)
        progress(f"keys of sequence {i + 1}/{len(seqs)} captured ({done:.0f} s, ~{eta:.0f} s left)")
    return out


# ------------------------------------------------------------- training


def f1_score(pred: torch.Tensor, gold: torch.Tensor, tolerance: int = 0) -> dict[str, float]:
    """Boundary precision / recall / F1; a prediction within ``tolerance`` positions of a label counts."""
    pred, gold = pred.bool().flatten(), gold.bool().flatten()
    if tolerance:
        k = 2 * tolerance + 1
        near_gold = F.max_pool1d(gold.float()[None, None], k, 1, tolerance)[0, 0].bool()
        near_pred = F.max_pool1d(pred.float()[None, None], k, 1, tolerance)[0, 0].bool()
    else:
        near_gold, near_pred = gold, pred
    tp_p = int((pred & near_gold).sum())
    tp_r = int((gold & near_pred).sum())
    precision = tp_p / max(int(pred.sum()), 1)
    recall = tp_r / max(int(gold.sum()), 1)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


@dataclass
class TrainResult:
    net: BoundaryPredictor
    threshold: float
    val_f1: float
    test: dict[str, float]
    test_tol: dict[str, float]
    per_layer_f1: dict[int, float]
    label_rate: float
    epochs: int
    seconds: float


def _logits(net: BoundaryPredictor, samples: list[Sample]) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [net(s.feats[None])[0] for s in samples]


def best_threshold(logits: list[torch.Tensor], labels: list[torch.Tensor]) -> tuple[float, float]:
    """The logit threshold with the best F1 on (validation) data: (threshold, f1)."""
    allz = torch.cat(logits)
    gold = torch.cat(labels)
    best = (0.0, -1.0)
    for q in torch.linspace(0.5, 0.995, 100).tolist():
        thr = float(torch.quantile(allz, q))
        f1 = f1_score(allz > thr, gold)["f1"]
        if f1 > best[1]:
            best = (thr, f1)
    return best


def count_chunks(scores: list[torch.Tensor], threshold: float, min_chunk: int, max_chunk: int) -> int:
    """Chunks that :func:`boundaries_from_scores` cuts in all of ``scores`` at ``threshold``."""
    return sum(len(boundaries_from_scores(z, threshold, min_chunk, max_chunk)) - 1 for z in scores)


def threshold_for_chunks(logits: list[torch.Tensor], target: int, min_chunk: int, max_chunk: int) -> float:
    """The logit threshold at which the predictor cuts ``target`` chunks in ``logits`` (bisection).

    Matching the chunk count, not the rate of positions above the threshold:
    the logits stay high for a few positions around a boundary, so a rate
    match would cut far fewer chunks than intended.
    """
    allz = torch.cat(logits)
    lo, hi = float(allz.min()) - 1.0, float(allz.max())  # the most chunks at lo, the fewest at hi
    for _ in range(40):  # the chunk count falls as the threshold rises
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if count_chunks(logits, mid, min_chunk, max_chunk) > target else (lo, mid)
    return hi


THRESHOLD_RULES = ("shift", "labels", "f1")


def pick_threshold(
    rule: str, logits: list[torch.Tensor], samples: list[Sample], min_chunk: int, max_chunk: int
) -> tuple[float, float]:
    """Decision threshold on validation data by ``rule``: (threshold, F1 there).  See :func:`train`."""
    labels = [s.labels for s in samples]
    if rule == "f1":
        return best_threshold(logits, labels)
    if rule == "labels":
        target = count_chunks([y.float() for y in labels], 0.5, min_chunk, max_chunk)
    else:  # the training-free rule on the same keys (features are unit keys per head: same cosines)
        shift = ShiftBoundaries(min_chunk=min_chunk, max_chunk=max_chunk)
        target = sum(len(shift(s.feats[None, None])) - 1 for s in samples)
    thr = threshold_for_chunks(logits, target, min_chunk, max_chunk)
    return thr, f1_score(torch.cat(logits) > thr, torch.cat(labels))["f1"]


def train(
    data: list[list[Sample]],
    config: PredictorConfig,
    epochs: int = 30,
    lr: float = 3e-3,
    seed: int = 0,
    split: tuple[float, float] = (0.7, 0.15),
    progress: Callable[[str], None] = _log,
    threshold_rule: str = "shift",
    chunk_bounds: tuple[int, int] = (AttentionConfig.min_chunk, AttentionConfig.max_chunk),
) -> TrainResult:
    """Fit a predictor on ``data`` (per sequence, per layer samples); split by *sequence*.

    Deterministic for a given seed (torch and Python RNGs are seeded here; run
    with the same thread count for bit-identical weights).

    ``threshold_rule`` picks the decision threshold on the validation split.
    How fine the chunks are decides most of the attention mass DHSA keeps at
    a budget (CHUNKING.md), so the default fixes the granularity and lets the
    network decide where the cuts go: ``shift`` cuts as many chunks (lengths
    in ``chunk_bounds``) as the training-free shift rule does on the same
    keys, so the two adaptive sources compare at equal granularity and equal
    selection cost; ``labels`` as many as the labels give; ``f1`` takes the
    F1-optimal threshold (fewer, longer chunks on this data).
    """
    if threshold_rule not in THRESHOLD_RULES:
        raise ValueError(f"threshold rule must be one of {THRESHOLD_RULES}, got {threshold_rule!r}")
    if len(data) < 3:
        raise ValueError(f"need at least 3 sequences to train / validate / test, got {len(data)}")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    order = list(range(len(data)))
    rng.shuffle(order)
    n_train = max(1, int(round(split[0] * len(data))))
    n_val = max(1, int(round(split[1] * len(data))))
    n_train = min(n_train, len(data) - 2)
    train_set = [s for i in order[:n_train] for s in data[i]]
    val_set = [s for i in order[n_train : n_train + n_val] for s in data[i]]
    test_set = [s for i in order[n_train + n_val :] for s in data[i]] or val_set
    labels = torch.cat([s.labels for s in train_set]).float()
    rate = float(labels.mean())
    pos_weight = torch.tensor((1 - rate) / max(rate, 1e-6))
    net = BoundaryPredictor(config)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        net.train()
        rng.shuffle(train_set)
        total = 0.0
        for s in train_set:
            logit = net(s.feats[None])[0]
            loss = F.binary_cross_entropy_with_logits(logit, s.labels.float(), pos_weight=pos_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        sched.step()
        net.eval()
        if epoch % 5 == 4 or epoch == epochs - 1:
            vl = _logits(net, val_set)
            thr, f1 = best_threshold(vl, [s.labels for s in val_set])
            progress(
                f"epoch {epoch + 1}/{epochs}: train loss {total / len(train_set):.4f}, validation F1 {f1:.3f} "
                f"({time.perf_counter() - t0:.0f} s)"
            )
    vl = _logits(net, val_set)
    thr, val_f1 = pick_threshold(threshold_rule, vl, val_set, *chunk_bounds)
    tl = _logits(net, test_set)
    pred = torch.cat([z > thr for z in tl])
    gold = torch.cat([s.labels for s in test_set])
    per_layer: dict[int, float] = {}
    for layer in sorted({s.layer for s in test_set}):
        idx = [i for i, s in enumerate(test_set) if s.layer == layer]
        per_layer[layer] = f1_score(
            torch.cat([tl[i] > thr for i in idx]), torch.cat([test_set[i].labels for i in idx])
        )["f1"]
    final = PredictorConfig(**{**asdict(config), "threshold": thr})
    trained = BoundaryPredictor(final)
    trained.load_state_dict(net.state_dict())
    return TrainResult(
        net=trained.eval(),
        threshold=thr,
        val_f1=val_f1,
        test=f1_score(pred, gold),
        test_tol=f1_score(pred, gold, tolerance=2),
        per_layer_f1=per_layer,
        label_rate=rate,
        epochs=epochs,
        seconds=time.perf_counter() - t0,
    )


# ------------------------------------------------------------- command


def calibrate(
    model_spec: str | None = None,
    out: Path | None = None,
    text_path: Path | None = None,
    seq_len: int = 1024,
    sequences_n: int = 16,
    epochs: int = 15,
    seed: int = 0,
    threads: int | None = None,
    window: int = 8,
    hidden: int = 64,
    loaded: Any = None,
    threshold_rule: str = "shift",
) -> tuple[Path, dict[str, Any]]:
    """Train and save a predictor; returns (path, card).  The function behind the CLI verb.

    ``loaded`` (a :class:`edgeattn.models.LoadedModel`) skips loading ``model_spec`` again.
    """
    from edgeattn import models, predictor, text
    from edgeattn.config import resolve_threads
    from edgeattn.runtime.threads import set_threads

    set_threads(resolve_threads(threads))  # --threads means the same in every verb
    if seq_len < 64:
        raise ConfigError(f"--seq-len must be >= 64 (a few chunks per sequence), got {seq_len}")
    if sequences_n < 3:
        raise ConfigError(f"--sequences must be >= 3 (train, validation and test need one each), got {sequences_n}")
    if threshold_rule not in THRESHOLD_RULES:
        raise ConfigError(f"--threshold must be one of {', '.join(THRESHOLD_RULES)}, got {threshold_rule!r}")
    t_start = time.perf_counter()
    loaded = loaded if loaded is not None else models.load(model_spec)
    if loaded.tokenizer is None:
        raise ConfigError(f"{loaded.path} has no tokenizer; calibration tokenizes real text, so add tokenizer files")
    layers = models.global_layers(loaded.config)
    if text_path is None:
        source, source_name = text.pydoc_text(), "CPython pydoc_data.topics (all topics, sorted by name)"
    elif text_path.is_dir():
        source, source_name = text.haystack_dir(text_path), f"{text_path}/*.txt"
    elif text_path.is_file():
        source, source_name = text_path.read_text(errors="replace"), str(text_path)
    else:
        raise FileNotFoundError(f"--text {text_path}: no such file or folder")
    ids = loaded.tokenizer(source, add_special_tokens=False).input_ids
    seqs = sequences(ids, seq_len, sequences_n, loaded.tokenizer.bos_token_id)
    if len(seqs) < 3:
        raise ConfigError(
            f"the text has {len(ids)} tokens: fewer than 3 sequences of {seq_len}; "
            "give more text or a smaller --seq-len"
        )
    _log(
        f"calibrating a boundary predictor for {loaded.name}: {len(seqs)} sequences x {seq_len} tokens, "
        f"global layers {layers}, {torch.get_num_threads()} threads"
    )
    data = collect_samples(loaded.model, seqs, layers)
    fp = predictor.model_fingerprint(loaded.config)
    cfg = PredictorConfig(
        in_dim=fp["key_features"], hidden=hidden, window=window, model={"name": loaded.name, "fingerprint": fp}
    )
    result = train(data, cfg, epochs=epochs, seed=seed, threshold_rule=threshold_rule)
    card = {
        "model": loaded.name,
        "fingerprint": fp,
        "layers": layers,
        "data": {"source": source_name, "sequences": len(seqs), "seq_len": seq_len, "tokens": len(seqs) * seq_len},
        "labels": {
            "rule": "local maxima (+-radius) of 1 - cos(mean key of the window before t, mean key of the window "
            "from t), unit-norm keys pooled over KV heads, above local mean + z * local std",
            "window": LABEL_WINDOW,
            "radius": LABEL_RADIUS,
            "z": LABEL_Z,
            "context": LABEL_CONTEXT,
            "positive_rate": round(result.label_rate, 4),
        },
        "network": json.loads(result.net.config.to_json()),
        "parameters": sum(p.numel() for p in result.net.parameters()),
        "training": {"epochs": epochs, "optimizer": "AdamW lr 3e-3 cosine, weighted BCE", "seed": seed},
        "split": "by sequence, 70% train / 15% validation (threshold) / 15% test (F1)",
        "threshold": result.threshold,
        "threshold_rule": {
            "shift": "as many chunks on validation as the training-free shift rule cuts, lengths in "
            f"[{AttentionConfig.min_chunk}, {AttentionConfig.max_chunk}]",
            "labels": "as many chunks on validation as the labels give, lengths in "
            f"[{AttentionConfig.min_chunk}, {AttentionConfig.max_chunk}]",
            "f1": "the F1-optimal threshold on validation",
        }[threshold_rule],
        "f1": {
            "validation": round(result.val_f1, 4),
            "test": {k: round(v, 4) for k, v in result.test.items()},
            "test_within_2_tokens": {k: round(v, 4) for k, v in result.test_tol.items()},
            "test_per_layer": {str(k): round(v, 4) for k, v in result.per_layer_f1.items()},
        },
        "seconds": {"training": round(result.seconds, 1), "total": round(time.perf_counter() - t_start, 1)},
        "threads": torch.get_num_threads(),
        "command": _command_line(
            model_spec, out, text_path, seq_len, sequences_n, epochs, seed, threads, threshold_rule
        ),
    }
    target = out if out is not None else predictor.cache_path(loaded.config)
    if target.suffix != ".safetensors":
        target = target / predictor.FILE_NAME
    predictor.save(result.net, target, extra={"card": card})
    target.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    return target, card


def _command_line(model: str | None, out: Path | None, text_path: Path | None, *nums: Any) -> str:
    seq_len, n, epochs, seed, threads, rule = nums
    parts = ["edgeattn calibrate"] + ([model] if model else [])
    if threads:
        parts.append(f"--threads {threads}")
    if rule != "shift":
        parts.append(f"--threshold {rule}")
    if text_path is not None:
        parts.append(f"--text {text_path}")
    parts.append(f"--seq-len {seq_len} --sequences {n} --epochs {epochs} --seed {seed}")
    if out is not None:
        parts.append(f"--out {out}")
    return " ".join(parts)


__all__ = [
    "calibrate",
    "capture",
    "collect_samples",
    "f1_score",
    "shift_labels",
    "shift_signal",
    "train",
]
