"""The host backend in PyTorch: transformers runs the standard ops, attention runs where we say.

Three ways to compute the same model, so the report can separate the gain from
sparsity from the gain from our kernels:

* ``transformers`` -- the model exactly as shipped (SDPA with explicit masks in
  the sliding layers); the baseline is never our own code;
* ``kernels="tvm"`` -- every attention layer on the TIR kernels of
  ``kernels_tvm`` through DLPack: the sparse layers with DHSA / block-sparse,
  the others on the dense flash kernel with their sliding window;
* ``kernels="reference"`` -- the sparse layers on the PyTorch reference
  (``edgeattn.dhsa``), the others as shipped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from edgeattn import fused_ops, patching
from edgeattn.config import AttentionConfig
from edgeattn.runtime import heap, kv_cache, threads
from edgeattn.runtime.session import SessionInfo


class TorchSession:
    """A loaded transformers model with one attention configuration and a DynamicCache."""

    def __init__(
        self,
        loaded: Any,
        cfg: AttentionConfig,
        *,
        kernels: str = "tvm",
        layers: str = "global",
        boundary_fn: Callable[..., Any] | None = None,
        as_shipped: bool = False,
        incremental: bool = True,
        kv_dtype: str = "float32",
    ) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.cfg = cfg
        self._as_shipped = as_shipped
        if as_shipped:
            self.layers: list[int] = []
            self.info = SessionInfo(backend="transformers", attention="dense", kernels="sdpa")
        else:
            self.layers = patching.parse_layers(layers, self.model.config)
            self.info = SessionInfo(backend="torch", attention=cfg.kind, kernels=kernels)
        self._kernels = kernels
        # K/V stored as float16 under the float32 model (--kv-dtype); the shipped baseline keeps its own cache
        self._kv_dtype = None if as_shipped else kv_cache.KV_DTYPES[kv_dtype]
        self._layers_spec = layers
        self._boundary_fn = boundary_fn
        self._cache: Any = None
        self._cached = 0
        # sparse layers decode on a chunk index kept beside the cache (edgeattn/chunk_index.py);
        # incremental=False re-chunks the whole cache at every step (the pre-index behaviour)
        self._index_rule = None
        if incremental and not as_shipped and cfg.kind != "dense":
            from edgeattn import chunk_index

            self._index_rule = chunk_index.rule_for(cfg, boundary_fn)
        self.index: Any = None  # chunk_index.IndexState of the current cache
        self._sig: dict[str, Any] | None = None

    def _patch(self) -> None:
        # patched per call: several sessions may share one model object, one at a time
        if self._as_shipped:
            patching.unpatch(self.model)
        elif self.cfg.kind == "dense" and self._kernels == "reference" and self._kv_dtype is None:
            patching.unpatch(self.model)  # the reference's dense attention is the model's own
        elif self.cfg.kind == "dense" and self._kernels == "reference":
            # the model's own attention, behind ours only to read the float16 cache in the model's dtype
            patching.patch(self.model, self.cfg, [], kernels="reference")
        else:
            patching.patch(
                self.model,
                self.cfg,
                self._layers_spec,
                self._boundary_fn,
                kernels=self._kernels,
                chunk_index=self.index,
            )
        # on our kernels the elementwise chain around attention runs fused too (edgeattn/fused_ops.py)
        if self._kernels == "tvm" and not self._as_shipped and fused_ops.enabled():
            fused_ops.patch(self.model)
        else:
            fused_ops.unpatch(self.model)

    def append(self, ids: Sequence[int]) -> np.ndarray:
        if not len(ids):
            raise ValueError("append() needs at least one token")
        from transformers import DynamicCache

        if self._cache is None:
            if self._as_shipped:
                self._cache = DynamicCache(config=self.model.config)
            else:  # appends in place: no whole-cache copy per decode step (runtime/kv_cache.py)
                self._cache = kv_cache.new_cache(self.model.config, self._kv_dtype)
            self.index = self._new_index()
        self._patch()
        # a decode step beside our kernels runs torch on one thread (runtime/threads.one_torch_thread says why);
        # a prefill hands each attention's freed temporaries back to the OS before the MLP (runtime/heap.py)
        one_thread = len(ids) == 1 and self._kernels == "tvm" and not self._as_shipped
        if one_thread:
            scope = threads.one_torch_thread()
        elif len(ids) >= heap.TRIM_FROM_TOKENS and not self._as_shipped:
            scope = heap.trimmed_after_each([layer.self_attn for layer in self.model.model.layers])
        else:
            scope = contextlib.nullcontext()
        try:
            with torch.inference_mode(), scope:
                out = self.model(
                    input_ids=torch.tensor([list(ids)], dtype=torch.long),
                    cache=self._cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
        finally:
            patching.unpatch(self.model)
        self._cached += len(ids)
        return out.logits[0, -1].float().numpy()

    def reset(self) -> None:
        self._cache = None
        self._cached = 0
        self.index = None

    def _signature(self) -> dict[str, Any]:
        if self._sig is None:
            from edgeattn import chunk_index

            rule = self._index_rule or chunk_index.FixedRule(self.cfg.chunk_size)
            sig = chunk_index.model_signature(self.model, self.cfg, rule, self.layers)
            self._sig = {**sig, "chunk_index": self._index_rule is not None}
        return self._sig

    def _new_index(self) -> Any:
        if self._index_rule is None:
            return None
        from edgeattn import chunk_index

        return chunk_index.IndexState(self.cfg, self._index_rule, self._signature())

    def past(self) -> Any:
        """The decode state to resume later (KV cache, chunk indexes, token count), signed with what made it."""
        from edgeattn import chunk_index

        return chunk_index.PastState(self._cache, self.index, self._cached, self._signature())

    def resume(self, past: Any) -> None:
        """Continue from a state :meth:`past` returned.  A state another model or configuration made is
        refused (ConfigError): its cache and chunk index would silently mean something else here."""
        past.check_matches(self._signature())
        self._cache, self.index, self._cached = past.cache, past.index, past.cached

    @property
    def cached_tokens(self) -> int:
        return self._cached

    def close(self) -> None:
        self.reset()
        patching.unpatch(self.model)
        fused_ops.unpatch(self.model)
