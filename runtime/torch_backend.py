"""The host backend in PyTorch: prefill + greedy decode of a patched model, measured.

Every attention kind is run on the same prompt in the same process, so DHSA's
figures always stand next to dense ones taken minutes apart on the same CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from edgeattn import patching
from edgeattn.config import AttentionConfig
from edgeattn.runtime.measure import MIB, PeakRSS, Timer


@dataclass
class RunResult:
    attention: str
    prompt_tokens: int
    prefill_s: float
    prefill_tok_s: float
    peak_rss_mib: float
    prefill_extra_mib: float
    new_tokens: int
    decode_tok_s: float | None
    continuation: str
    layers: list[int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def warm_up(loaded: Any, n_tokens: int = 64) -> None:
    """One short untimed forward pass, so the first measured kind does not pay one-time costs
    (allocator growth, kernel selection) that the others would not."""
    ids = torch.zeros(1, n_tokens, dtype=torch.long)
    with torch.inference_mode():
        loaded.model(input_ids=ids, logits_to_keep=1)


def run_one(
    loaded: Any,
    input_ids: list[int],
    cfg: AttentionConfig,
    layers: str = "global",
    max_new_tokens: int = 32,
    boundary_fn: Callable[..., Any] | None = None,
) -> RunResult:
    """Prefill ``input_ids`` with ``cfg`` on ``layers``, then greedy-decode ``max_new_tokens``."""
    model = loaded.model
    # dense is the model exactly as shipped: the baseline is never our own code
    patched = patching.patch(model, cfg, layers, boundary_fn=boundary_fn) if cfg.kind != "dense" else []
    ids = torch.tensor([input_ids], dtype=torch.long)
    try:
        with torch.inference_mode(), PeakRSS() as mem:
            with Timer() as t_prefill:
                out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            generated = [int(out.logits[0, -1].argmax())]
            cache = out.past_key_values
            with Timer() as t_decode:
                for _ in range(max_new_tokens - 1):
                    step = torch.tensor([[generated[-1]]], dtype=torch.long)
                    out = model(input_ids=step, cache=cache, use_cache=True)
                    cache = out.past_key_values
                    generated.append(int(out.logits[0, -1].argmax()))
                    if generated[-1] == loaded.config.eos_token_id:
                        break
    finally:
        patching.unpatch(model)
    generated = generated[:max_new_tokens]
    n_decoded = len(generated) - 1
    text = loaded.tokenizer.decode(generated, skip_special_tokens=True) if loaded.tokenizer else str(generated)
    return RunResult(
        attention=cfg.kind,
        prompt_tokens=len(input_ids),
        prefill_s=t_prefill.seconds,
        prefill_tok_s=len(input_ids) / t_prefill.seconds,
        peak_rss_mib=mem.peak / MIB,
        prefill_extra_mib=mem.extra / MIB,
        new_tokens=len(generated),
        decode_tok_s=(n_decoded / t_decode.seconds) if n_decoded > 0 and t_decode.seconds > 0 else None,
        continuation=text,
        layers=patched,
    )
