"""The incremental chunk index (edgeattn/chunk_index.py) and sparse decode on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edgeattn import chunk_index as ci
from edgeattn import dhsa
from edgeattn.chunking import PredictorBoundaries, ShiftBoundaries
from edgeattn.config import AttentionConfig, ConfigError
from edgeattn.models import LoadedModel
from edgeattn.predictor import BoundaryPredictor, PredictorConfig
from edgeattn.runtime.torch_backend import TorchSession
from edgeattn.tiny import tiny_model


def _segment_keys(length: int, heads: int = 2, dim: int = 16, seed: int = 0) -> torch.Tensor:
    """Keys whose content shifts every 12-40 tokens (so the adaptive rules cut), plus noise."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(12, 40, (length,), generator=g)
    seg = torch.repeat_interleave(torch.arange(length), lens)[:length]
    means = torch.randn(length, dim, generator=g) * 2
    return torch.randn(1, heads, length, dim, generator=g) * 0.5 + means[seg][None, None]


def _rules() -> dict[str, ci.ChunkRule]:
    torch.manual_seed(0)
    net = BoundaryPredictor(PredictorConfig(in_dim=32, hidden=16, window=8, mlp=16)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.5)  # an untrained net's zero-initialised pooling queries give flat logits
    # a threshold that about one position in six passes, as a calibrated predictor's does
    logits = PredictorBoundaries(net).scores(_segment_keys(400))
    net.config = PredictorConfig(in_dim=32, hidden=16, window=8, mlp=16, threshold=float(logits.quantile(0.85)))
    return {
        "fixed": ci.FixedRule(16),
        "shift": ci.rule_for(AttentionConfig(chunking="shift", max_chunk=48), ShiftBoundaries(8, 48, window=32)),
        "predictor": ci.rule_for(AttentionConfig(chunking="predictor", max_chunk=48), PredictorBoundaries(net, 8, 48)),
    }


@pytest.mark.parametrize("source", ["fixed", "shift", "predictor"])
def test_incremental_index_equals_rebuilt(source: str) -> None:
    rule = _rules()[source]
    keys = _segment_keys(400)
    idx = ci.ChunkIndex.build(keys[:, :, :200], rule)  # "prefill" of 200 tokens
    closed_at_prefill = idx.closed
    for length in range(201, 401):  # one token per step, as decode appends
        idx.append(keys[:, :, :length])
        if length in (333, 400):
            ref = ci.ChunkIndex.build(keys[:, :, :length], rule)
            assert idx.bounds == ref.bounds
            assert idx.length == ref.length == length
            torch.testing.assert_close(idx.kbar(), ref.kbar(), rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(idx.start_sums(), ref.start_sums(), rtol=1e-5, atol=1e-3)
            assert torch.equal(idx.lengths(), ref.lengths())
            assert idx.kernel_boundaries().tolist() == ref.kernel_boundaries().tolist() == idx.boundaries()
    assert idx.closed - closed_at_prefill >= 5  # the appended tokens closed several chunks
    lens = idx.lengths().tolist()
    assert all(rule.min_chunk <= n <= rule.max_chunk for n in lens)
    if source != "fixed":
        assert len(set(lens)) > 2  # adaptive: the cuts follow the content, not a fixed grid


def test_multi_token_appends_equal_single_token_appends() -> None:
    rule = _rules()["shift"]
    keys = _segment_keys(400)
    a = ci.ChunkIndex.build(keys[:, :, :100], rule)
    b = ci.ChunkIndex.build(keys[:, :, :100], rule)
    for length in range(101, 401):
        a.append(keys[:, :, :length])
    for length in (137, 250, 251, 400):  # chunked prefill appends several tokens at once
        b.append(keys[:, :, :length])
    assert a.bounds == b.bounds


@pytest.mark.parametrize(
    ("length", "local", "kind", "observe"),
    [
        (640, 0, "dhsa", 0),
        (650, 0, "dhsa", 0),
        (656, 0, "dhsa", 0),
        (650, 40, "dhsa", 0),
        (656, 40, "dhsa", 0),
        (650, 0, "block-sparse", 0),
        (650, 0, "dhsa", 16),
        (656, 40, "dhsa", 16),
    ],
)
def test_index_selection_and_attention_equal_reference(length: int, local: int, kind: str, observe: int) -> None:
    """Fixed chunks: the index's decode selection is the reference's select_chunks, and attention matches."""
    cfg = AttentionConfig(kind=kind, budget=160, chunk_size=16, sinks=4, local=local, observe=observe)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(length)
    k = _segment_keys(length) + 1.5  # a shared key component: the centring term matters
    v = torch.randn(k.shape, generator=g)
    q = torch.randn(1, 4, 1, 16, generator=g)
    idx = ci.ChunkIndex.build(k[:, :, :300], ci.FixedRule(16), normalize=kind == "dhsa")
    for n in range(301, length + 1):
        idx.append(k[:, :, :n])
    sel = idx.select(q, cfg, k)
    _, keep = dhsa.select_for(q, k, cfg, dhsa.fixed_boundaries(length, 16))
    if observe:
        assert not torch.equal(keep, dhsa.select_for(q, k, cfg.with_(observe=0), dhsa.fixed_boundaries(length, 16))[1])
    assert torch.equal(sel.keep, keep[:, :, 0, : sel.own + 1])
    assert not bool(keep[:, :, 0, sel.own + 1 :].any())
    ref = dhsa.attention(q, k, v, cfg, scaling=0.25)
    out = ci.attend_reference(q, k, v, sel, idx, cfg.sinks, 0.25)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out_tvm = ci.attend_tvm(q, k.contiguous(), v, idx, sel, cfg, 0.25)
    torch.testing.assert_close(out_tvm, ref, rtol=1e-5, atol=1e-5)


def _tiny_loaded(seed: int = 0) -> LoadedModel:
    return LoadedModel(tiny_model("gemma3", seed=seed), None, f"tiny-{seed}", Path("."))


def _greedy(session: TorchSession, ids: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    logits = session.append(ids)
    tokens, rows = [int(np.argmax(logits))], [logits]
    for _ in range(steps - 1):
        logits = session.append([tokens[-1]])
        rows.append(logits)
        tokens.append(int(np.argmax(logits)))
    session.reset()
    return tokens, np.stack(rows)


@pytest.mark.parametrize("kernels", ["reference", "tvm"])
def test_tiny_model_index_decode(kernels: str) -> None:
    """Budget >= context: equals dense.  Budget < context: the index gives what re-chunking gives."""
    loaded = _tiny_loaded()
    ids = [int(x) for x in np.random.RandomState(0).randint(4, 512, 100)]
    dense = _greedy(TorchSession(loaded, AttentionConfig(kind="dense"), kernels=kernels), ids, 24)
    full = TorchSession(loaded, AttentionConfig(kind="dhsa", budget=1024), kernels=kernels)
    tokens, logits = _greedy(full, ids, 24)
    assert tokens == dense[0]
    assert np.abs(logits - dense[1]).max() <= 1e-4 * np.abs(dense[1]).max()
    sparse = AttentionConfig(kind="dhsa", budget=64, chunk_size=16)
    on_index = TorchSession(loaded, sparse, kernels=kernels)
    a = _greedy(on_index, ids, 24)
    b = _greedy(TorchSession(loaded, sparse, kernels=kernels, incremental=False), ids, 24)
    assert a[0] == b[0]
    np.testing.assert_allclose(a[1], b[1], rtol=1e-4, atol=1e-4 * np.abs(b[1]).max())
    assert np.abs(a[1] - dense[1]).max() > 1e-3  # budget 64 of ~200 keys really prunes


def test_index_follows_the_cache_and_times_its_work() -> None:
    loaded = _tiny_loaded()
    s = TorchSession(loaded, AttentionConfig(kind="dhsa", budget=64, chunk_size=16), kernels="reference")
    logits = s.append(list(range(4, 104)))
    for _ in range(20):
        logits = s.append([int(np.argmax(logits))])
    layers = s.layers
    assert sorted(s.index.layers) == layers
    for i in layers:
        idx = s.index.layers[i]
        assert idx.length == 120
        assert idx.bounds == list(range(0, 113, 16))
    assert s.index.update_s > 0 and s.index.attend_s > 0


def test_past_state_from_another_model_or_config_is_refused() -> None:
    cfg = AttentionConfig(kind="dhsa", budget=64, chunk_size=16)
    a = TorchSession(_tiny_loaded(0), cfg, kernels="reference")
    a.append(list(range(4, 60)))
    past = a.past()
    same = TorchSession(_tiny_loaded(0), cfg, kernels="reference")
    same.resume(past)  # the same model and configuration: accepted, and decoding continues
    assert same.append([7]).shape == (512,)
    with pytest.raises(ConfigError, match="another model or configuration.*weights"):
        TorchSession(_tiny_loaded(1), cfg, kernels="reference").resume(a.past())
    with pytest.raises(ConfigError, match="attention"):
        TorchSession(_tiny_loaded(0), cfg.with_(budget=128), kernels="reference").resume(a.past())
    with pytest.raises(ConfigError, match="chunk_index"):
        TorchSession(_tiny_loaded(0), cfg, kernels="reference", incremental=False).resume(a.past())


def test_index_of_another_cache_is_refused() -> None:
    keys = _segment_keys(100)
    idx = ci.ChunkIndex.build(keys, ci.FixedRule(16))
    with pytest.raises(ValueError, match="another model or cache"):
        idx.append(torch.zeros(1, 4, 120, 16))
    with pytest.raises(ValueError, match="only 50"):
        idx.append(keys[:, :, :50])


def test_index_is_built_at_the_first_decode_step_from_the_cache() -> None:
    """Prefill calls leave no index (it would sit in the prefill's peak RSS); the first one-token step
    builds it from the cached keys, equal to the index built over them at once."""
    keys = _segment_keys(100)
    state = ci.IndexState(AttentionConfig(budget=64), ci.FixedRule(16))
    assert (
        state.attend(3, torch.zeros(1, 4, 99, 16), keys[:, :, :99], keys[:, :, :99], None, None, None, "reference")
        is None
    )
    assert state.layers == {}
    out = state.attend(3, torch.zeros(1, 4, 1, 16), keys, keys, None, None, None, "reference")
    assert out is not None and out.shape == (1, 4, 1, 16)
    built, ref = state.layers[3], ci.ChunkIndex.build(keys, ci.FixedRule(16))
    assert built.length == ref.length == 100 and built.bounds == ref.bounds
    assert torch.equal(built.lengths(), ref.lengths())


def test_unsupported_boundary_source_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="fixed, shift and predictor"):
        ci.rule_for(AttentionConfig(chunking="shift"), lambda keys, module: None)


@pytest.mark.real_model
@pytest.mark.parametrize(
    ("prompt", "steps"),
    [(256, 16), pytest.param(512, 64, marks=pytest.mark.slow)],  # the must-hold is the slow one
)
def test_real_model_full_budget_decode_equals_dense(real_model, prompt: int, steps: int) -> None:
    """Budget >= context on the default model: the same greedy tokens, logits within 1e-4 relative."""
    from edgeattn import text

    ids = text.token_ids(real_model.tokenizer, prompt)
    dense = _greedy(TorchSession(real_model, AttentionConfig(kind="dense"), kernels="reference"), ids, steps)
    dhsa_full = TorchSession(real_model, AttentionConfig(kind="dhsa", budget=4096), kernels="reference")
    tokens, logits = _greedy(dhsa_full, ids, steps)
    assert tokens == dense[0]
    rel = np.abs(logits - dense[1]).max(axis=1) / np.abs(dense[1]).max(axis=1)
    assert rel.max() <= 1e-4, rel.max()


def test_decode_benchmark_attention_rows_run(tmp_path: Path) -> None:
    """benchmarks/decode.py's attention-only rows (synthetic K/V), end to end, land in its JSON."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "d.json"
    cmd = [sys.executable, "benchmarks/decode.py", "--synthetic-kv", "--contexts", "3000", "--attn-reps", "2"]
    done = subprocess.run([*cmd, "--json", str(out)], cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    records = json.loads(out.read_text())["records"]
    assert [r["kernels"] for r in records] == ["tvm", "reference"]
    for r in records:
        assert r["attn_dense_ms"] > 0 and r["attn_dhsa_ms"] > 0 and r["attn_ratio"] > 0
    assert records[0]["attn_gather_ms"] > 0 and records[0]["attn_sparse_ms"] <= records[0]["attn_dhsa_ms"]
