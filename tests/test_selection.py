"""DHSA's selection defaults and options in every backend, against the reference (edgeattn.dhsa).

The CPU kernels run here; the GPU selection runs on PoCL (OpenCL) and its CUDA build goes
through nvcc.  The real-model test is the issue's retrieval check: at 2K tokens and budget L/8,
the default selection keeps the needle's chunk in every global layer and the greedy answer holds
the fact.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeattn import dhsa
from edgeattn.config import AttentionConfig, ConfigError
from edgeattn.kernels_tvm import registry


def _qkv(hq: int, hkv: int, lq: int, lk: int, d: int = 32, seed: int = 0, key_offset: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, hq, lq, d, generator=g)
    k = torch.randn(1, hkv, lk, d, generator=g) + key_offset * torch.randn(d, generator=g)
    v = torch.randn(1, hkv, lk, d, generator=g)
    return q, k, v


def _kept_lists(keep: torch.Tensor) -> list[list[list[int]]]:
    return [[row.nonzero().flatten().tolist() for row in head] for head in keep[0]]


def _kernel_lists(sel: np.ndarray, nsel: np.ndarray) -> list[list[list[int]]]:
    return [[sorted(sel[h, c, : nsel[h, c]].tolist()) for c in range(sel.shape[1])] for h in range(sel.shape[0])]


# ---------------------------------------------------------------- reference


def test_local_band_ranks_first_and_costs_budget() -> None:
    q, k, _ = _qkv(4, 2, 96, 96)
    b = dhsa.fixed_boundaries(96, 8)
    plain = AttentionConfig(budget=40, chunk_size=8, sinks=2, observe=0)  # the band alone
    band = plain.with_(local=20)
    _, keep0 = dhsa.select_for(q, k, plain, b)
    _, keep1 = dhsa.select_for(q, k, band, b)
    starts, ends = b[:-1], b[1:]
    for c in range(len(b) - 1):
        near = [x for x in range(c) if int(ends[x]) > int(starts[c]) - 20]
        assert keep1[0, :, c, near].all()  # the chunks reaching into the 20 keys before the own chunk
    assert not torch.equal(keep0, keep1)
    assert torch.equal(keep0, dhsa.select_for(q, k, plain.with_(local=0), b)[1])
    # the band is charged: the kept set still fits the budget
    mask = dhsa.kept_token_mask(keep1, b, 96, 2)
    assert int(mask.sum(-1).max()) <= 40


def test_vertical_chunks_keep_a_salient_key_the_means_bury() -> None:
    """One key the last queries single out, in a chunk whose mean buries it: the observation window
    pins its chunk, every later query chunk keeps it, and the kept sets still fit the budget."""
    q, k, _ = _qkv(4, 1, 256, 256, seed=2, key_offset=1.0)
    needle = 37  # in chunk 2 (chunks of 16)
    k[0, 0, needle] = 3.0 * q[0, 0, -1]  # what the last query looks for
    b = dhsa.fixed_boundaries(256, 16)
    plain = AttentionConfig(budget=48, chunk_size=16, sinks=4, observe=0)
    window = plain.with_(observe=16)
    assert window.vertical_tokens == 24  # half the budget by default
    with pytest.raises(ConfigError, match="vertical 64 exceeds the budget 48"):
        window.with_(vertical=64)
    pinned = dhsa.vertical_chunks(q, k, b, 16, window.vertical_tokens, 4)
    assert pinned[0, 0, 2] and int(pinned.sum()) == 1  # 24 tokens hold one 16-token chunk
    _, keep0 = dhsa.select_for(q, k, plain, b)
    _, keep1 = dhsa.select_for(q, k, window, b)
    assert not keep0[0, 0, -1, 2]  # the chunk means bury the key ...
    assert keep1[0, 0, 3:, 2].all()  # ... the window keeps it for every query chunk after it
    assert int(dhsa.kept_token_mask(keep1, b, 256, 4).sum(-1).max()) <= 48
    # the window is the call's last queries: a decode step's window is its one query
    _, keep_step = dhsa.select_for(q[:, :, -1:], k, window, b)
    assert keep_step[0, 0, 0, 2]


def test_default_chunk_is_16() -> None:
    """Chunks of 16 keep a single salient key visible (benchmarks/selection.py, CHUNKING.md)."""
    from edgeattn.config import DEFAULT_CHUNK_SIZE

    assert DEFAULT_CHUNK_SIZE == 16
    assert AttentionConfig().chunk_size == 16


def test_oracle_selection_bounds_the_mass_of_dhsa() -> None:
    """The mass-ranked oracle keeps at least the mass DHSA's selection keeps, under the same budget."""
    from edgeattn.coverage import kept_mass_streamed, oracle_selection

    q, k, _ = _qkv(4, 1, 256, 256, seed=11, key_offset=0.5)
    b = dhsa.fixed_boundaries(256, 16)
    cfg = AttentionConfig(budget=64)
    _, keep = dhsa.select_for(q, k, cfg, b)
    oracle = oracle_selection(q, k, 0.3, b, 64, 4, rows=100)
    got = kept_mass_streamed(q, k, 0.3, {"dhsa": (b, keep, 4), "oracle": (b, oracle, 4)}, rows=100)
    assert got["oracle"] >= got["dhsa"] - 1e-6 and got["dhsa"] < 0.99
    assert int(dhsa.kept_token_mask(oracle, b, 256, 4).sum(-1).max()) <= 64


def test_budget_at_least_length_is_dense_with_every_option() -> None:
    q, k, v = _qkv(4, 2, 70, 70)
    dense = dhsa.dense_attention(q, k, v, 0.2)
    for cfg in (
        AttentionConfig(budget=70),
        AttentionConfig(budget=70, local=32),
        AttentionConfig(budget=70, observe=16),
        AttentionConfig(budget=4096),
    ):
        out = dhsa.attention(q, k, v, cfg, scaling=0.2)
        assert (out - dense).abs().max() < 1e-5


def test_banded_sliding_attention_equals_masked() -> None:
    """dense_attention with a window is computed in bands for long inputs: the same attention."""
    q, k, v = _qkv(4, 2, 300, 300)
    for softcap in (None, 20.0):
        ref = dhsa.masked_attention(q, k, v, dhsa.causal_mask(300, 300, 40), 0.2, softcap)
        got = dhsa.dense_attention(q, k, v, 0.2, softcap, 40)
        assert (ref - got).abs().max() < 1e-5
    q1 = q[:, :, -200:]  # a query suffix (chunked prefill)
    ref = dhsa.masked_attention(q1, k, v, dhsa.causal_mask(200, 300, 40), 0.2)
    assert (dhsa.dense_attention(q1, k, v, 0.2, None, 40) - ref).abs().max() < 1e-5


# ---------------------------------------------------------------- CPU kernels (TVM, host LLVM)

CPU_CASES = [
    # (kind, lq, lk, chunk, budget, sinks, local, observe)
    ("dhsa", 200, 200, 16, 64, 4, 0, 0),  # the default chunk, 2 query chunks per 32-query tile
    ("dhsa", 200, 200, 16, 64, 4, 24, 0),  # local band
    ("block-sparse", 150, 150, 16, 48, 4, 16, 0),
    ("dhsa", 1, 190, 16, 64, 4, 24, 0),  # decode
    ("dhsa", 37, 190, 16, 64, 3, 40, 0),  # a query suffix (chunked prefill)
    ("dhsa", 200, 200, 16, 64, 4, 0, 16),  # observation window
    ("dhsa", 37, 190, 16, 64, 3, 24, 20),  # window + band on a suffix (the window spans two chunks)
    ("dhsa", 1, 190, 16, 64, 4, 0, 16),  # decode: the window is the one query
]


@pytest.mark.parametrize("kind,lq,lk,chunk,budget,sinks,local,observe", CPU_CASES)
def test_cpu_kernels_match_reference(kind, lq, lk, chunk, budget, sinks, local, observe) -> None:
    q, k, v = _qkv(4, 2, lq, lk, seed=lq + lk + local + observe)
    cfg = AttentionConfig(kind=kind, budget=budget, chunk_size=chunk, sinks=sinks, local=local, observe=observe)
    b = dhsa.fixed_boundaries(lk, chunk)
    out, sels = registry.run_layer(q, k, v, cfg, b, scaling=0.2, return_selection=True)
    _, keep = dhsa.select_for(q, k, cfg, b)
    assert _kernel_lists(*sels[0]) == _kept_lists(keep)
    ref = dhsa.attention(q, k, v, cfg, scaling=0.2, boundaries=b)
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-4
    assert keep.float().mean() < 0.9  # the budget really drops chunks


def test_cpu_variable_chunks_with_band_and_full_budget() -> None:
    q, k, v = _qkv(4, 1, 160, 160, seed=5)
    rng = np.random.default_rng(5)
    b = [0]
    while b[-1] < 160:
        b.append(min(160, b[-1] + int(rng.integers(5, 20))))
    b = torch.tensor(b)
    cfg = AttentionConfig(budget=60, chunking="shift", min_chunk=5, max_chunk=20, local=16)
    _, sels = registry.run_layer(q, k, v, cfg, b, return_selection=True)
    assert _kernel_lists(*sels[0]) == _kept_lists(dhsa.select_for(q, k, cfg, b)[1])
    full = cfg.with_(budget=160)
    out = registry.run_layer(q, k, v, full, b, scaling=0.2)
    assert (out - dhsa.dense_attention(q, k, v, 0.2)).abs().max() < 1e-4


def test_query_tile_follows_the_chunks() -> None:
    """The sparse kernel's tile fits the chunk length (a 16-token chunk in a 32-query tile is half padding)."""
    assert registry.query_tile_for(np.arange(0, 161, 16)) == 16
    assert registry.query_tile_for(np.arange(0, 321, 32)) == 32
    assert registry.query_tile_for(np.array([0, 5, 12, 20, 26])) == 8
    q, k, v = _qkv(4, 1, 100, 100, seed=7)
    b = dhsa.fixed_boundaries(100, 16)
    cfg = AttentionConfig(budget=48, chunk_size=16)
    ref = dhsa.attention(q, k, v, cfg, scaling=0.2, boundaries=b)
    for tile in (8, 16, 32):  # same result, whatever the tile
        got = _sparse_with_tile(q, k, v, cfg, b, tile)
        assert float((got - ref[0]).abs().max()) < 1e-5


def _sparse_with_tile(q, k, v, cfg, b, tile: int) -> torch.Tensor:
    from edgeattn.kernels_tvm.abi import OP_SELECT, OP_SPARSE

    hq, hkv, d = q.shape[1], k.shape[1], q.shape[-1]
    common = dict(heads_q=hq, heads_kv=hkv, head_dim=d)
    bt = registry.empty(b.shape, "int32").copy_(b.to(torch.int32))
    m = registry.selection_width(b.numpy(), cfg.budget, cfg.sinks)
    nq = len(b) - 1
    sel, nsel = registry.empty((hkv, nq, m), "int32"), registry.empty((hkv, nq), "int32")
    out = registry.empty(q.shape[1:]).fill_(float("nan"))
    registry.get_kernel(OP_SELECT, budget=cfg.budget, sinks=cfg.sinks, **common)(q[0], k[0], bt, sel, nsel)
    kern = registry.get_kernel(OP_SPARSE, sinks=cfg.sinks, scaling=0.2, query_tile=tile, **common)
    kern(q[0].contiguous(), k[0].contiguous(), v[0].contiguous(), bt, sel, nsel, out)
    return out


# ---------------------------------------------------------------- GPU selection (PoCL, nvcc)


def _opencl_problem() -> str | None:
    from edgeattn.kernels_tvm.gpu_opencl import opencl_problem

    return opencl_problem()


@pytest.mark.skipif(_opencl_problem() is not None, reason="no OpenCL device (PoCL) here")
@pytest.mark.parametrize("q_len,local,observe", [(None, 24, 0), (1, 24, 0), (9, 40, 0), (None, 0, 20), (1, 24, 16)])
def test_opencl_selection_with_local_band(q_len, local, observe) -> None:
    from edgeattn.kernels_tvm import gpu_kernels
    from edgeattn.kernels_tvm import targets as T
    from edgeattn.kernels_tvm.abi import OP_SELECT
    from edgeattn.kernels_tvm.gpu_cases import make_case
    from edgeattn.kernels_tvm.gpu_opencl import OpenCLKernelRunner

    case = make_case(
        4, 1, 16, 150, q_len=q_len, chunk=16, budget=64, sinks=4, seed=3, key_offset=1.0, local=local, observe=observe
    )
    target = T.get_target("opencl-mali")
    runner = OpenCLKernelRunner(gpu_kernels.build(case.spec(OP_SELECT), target), target)
    out = runner(*case.args(OP_SELECT))
    np.testing.assert_array_equal(out[3], case.sel)
    np.testing.assert_array_equal(out[4], case.nsel)


def test_cuda_selection_with_local_band_compiles(tmp_path) -> None:
    from edgeattn.kernels_tvm import gpu_cuda, gpu_kernels
    from edgeattn.kernels_tvm import targets as T
    from edgeattn.kernels_tvm.abi import OP_SELECT
    from edgeattn.kernels_tvm.gpu_cases import make_case

    if gpu_cuda.nvcc_path() is None:
        pytest.skip("nvcc not installed (CUDA toolkit)")
    profile = T.get_profile("cuda-sm87")
    spec = make_case(4, 1, 8, 40, local=16, observe=16).spec(OP_SELECT).with_(head_dim=256)
    assert spec.local == 16 and spec.observe == 16 and spec.vertical == 16
    path = gpu_cuda.write_cuda_artifact(gpu_kernels.build(spec, profile.target()), profile, tmp_path, "select_band")
    assert path.suffix == ".ptx" and ".entry" in path.read_text()


# ---------------------------------------------------------------- the real model


NEEDLES = ((0.1, "73519"), (0.5, "48263"))


def _needle_prompt(model, depth: float, fact: str):
    from edgeattn import needle, text

    body = model.tokenizer(text.pydoc_text(), add_special_tokens=False).input_ids[50_000:]
    return needle.build_prompt(model.tokenizer, body, 2048, depth, fact)


# slow: tests/test_eval.py runs the same retrieval (dense and DHSA answer a needle at 1K) through `edgeattn eval`
@pytest.mark.slow
@pytest.mark.real_model
def test_default_selection_answers_with_the_fact(real_model) -> None:
    """2K tokens of held-out prose, budget L/8, the defaults on the global layers: the greedy
    answer holds the fact hidden at 10 % and at 50 % depth."""
    from edgeattn import patching

    cfg = AttentionConfig(budget=2048 // 8)
    for depth, fact in NEEDLES:
        prompt = _needle_prompt(real_model, depth, fact)
        patching.patch(real_model.model, cfg, "global")
        try:
            x = torch.tensor([prompt.ids])
            with torch.inference_mode():
                out = real_model.model.generate(
                    x, attention_mask=torch.ones_like(x), max_new_tokens=10, do_sample=False
                )
        finally:
            patching.unpatch(real_model.model)
        answer = real_model.tokenizer.decode(out[0, len(prompt.ids) :], skip_special_tokens=True)
        assert fact in answer, (depth, answer)


@pytest.mark.real_model
def test_default_selection_keeps_the_needle_in_every_global_layer(real_model) -> None:
    """The issue's check: with the defaults DHSA keeps the needle's chunk in every global layer.

    Without the observation window (``observe=0``, the paper's selection) it did not: at 10 % depth
    global layer 11 ranked the needle's chunk 31st by score (4th by dense mass) and dropped it."""
    from edgeattn import models, needle
    from edgeattn.calibrate import capture

    cfg = AttentionConfig(budget=2048 // 8)
    layers = models.global_layers(real_model.config)
    for depth, fact in NEEDLES:
        prompt = _needle_prompt(real_model, depth, fact)
        store = capture(real_model.model, prompt.ids, layers, with_queries=True)
        for layer in layers:
            q, k, scaling = store[layer]["q"], store[layer]["k"], store[layer]["scaling"]
            bounds = dhsa.fixed_boundaries(2048, cfg.chunk_size)
            found = needle.needle_in_selection(q, k, scaling, bounds, cfg, prompt.span)
            assert found["kept"], (depth, layer, found["rank_score"], found["rank_mass"])
