"""A KV cache whose full-attention layers append in place instead of copying the whole cache per token.

transformers' ``DynamicLayer.update`` is ``torch.cat([keys, new])``: every decode step copies the
layer's entire K and V (at 32K tokens, 64 MiB per Gemma 3 270M global layer, read and written),
which is as much memory traffic as dense attention reads and far more than DHSA reads.  A
decode step is memory-bound, so that copy alone hides most of what sparse decode saves.

:class:`GrowingLayer` keeps K and V in storage with spare room (grown by 1/8 + 256 tokens when
full, so appends cost O(1) amortised and the slack stays small for the memory plan) and hands
out views of the filled part.  The views are contiguous only when batch x KV heads is 1, which
the kernels need zero-copy; otherwise the layer falls back to concatenation.

Sliding-window layers (:class:`WindowLayer`) keep only their window after a prefill; transformers'
keep the whole prompt's K and V alive behind a slice.

``new_cache(config, dtype=torch.float16)`` stores K and V in float16 under a float32 model
(``edgeattn run --kv-dtype float16``): every layer casts what it is given as it stores it, and
the TVM kernels read float16 K/V as they are, so the cache and the traffic of reading it halve.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

GROWTH = 1.125
SLACK_TOKENS = 256


def _as_stored(dtype: torch.dtype | None, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V in the dtype a layer stores (``--kv-dtype``); None keeps what the model computed."""
    return (k, v) if dtype is None else (k.to(dtype), v.to(dtype))


class GrowingLayer(DynamicLayer):
    """A full-attention cache layer that writes new tokens into spare room (see the module docstring)."""

    _kbuf: torch.Tensor | None = None
    _vbuf: torch.Tensor | None = None

    def __init__(self, dtype: torch.dtype | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.store_dtype = dtype  # None: as given

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key_states, value_states = _as_stored(self.store_dtype, key_states, value_states)
        b, h, add, d = key_states.shape
        if b * h != 1:  # views of spare storage would not be contiguous: concatenate as transformers does
            return super().update(key_states, value_states, *args, **kwargs)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = self.keys.shape[-2] if self.keys.numel() else 0
        kbuf = self._kbuf
        in_place = kbuf is not None and n > 0 and self.keys.data_ptr() == kbuf.data_ptr()
        if not in_place or n + add > kbuf.shape[-2]:
            cap = int((n + add) * GROWTH) + SLACK_TOKENS
            new_k = key_states.new_empty(b, h, cap, d)
            new_v = value_states.new_empty(b, h, cap, value_states.shape[-1])
            if n:
                new_k[:, :, :n] = self.keys
                new_v[:, :, :n] = self.values
            self._kbuf, self._vbuf = new_k, new_v
        self._kbuf[:, :, n : n + add] = key_states
        self._vbuf[:, :, n : n + add] = value_states
        self.keys = self._kbuf[:, :, : n + add]
        self.values = self._vbuf[:, :, : n + add]
        return self.keys, self.values

    def reset(self) -> None:
        self._kbuf = self._vbuf = None
        super().reset()


class WindowLayer(DynamicSlidingWindowLayer):
    """transformers' sliding-window layer that keeps only its window in memory, optionally in ``dtype``.

    transformers stores the window as a slice of the call's concatenated K and V, and a slice holds
    its whole storage: after a 32K prefill every sliding layer kept all 32K keys and values alive
    (64 MiB per Gemma 3 270M layer in float32, 960 MiB over its 15 sliding layers), although it
    reads only the last ``sliding_window - 1``.  This layer copies the window out when the call's
    states are larger than twice the window (a prefill), so the rest is freed with the call.
    One-token decode steps keep transformers' slice of a window-sized tensor: nothing to free there.
    """

    def __init__(self, sliding_window: int, dtype: torch.dtype | None = None, **kwargs: Any) -> None:
        super().__init__(sliding_window=sliding_window, **kwargs)
        self.store_dtype = dtype  # None: as given

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key_states, value_states = _as_stored(self.store_dtype, key_states, value_states)
        full_k, full_v = super().update(key_states, value_states, *args, **kwargs)
        if full_k.shape[-2] > 2 * self.sliding_window and self.keys.shape[-2] < full_k.shape[-2]:
            self.keys, self.values = self.keys.clone(), self.values.clone()
        return full_k, full_v


KV_DTYPES = {"float32": None, "float16": torch.float16}  # --kv-dtype -> the stored dtype (None: the model's)


def new_cache(config: Any, dtype: torch.dtype | None = None) -> DynamicCache:
    """A DynamicCache for ``config``: GrowingLayer for full-attention layers, WindowLayer for sliding ones.

    ``dtype``: store K and V in it (float16 under a float32 model); None stores what the model computes.
    """
    cache = DynamicCache(config=config)
    layers = []
    for layer in cache.layers:
        if type(layer) is DynamicLayer:
            layers.append(GrowingLayer(dtype))
        elif type(layer) is DynamicSlidingWindowLayer:
            layers.append(WindowLayer(layer.sliding_window, dtype))
        elif dtype is not None:
            raise NotImplementedError(f"a {dtype} KV cache has no {type(layer).__name__} layer; leave out --kv-dtype")
        else:
            layers.append(layer)
    cache.layers = layers
    return cache
