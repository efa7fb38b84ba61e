"""Memory budgets: plan a run's peak before anything is allocated, and fit the prefill to the budget.

An edge device has a fixed amount of RAM for the model.  The plan adds what a
run holds at its worst moment -- the runtime and weights already resident, the
KV cache of the whole context, and the largest activation of one prefill step --
so that a prompt that cannot fit is prefilled in chunks against the KV cache
(chunk length chosen to fit), and a model whose weights alone do not fit is
refused with the numbers, before a byte is allocated.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from edgeattn.config import ConfigError
from edgeattn.errors import EdgeAttnError

MIB = 1024 * 1024
# Kept free in every plan: the allocator's fragmentation in a long-lived process and what a 2 ms RSS
# sampler can miss (a 6K-token chunked prefill overshot an exact plan by 37 MiB in the test suite).
HEADROOM = 64 * MIB
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2}
_UNITS |= {"g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}


class BudgetError(EdgeAttnError):
    """The run cannot fit the memory budget; the message gives the numbers and the fix."""


def parse_size(text: str | int | None) -> int | None:
    """'1.5GiB', '800MiB', '2G', '512M', '1073741824' -> bytes (None stays None).

    Bare K/M/G/T are binary, as in `ulimit` and `free`; 'kB'/'MB'/'GB' are decimal.
    """
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if unit in ("k", "m", "g", "t"):
        unit += "ib"
    if m is None or unit not in _UNITS:
        raise ConfigError(f"cannot read the memory size {text!r}; write it like 1.5GiB, 800MiB or 2G")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ConfigError(f"the memory size must be positive, got {text!r}")
    return value


def fmt(nbytes: float) -> str:
    return f"{nbytes / MIB:,.0f} MiB"


@dataclass(frozen=True)
class Footprint:
    """Per-token and fixed sizes of one model on one backend (bytes)."""

    weights: int
    kv_per_token_global: int  # keys + values of every full-attention layer, per cached token
    kv_per_token_sliding: int  # same for the sliding layers, which cache at most ``window`` tokens
    window: int | None
    activation_per_token: int  # the largest live activation of a prefill step, per query token
    context: int  # the model's maximum context (max_position_embeddings)
    kv_per_token_layer: int  # keys + values of one layer, per token
    vocab: int
    mask_bytes_per_score: int = 0  # backends that build explicit L x L masks (transformers as shipped)

    def kv_bytes(self, tokens: int) -> int:
        sliding = min(tokens, self.window) if self.window else tokens
        return tokens * self.kv_per_token_global + sliding * self.kv_per_token_sliding

    def step_bytes(self, chunk: int, context: int) -> int:
        """Transient memory of one prefill step of ``chunk`` queries over ``context`` keys."""
        kv_copy = context * self.kv_per_token_layer  # one layer's cache concatenated with the step's keys
        masks = chunk * context * self.mask_bytes_per_score
        return chunk * self.activation_per_token + kv_copy + masks + 4 * self.vocab * 4


# Measured peak activation / counted live activation, per backend (see footprint_of).
_ALLOCATOR_FACTOR = {"torch": 1.0, "transformers": 2.0, "ort": 2.4, "tvm": 2.0}
# the ort backend's whole file in one InferenceSession (--kernels reference) is not trimmed between segments
_ORT_WHOLE_FILE_FACTOR = 2.75


def footprint_of(
    config: Any, dtype_bytes: int = 4, backend: str = "torch", kernels: str = "tvm", kv_bytes: int | None = None
) -> Footprint:
    """The footprint of a Gemma 2 / Gemma 3 text config, counted from the architecture alone.

    Counting from the config (not from loaded tensors) is what lets the budget
    check refuse a model before loading it.  ``activation_per_token`` counts
    the tensors alive together in the worst layer of a prefill step: the
    residual stream and its normed copies, the projected queries through
    QK-norm and RoPE (each a new tensor), the contiguous copies our kernels
    read and write, or the MLP's gate/up/product -- whichever is larger --
    times what the allocator holds on top (freed blocks not yet returned,
    ONNX Runtime's per-segment outputs).  That factor was measured: peak RSS
    minus what the process held before the prefill, per prompt token, on
    Gemma 3 270M at 8K and 16K (``benchmarks/results/prefill_4k_16k.json``):
    105-107 KB/token for ort (factor 2.75 gives 114), 79-81 KB/token for the
    model as shipped (factor 2 gives 86), which also holds ~3-4 bytes per score
    of its explicit sliding-window masks.  The torch backend trims the heap
    after each attention and keeps only the sliding layers' window (runtime/heap.py,
    runtime/kv_cache.py).  With factor 1.25 it planned 2,950 / 3,977 MiB
    against measured peaks of 2,428 / 3,184 MiB at 16K / 32K
    (``benchmarks/results/prefill_torch_16k_32k.json``); factor 1 takes 9.25 KB
    per token off (148 / 296 MiB) and still plans ~15 % above: room for the
    reference kernels' and chunked prefill's copies.  The ort backend on the kernels trims after
    each ONNX Runtime segment (runtime/heap.py): its peaks fell to 3,152-3,164 / 4,602-4,639 MiB at
    16K / 32K (``benchmarks/results/prefill_ort_trim.json``), and factor 2.4 plans ~11 % / ~12 %
    above them (2.75, measured before the trim, stays for the whole file in one session).
    """
    h, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    hq, hkv = config.num_attention_heads, config.num_key_value_heads
    d = getattr(config, "head_dim", None) or h // hq
    n = config.num_hidden_layers
    layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * n)
    n_global = sum(1 for t in layer_types if t != "sliding_attention")
    qk_norm = 2 * d if str(getattr(config, "model_type", "")).startswith("gemma3") else 0
    per_layer = h * (hq + 2 * hkv) * d + hq * d * h + 3 * h * inter + 4 * h + qk_norm
    weights = (vocab * h + n * per_layer + h) * dtype_bytes
    kv_token = 2 * hkv * d * (kv_bytes or dtype_bytes)  # kv_bytes: a KV cache stored apart (--kv-dtype)
    attn_live = (8 * hq + 4 * hkv) * d  # q through norm/RoPE, kernel in/out copies, k/v
    mlp_live = 4 * inter + 2 * h
    held = _ORT_WHOLE_FILE_FACTOR if (backend, kernels) == ("ort", "reference") else _ALLOCATOR_FACTOR.get(backend, 2.0)
    act = int((4 * h + held * max(attn_live, mlp_live)) * dtype_bytes)
    mask = 0
    if backend == "transformers" or (backend == "torch" and kernels != "tvm"):
        mask = 4  # the sliding layers' explicit masks: chunk x context entries (bool, and SDPA's float copy)
    return Footprint(
        weights=weights,
        kv_per_token_global=n_global * kv_token,
        kv_per_token_sliding=(n - n_global) * kv_token,
        window=getattr(config, "sliding_window", None) if n_global < n else None,
        activation_per_token=act,
        context=int(getattr(config, "max_position_embeddings", 0) or 0),
        kv_per_token_layer=kv_token,
        vocab=vocab,
        mask_bytes_per_score=mask,
    )


@dataclass(frozen=True)
class MemoryPlan:
    """The planned peak of one run; the report prints it beside the measured peak RSS."""

    resident: int  # what the process holds before the run: runtime libraries + weights
    weights: int
    kv_cache: int
    activations: int  # largest prefill step
    prefill_chunk: int  # tokens per prefill step (== prompt length: one shot)
    prompt_tokens: int
    budget: int | None

    @property
    def peak(self) -> int:
        return self.resident + self.kv_cache + self.activations + HEADROOM

    @property
    def chunked(self) -> bool:
        return self.prefill_chunk < self.prompt_tokens

    def to_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in asdict(self).items()}, "peak": self.peak}

    def describe(self) -> str:
        budget = f" of the {fmt(self.budget)} budget" if self.budget else ""
        how = (
            f"prefill in chunks of {self.prefill_chunk} tokens"
            if self.chunked
            else f"one-shot prefill of {self.prompt_tokens} tokens"
        )
        return (
            f"planned peak {fmt(self.peak)}{budget}: resident {fmt(self.resident)} (weights {fmt(self.weights)}) "
            f"+ KV cache {fmt(self.kv_cache)} + activations {fmt(self.activations)} + headroom {fmt(HEADROOM)}; {how}"
        )


def check_context(fp: Footprint, prompt_tokens: int, new_tokens: int) -> None:
    """Refuse empty prompts and contexts beyond the model's, before anything is allocated."""
    if prompt_tokens < 1:
        raise ConfigError(f"the prompt must have at least 1 token, got {prompt_tokens}; pass --synthetic-length >= 1")
    total = prompt_tokens + new_tokens
    if fp.context and total > fp.context:
        raise ConfigError(
            f"{prompt_tokens} prompt tokens + {new_tokens} new tokens = {total} exceed the model's context of "
            f"{fp.context} tokens; pass a shorter prompt or fewer --max-new-tokens"
        )


def check_weights_fit(fp: Footprint, resident_now: int, budget: int | None) -> None:
    """Refuse a budget below what the runtime plus the weights need, before loading the model."""
    if budget is None:
        return
    need = resident_now + fp.weights
    if budget < need:
        raise BudgetError(
            f"--memory-budget {fmt(budget)} is below the {fmt(need)} that the runtime ({fmt(resident_now)}) and the "
            f"weights ({fmt(fp.weights)}) alone need; pass --memory-budget >= {fmt(need + 64 * MIB)} "
            "or use a smaller model"
        )


def plan_run(
    fp: Footprint,
    prompt_tokens: int,
    new_tokens: int,
    resident: int,
    budget: int | None,
    granularity: int = 1,
    min_chunk: int = 64,
) -> MemoryPlan:
    """Plan the peak; under a budget, pick the longest prefill chunk that fits.

    ``granularity`` is the DHSA chunk length: prefill chunks that are multiples
    of it keep every query chunk whole, so chunked prefill selects exactly what
    one-shot prefill selects.  Raises BudgetError when not even ``min_chunk``
    tokens per step fit.
    """
    total = prompt_tokens + new_tokens
    kv = fp.kv_bytes(total)

    def plan(chunk: int) -> MemoryPlan:
        return MemoryPlan(
            resident=resident,
            weights=fp.weights,
            kv_cache=kv,
            activations=fp.step_bytes(chunk, prompt_tokens),
            prefill_chunk=chunk,
            prompt_tokens=prompt_tokens,
            budget=budget,
        )

    one_shot = plan(prompt_tokens)
    if budget is None or one_shot.peak <= budget:
        return one_shot
    step = max(granularity, 1)
    smallest = max(step, (min_chunk // step) * step)
    if plan(smallest).peak > budget:
        need = plan(smallest).peak
        raise BudgetError(
            f"--memory-budget {fmt(budget)} cannot hold this run even in prefill chunks of {smallest} tokens: it needs "
            f"{fmt(need)} (resident {fmt(resident)}, KV cache {fmt(kv)} for {total} tokens); pass --memory-budget >= "
            f"{fmt(need + 32 * MIB)} or a shorter prompt"
        )
    lo, hi = smallest, prompt_tokens  # lo fits, hi does not
    while hi - lo > step:
        mid = ((lo + hi) // 2 // step) * step
        if mid <= lo:
            break
        lo, hi = (mid, hi) if plan(mid).peak <= budget else (lo, mid)
    return plan(lo)
