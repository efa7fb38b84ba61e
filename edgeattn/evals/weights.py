"""How far quantized weights move the model: top-1 agreement and perplexity against fp32.

The measure the quantization issue sets: over ``positions`` next-token predictions on real
prose, the share where the quantized export's argmax equals the fp32 model's, and the
perplexity of the text under each.  The quantized side is the exported file itself, run by
ONNX Runtime (dense attention, every position's logits), so what is measured is what a user
runs; the fp32 side is the PyTorch model, which the fp32 export equals to 1e-4
(``tests/test_export.py``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_POSITIONS = 512


@dataclass
class WeightsFidelity:
    weights: str
    positions: int
    top1_agreement: float
    perplexity: float
    perplexity_fp32: float

    @property
    def perplexity_increase(self) -> float:
        """Relative: 0.02 = 2 % higher perplexity than fp32."""
        return self.perplexity / self.perplexity_fp32 - 1.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "perplexity_increase": self.perplexity_increase}


def prose_ids(loaded: Any, positions: int = DEFAULT_POSITIONS) -> list[int]:
    """``positions + 1`` tokens of the built-in prose: ``positions`` predictions to score."""
    from edgeattn import text

    return text.token_ids(loaded.tokenizer, positions + 1)


def _perplexity(logits: np.ndarray, targets: np.ndarray) -> float:
    z = logits - logits.max(-1, keepdims=True)
    logp = z[np.arange(len(targets)), targets] - np.log(np.exp(z).sum(-1))
    return float(math.exp(-logp.mean()))


def fp32_logits(loaded: Any, ids: list[int]) -> np.ndarray:
    """[len(ids) - 1, V]: the PyTorch fp32 model's logits for every position that has a next token."""
    import torch

    with torch.no_grad():
        out = loaded.model(torch.tensor([ids]), use_cache=False).logits[0, :-1]
    return out.float().numpy()


def export_logits(onnx_path: str | Path, ids: list[int], threads: int = 2) -> np.ndarray:
    """The same positions from an ``--all-logits`` export, in ONNX Runtime."""
    from edgeattn.export.verify import OrtGemma

    sess = OrtGemma(onnx_path, threads=threads)
    logits, _ = sess.step(np.asarray([ids], np.int64), sess.empty_past(1))
    if logits.shape[1] != len(ids):
        raise ValueError(f"{onnx_path} returns the last position only; export it with --all-logits")
    return logits[0, :-1].astype(np.float32)


def compare(weights: str, logits: np.ndarray, reference: np.ndarray, ids: list[int]) -> WeightsFidelity:
    targets = np.asarray(ids[1:])
    return WeightsFidelity(
        weights=weights,
        positions=len(targets),
        top1_agreement=float((logits.argmax(-1) == reference.argmax(-1)).mean()),
        perplexity=_perplexity(logits, targets),
        perplexity_fp32=_perplexity(reference, targets),
    )


__all__ = ["DEFAULT_POSITIONS", "WeightsFidelity", "compare", "export_logits", "fp32_logits", "prose_ids"]
