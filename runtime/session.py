"""The seam every backend plugs into: a model on one backend, with one attention config, and its KV cache.

`edgeattn run` (``runtime/runner.py``) drives every backend the same way -- warm-up,
prefill (in one call, or in chunks when the memory budget says so), greedy decode,
measurement -- so a backend only has to say how to push tokens through the model.
Nothing here imports torch, onnxruntime or TVM: a device-side runtime (TVM's
runtime library + numpy) can implement it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class SessionInfo:
    """What the report says about how a session computes (one row of the run table)."""

    backend: str  # "torch", "ort", "tvm", "transformers" (the model as shipped)
    attention: str  # "dense", "dhsa", "block-sparse"
    kernels: str  # "tvm" (our TIR kernels), "reference" (PyTorch / ONNX function bodies), "sdpa", "gqa" ...
    device: str = "host"


@runtime_checkable
class Session(Protocol):
    """One loaded model on one backend.  The KV cache lives inside the session.

    ``append(ids)`` runs ``ids`` after the tokens already cached and returns the
    logits of the last of them (float32, shape [vocab]); the cache grows by
    ``len(ids)``.  Prefill is one ``append`` of the prompt or several of its
    chunks (chunked prefill under a memory budget); a decode step is
    ``append([token])``.  ``reset()`` empties the cache for the next prompt.
    """

    info: SessionInfo

    def append(self, ids: Sequence[int]) -> np.ndarray: ...

    def reset(self) -> None: ...

    @property
    def cached_tokens(self) -> int: ...

    def close(self) -> None: ...
