"""The default model (Gemma 3 270M) compiled with `edgeattn compile`: the tvm backend gives ONNX Runtime's
logits on the same file, dense and DHSA (a prompt longer than the budget, so DHSA really selects), in
prefill and 8 decode steps.  Slow: compiling the real model takes minutes (cached afterwards)."""

from __future__ import annotations

import numpy as np
import pytest

from edgeattn.config import AttentionConfig

pytest.importorskip("tvm")
pytestmark = [pytest.mark.slow, pytest.mark.real_model]

LENGTH = 2600  # > budget 2048: DHSA keeps a subset of the chunks for the late queries
MAX_CONTEXT = 4096


@pytest.mark.parametrize("kind", ["dense", "dhsa"])
def test_default_model_matches_onnxruntime(real_model, kind: str) -> None:
    from edgeattn.runtime import ort_backend, tvm_backend

    path = ort_backend.cached_export(real_model, AttentionConfig(kind=kind))
    tvm_sess = tvm_backend.open_session(path, max_context=MAX_CONTEXT, quiet=True)
    ort_sess = ort_backend.open_session(path, kernels="reference")
    rng = np.random.default_rng(0)
    steps = [rng.integers(10, 200_000, LENGTH).tolist()] + [[int(t)] for t in rng.integers(10, 200_000, 8)]
    for ids in steps:
        got, want = tvm_sess.append(ids), ort_sess.append(ids)
        err = float(np.abs(got - want).max() / np.abs(want).max())
        assert err < 1e-4, (kind, tvm_sess.cached_tokens, err)
    tvm_sess.close()
    ort_sess.close()
