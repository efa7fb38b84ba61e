"""The DHSA reference against the operator contract (DESIGN.md), on random inputs."""

from __future__ import annotations

import pytest
import torch

from edgeattn import dhsa
from edgeattn.config import AttentionConfig, ConfigError


def _qkv(groups: int, length: int, hkv: int = 2, d: int = 16, batch: int = 2, seed: int = 0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hkv * groups, length, d, generator=gen, dtype=dtype)
    k = torch.randn(batch, hkv, length, d, generator=gen, dtype=dtype)
    v = torch.randn(batch, hkv, length, d, generator=gen, dtype=dtype)
    return q, k, v


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("groups", [1, 2, 4, 8])
@pytest.mark.parametrize("length", [37, 101])
@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("kind", ["dhsa", "block-sparse"])
def test_full_budget_equals_dense(groups: int, length: int, softcap: float | None, kind: str) -> None:
    q, k, v = _qkv(groups, length)
    dense = dhsa.attention(q, k, v, AttentionConfig(kind="dense"), softcap=softcap)
    sparse = dhsa.attention(q, k, v, AttentionConfig(kind=kind, budget=length, chunk_size=8, sinks=3), softcap=softcap)
    assert _rel_err(sparse, dense) <= 1e-5


def test_full_budget_equals_dense_sliding_window_and_variable_chunks() -> None:
    q, k, v = _qkv(4, 90, hkv=1)
    bounds = torch.tensor([0, 5, 6, 20, 41, 42, 77, 90])
    dense = dhsa.attention(q, k, v, AttentionConfig(kind="dense"), window=24)
    sparse = dhsa.attention(q, k, v, AttentionConfig(budget=90, chunk_size=8), window=24, boundaries=bounds)
    assert _rel_err(sparse, dense) <= 1e-5


@pytest.mark.parametrize("groups", [1, 4])
def test_small_budget_kept_set_rules(groups: int) -> None:
    """Own causal chunk and sinks always kept, at most N_b keys, never a future key."""
    length, chunk, sinks, budget = 203, 8, 5, 40
    q, k, _ = _qkv(groups, length, seed=1)
    bounds = dhsa.fixed_boundaries(length, chunk)
    _, keep = dhsa.select_for(q, k, AttentionConfig(budget=budget, chunk_size=chunk, sinks=sinks), bounds)
    mask = dhsa.kept_token_mask(keep, bounds, length, sinks)  # [B, Hkv, L, L]
    pos = torch.arange(length)
    chunk_id = dhsa.chunk_of_token(bounds, length)
    own = (chunk_id[:, None] == chunk_id[None, :]) & (pos[None, :] <= pos[:, None])
    sink = (pos[None, :] < sinks) & (pos[None, :] <= pos[:, None])
    assert bool(mask[..., own].all()), "a query lost part of its own causal chunk"
    assert bool(mask[..., sink].all()), "a query lost a sink token"
    assert int(mask.sum(-1).max()) <= budget
    assert not bool(mask[..., pos[None, :] > pos[:, None]].any()), "a future key was kept"
    # the budget is actually used: late queries keep close to N_b keys
    assert int(mask[..., -1, :].sum(-1).min()) >= budget - chunk


def test_selection_prefers_high_scoring_chunks() -> None:
    """Plant a key chunk that matches every query: it must be selected by the last query chunk."""
    length, chunk = 128, 8
    q, k, v = _qkv(1, length, hkv=1, batch=1, seed=2)
    direction = torch.randn(16)
    q[..., :] += 3 * direction
    k[:, :, 40:48] += 3 * direction
    bounds = dhsa.fixed_boundaries(length, chunk)
    _, keep = dhsa.select_for(q, k, AttentionConfig(budget=24, chunk_size=chunk, sinks=0), bounds)
    assert bool(keep[0, 0, -1, 5])


def test_sparse_matches_masked_reference() -> None:
    q, k, v = _qkv(2, 150, seed=3)
    cfg = AttentionConfig(budget=48, chunk_size=16, sinks=4)
    bounds = dhsa.fixed_boundaries(150, 16)
    _, keep = dhsa.select_for(q, k, cfg, bounds)
    mask = dhsa.kept_token_mask(keep, bounds, 150, 4)
    fast = dhsa.sparse_attention(q, k, v, keep, bounds, 0.25, 4, softcap=20.0, max_elements=4096)
    slow = dhsa.masked_attention(q, k, v, mask, 0.25, softcap=20.0)
    assert _rel_err(fast, slow) <= 1e-5


def test_decode_queries_are_a_suffix_of_the_keys() -> None:
    q, k, v = _qkv(4, 97, hkv=1, seed=4)
    cfg = AttentionConfig(budget=32, chunk_size=8, sinks=2)
    bounds = dhsa.fixed_boundaries(97, 8)
    for n_q in (1, 5):
        qd = q[:, :, -n_q:]
        _, keep = dhsa.select_for(qd, k, cfg, bounds)
        mask = dhsa.kept_token_mask(keep, bounds, n_q, 2)
        assert int(mask.sum(-1).max()) <= 32
        out = dhsa.sparse_attention(qd, k, v, keep, bounds, 0.25, 2)
        assert _rel_err(out, dhsa.masked_attention(qd, k, v, mask, 0.25)) <= 1e-5
    full = dhsa.attention(q[:, :, -1:], k, v, AttentionConfig(budget=97, chunk_size=8))
    dense = dhsa.attention(q[:, :, -1:], k, v, AttentionConfig(kind="dense"))
    assert _rel_err(full, dense) <= 1e-5


def test_chunk_pooling_is_length_normalized() -> None:
    x = torch.ones(1, 1, 10, 4)
    bounds = torch.tensor([0, 1, 10])
    pooled = dhsa.pool_chunks(x, bounds, normalize=True)
    assert torch.allclose(pooled[0, 0, :, 0], torch.tensor([1.0, 3.0]))
    assert torch.allclose(dhsa.pool_chunks(x, bounds, normalize=False)[0, 0, :, 0], torch.tensor([1.0, 1.0]))


def test_dhsa_scores_are_length_normalised_and_centred() -> None:
    """score[c, x] = sqrt(|c|·|x|)·mean(q over c)·(mean(k over x) - mean(k before c)), for x before c."""
    q, k, _ = _qkv(1, 64, hkv=1, batch=1, seed=5)
    bounds = torch.tensor([0, 3, 30, 41, 64])
    scores = dhsa.chunk_scores(q, k, bounds, bounds, normalize=True)[0, 0]
    for c in range(1, 4):
        qc = q[0, 0, bounds[c] : bounds[c + 1]]
        mu = k[0, 0, : bounds[c]].mean(0)
        for x in range(c):
            kx = k[0, 0, bounds[x] : bounds[x + 1]]
            expected = (len(qc) * len(kx)) ** 0.5 * qc.mean(0) @ (kx.mean(0) - mu)
            assert torch.allclose(scores[c, x], expected, rtol=1e-4, atol=1e-5)
    # block-sparse: plain means, no centring (a per-row constant would not change its ranking)
    block = dhsa.chunk_scores(q, k, bounds, bounds, normalize=False)[0, 0]
    assert torch.allclose(block[3, 1], q[0, 0, 41:].mean(0) @ k[0, 0, 3:30].mean(0), rtol=1e-4)


def test_selection_ignores_a_common_key_offset() -> None:
    """Attention is blind to a vector added to every key; so are DHSA's chunk scores (variable chunks).

    The observation window's max over several queries (a window, or the query heads of a GQA group)
    is not: each query's logits shift by its own q·c.  So this holds for the paper's selection."""
    q, k, _ = _qkv(2, 300, hkv=1, batch=1, seed=11)
    gen = torch.Generator().manual_seed(3)
    cuts = torch.sort(torch.randperm(290, generator=gen)[:30] + 5).values
    bounds = torch.unique(torch.cat([torch.tensor([0]), cuts, torch.tensor([300])]))
    cfg = AttentionConfig(budget=96, chunk_size=8, sinks=2, observe=0)
    offset = 3.0 * torch.randn(k.shape[-1], generator=gen)
    _, keep = dhsa.select_for(q, k, cfg, bounds)
    _, keep_shifted = dhsa.select_for(q, k + offset, cfg, bounds)
    assert torch.equal(keep, keep_shifted)


def test_centring_leaves_fixed_chunk_ranking_alone() -> None:
    """With equal chunk lengths the centring term is one constant per row: same kept chunks as raw scores."""
    q, k, _ = _qkv(2, 256, hkv=2, batch=1, seed=8)
    bounds = dhsa.fixed_boundaries(256, 16)
    raw = dhsa.chunk_scores(q, k, bounds, bounds, center=False)
    assert not torch.allclose(raw, dhsa.chunk_scores(q, k, bounds, bounds))  # the term is there ...
    cfg = AttentionConfig(budget=80, chunk_size=16, sinks=4, observe=0)  # the chunk scores alone
    _, keep = dhsa.select_for(q, k, cfg, bounds)
    assert torch.equal(keep, dhsa.select_chunks(raw, bounds, cfg.budget, cfg.sinks))  # ... and changes nothing


def test_config_rejects_budget_below_own_chunk() -> None:
    with pytest.raises(ConfigError, match="--budget >= 36"):
        AttentionConfig(budget=20, chunk_size=32, sinks=4)
    with pytest.raises(ConfigError, match="unknown attention kind"):
        AttentionConfig(kind="sparse")  # type: ignore[arg-type]


def test_bad_boundaries_are_rejected() -> None:
    q, k, v = _qkv(1, 20, batch=1)
    cfg = AttentionConfig(budget=20, chunk_size=4)
    for bad in ([0, 5, 5, 20], [1, 10, 20], [0, 10, 19]):
        with pytest.raises(ValueError, match="boundaries"):
            dhsa.attention(q, k, v, cfg, boundaries=torch.tensor(bad))


def test_computed_scores_counts_the_mask() -> None:
    q, k, _ = _qkv(2, 77, seed=6)
    bounds = dhsa.fixed_boundaries(77, 8)
    _, keep = dhsa.select_for(q, k, AttentionConfig(budget=24, chunk_size=8, sinks=3), bounds)
    kept = int(dhsa.kept_token_mask(keep, bounds, 77, 3).sum())
    assert dhsa.computed_scores(keep, bounds, 77, 3) == kept
