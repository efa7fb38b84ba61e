"""Swap the attention of a loaded Gemma 2 / Gemma 3 model, per layer, without touching weights.

transformers routes every attention call through ``ALL_ATTENTION_FUNCTIONS``
by the name in ``config._attn_implementation``.  We register one function,
``edgeattn``, and tag each attention module with its :class:`AttentionConfig`;
untagged layers fall through to the implementation the model had before, so
patching is reversible and ``generate`` (with its KV cache) keeps working.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from edgeattn import dhsa
from edgeattn.config import AttentionConfig, ConfigError
from edgeattn.models import global_layers

IMPL_NAME = "edgeattn"
_CFG_ATTR = "edgeattn_config"
_BOUNDARY_ATTR = "edgeattn_boundaries"
_PREVIOUS_ATTR = "edgeattn_previous_impl"
_CAPTURE_ATTR = "edgeattn_capture"
_KERNELS_ATTR = "edgeattn_kernels"
_INDEX_ATTR = "edgeattn_chunk_index"  # an edgeattn.chunk_index.IndexState: incremental sparse decode
KERNELS = ("reference", "tvm")

# A boundary source: (keys [B, Hkv, L, D], layer module) -> boundaries [Nc+1] (int64).
BoundaryFn = Callable[[torch.Tensor, Any], torch.Tensor]


def _edgeattn_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    cfg: AttentionConfig | None = getattr(module, _CFG_ATTR, None)
    captured = getattr(module, _CAPTURE_ATTR, None)
    if captured is not None:
        captured.append(CapturedAttention(query, key, value, scaling, sliding_window, softcap))
    if key.dtype != query.dtype and getattr(module, _KERNELS_ATTR, "reference") != "tvm":
        # a float16 KV cache under a float32 model: the TVM kernels read it as it is, the PyTorch paths need one dtype
        key, value = key.to(query.dtype), value.to(query.dtype)
    if cfg is None:
        if getattr(module, _KERNELS_ATTR, "reference") == "tvm":
            cfg = AttentionConfig(kind="dense")  # every layer on our kernels: dense flash with the layer's window
        else:
            return _previous(module)(
                module,
                query,
                key,
                value,
                attention_mask,
                dropout=dropout,
                scaling=scaling,
                sliding_window=sliding_window,
                softcap=softcap,
                **kwargs,
            )
    if attention_mask is not None and _hides_causal_keys(attention_mask, query.shape[2], key.shape[2], sliding_window):
        raise NotImplementedError(
            "sparse attention layers do not support padded batches; run one sequence at a time (batch size 1)"
        )
    index = getattr(module, _INDEX_ATTR, None)
    if index is not None and cfg.kind != "dense":
        # keeps the layer's chunk index beside the cache; a decode step (one query) runs on it
        kernels = getattr(module, _KERNELS_ATTR, "reference")
        out = index.attend(module.layer_idx, query, key, value, scaling, softcap, sliding_window, kernels)
        if out is not None:
            return out.transpose(1, 2).contiguous(), None
    boundary_fn: BoundaryFn | None = getattr(module, _BOUNDARY_ATTR, None)
    boundaries = boundary_fn(key, module) if boundary_fn is not None and cfg.kind == "dhsa" else None
    if getattr(module, _KERNELS_ATTR, "reference") == "tvm":
        from edgeattn.kernels_tvm import registry

        # [B, Lq, Hq, D] storage viewed as [B, Hq, Lq, D] is not contiguous per head, so the
        # kernel writes its own [B, Hq, Lq, D] output and one transpose-copy follows (as SDPA's does)
        out = registry.run_layer(
            query, key, value, cfg, boundaries, scaling=scaling, softcap=softcap, window=sliding_window
        )
    else:
        out = dhsa.attention(
            query, key, value, cfg, scaling=scaling, softcap=softcap, window=sliding_window, boundaries=boundaries
        )
    return out.transpose(1, 2).contiguous(), None


@dataclass
class CapturedAttention:
    """The inputs one attention call received (after QK-norm and RoPE): real activations for tests."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scaling: float | None
    window: int | None
    softcap: float | None


@contextmanager
def capture_attention(
    model: Any, layers: str | Iterable[int] = "global"
) -> Iterator[dict[int, list[CapturedAttention]]]:
    """Record q, k, v of every attention call of ``layers`` while the block runs.

    Yields {layer index: [calls]}; the model computes exactly as before.
    """
    chosen = parse_layers(layers, model.config)
    already = getattr(model, _PREVIOUS_ATTR, None) is not None
    if not already:
        patch(model, AttentionConfig(kind="dense"), [])
    store: dict[int, list[CapturedAttention]] = {i: [] for i in chosen}
    modules = attention_modules(model)
    try:
        for i in chosen:
            setattr(modules[i], _CAPTURE_ATTR, store[i])
        yield store
    finally:
        for i in chosen:
            delattr(modules[i], _CAPTURE_ATTR)
        if not already:
            unpatch(model)


def _previous(module: torch.nn.Module) -> Callable[..., Any]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = getattr(module, _PREVIOUS_ATTR, "sdpa")
    if name == "eager":
        import importlib

        modeling = importlib.import_module(type(module).__module__)
        return modeling.eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


def _hides_causal_keys(mask: torch.Tensor, q_len: int, k_len: int, window: int | None) -> bool:
    """True when the model's mask hides keys that causality allows, i.e. the batch is padded."""
    if mask.dim() == 2:  # the flash-attention mask builder's [B, T] padding mask (tvm kernels)
        return not bool(mask.all())
    if mask.dim() != 4 or mask.shape[-1] != k_len:
        return False
    allowed = dhsa.causal_mask(q_len, k_len, window, mask.device)
    visible = mask if mask.dtype == torch.bool else mask == 0
    return bool((allowed & ~visible).any())


def _register(previous: str, kernels: str = "reference") -> str:
    """Register the attention function under a name whose masks match ``previous``.

    transformers builds each layer's mask by the implementation's name; layers
    we leave alone must get the masks their own implementation expects
    (SDPA's or eager's), so there is one registered name per fallback.  When
    every layer runs on our kernels no layer reads a mask: the name gets the
    flash-attention mask builder, which returns None for an unpadded batch, so
    transformers never builds the L x L masks (1 GiB each at 32K) at all.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if kernels == "tvm":
        name = f"{IMPL_NAME}_tvm"
        AttentionInterface.register(name, _edgeattn_attention)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["flash_attention_2"])
        return name
    name = IMPL_NAME if previous == "sdpa" else f"{IMPL_NAME}_{previous}"
    AttentionInterface.register(name, _edgeattn_attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[previous])
    return name


def parse_layers(spec: str | Iterable[int], config: Any) -> list[int]:
    """``global`` (full-attention layers), ``all``, or a list like ``5,11`` -> layer indices."""
    n = config.num_hidden_layers
    if not isinstance(spec, str):
        layers = sorted(set(spec))
    elif spec == "global":
        return global_layers(config)
    elif spec == "all":
        return list(range(n))
    else:
        try:
            layers = sorted({int(x) for x in spec.split(",") if x.strip()})
        except ValueError as err:
            raise ConfigError(
                f"--layers must be 'global', 'all' or a comma list of layer indices, got {spec!r}"
            ) from err
    bad = [i for i in layers if not 0 <= i < n]
    if bad or (not layers and isinstance(spec, str)):
        raise ConfigError(f"layer indices {bad or spec} out of range: the model has layers 0..{n - 1}")
    return layers


def attention_modules(model: Any) -> list[torch.nn.Module]:
    """The self-attention module of every decoder layer, in order."""
    return [layer.self_attn for layer in model.model.layers]


def patch(
    model: Any,
    cfg: AttentionConfig,
    layers: str | Iterable[int] = "global",
    boundary_fn: BoundaryFn | None = None,
    kernels: str = "reference",
    chunk_index: Any = None,
) -> list[int]:
    """Make ``layers`` of ``model`` use ``cfg``; other layers keep their attention.

    ``kernels="reference"`` computes ``cfg`` with the PyTorch reference
    (:mod:`edgeattn.dhsa`) and leaves the other layers to transformers;
    ``kernels="tvm"`` runs *every* layer on the TIR kernels of
    ``kernels_tvm`` (zero-copy through DLPack): ``layers`` with ``cfg``, the
    others with the dense flash kernel and their own sliding window.
    ``chunk_index`` (an :class:`edgeattn.chunk_index.IndexState`) makes the sparse layers keep a
    chunk index beside the KV cache and decode on it in O(#chunks) instead of re-chunking the cache.
    Returns the patched layer indices.  Calling it again replaces the previous
    patch (layers not listed go back to the original attention).
    """
    if kernels not in KERNELS:
        raise ConfigError(f"--kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
    chosen = parse_layers(layers, model.config)
    impl = model.config._attn_implementation
    previous = getattr(model, _PREVIOUS_ATTR, None) or impl
    if previous not in ("sdpa", "eager"):
        previous = "eager"
    if getattr(model.config, "attn_logit_softcapping", None) is not None:
        previous = "eager"  # SDPA cannot softcap
    model.__dict__[_PREVIOUS_ATTR] = previous
    for i, module in enumerate(attention_modules(model)):
        setattr(module, _PREVIOUS_ATTR, previous)
        setattr(module, _CFG_ATTR, cfg if i in chosen else None)
        setattr(module, _BOUNDARY_ATTR, boundary_fn if i in chosen else None)
        setattr(module, _KERNELS_ATTR, kernels)
        setattr(module, _INDEX_ATTR, chunk_index if i in chosen else None)
    _set_impl(model, _register(previous, kernels))
    return chosen


def _set_impl(model: Any, name: str) -> None:
    for cfg in {id(c): c for c in (model.config, model.model.config)}.values():
        cfg._attn_implementation = name


def unpatch(model: Any) -> None:
    """Restore the model's original attention everywhere."""
    previous = getattr(model, _PREVIOUS_ATTR, None)
    if previous is None:
        return
    for module in attention_modules(model):
        for attr in (_CFG_ATTR, _BOUNDARY_ATTR, _PREVIOUS_ATTR, _KERNELS_ATTR, _INDEX_ATTR):
            if hasattr(module, attr):
                delattr(module, attr)
    _set_impl(model, previous)
    del model.__dict__[_PREVIOUS_ATTR]


def layer_kinds(model: Any) -> list[str]:
    """Per-layer attention kind as patched now (``dense`` for untouched layers), for manifests."""
    kinds = []
    for module in attention_modules(model):
        cfg = getattr(module, _CFG_ATTR, None)
        kinds.append(cfg.kind if cfg is not None else "dense")
    return kinds
