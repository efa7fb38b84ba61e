"""TVM CPU kernels (host LLVM) against the PyTorch reference, and the kernel registry.

Tiny shapes; every kernel variant compiles once per session (the registry caches it and the
lengths are symbolic).  Outputs are poisoned before every run and must come back fully
written.  The CPU kernels compute in fp32; fp16 inputs are converted on load (tested too).
The selection here is the plain one (``observe=0``); tests/test_selection.py checks the
observation window in every backend.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import tvm

from edgeattn import dhsa
from edgeattn.config import AttentionConfig
from edgeattn.kernels_tvm import registry
from edgeattn.kernels_tvm.abi import OP_DENSE, OP_SELECT, OP_SPARSE, KernelSpec, max_selected, query_chunk_count

RTOL = 1e-4
POISON_I = -123456


def rel_err(out, ref) -> float:
    out = torch.as_tensor(np.asarray(out), dtype=torch.float64)
    ref = torch.as_tensor(ref, dtype=torch.float64)
    return float((out - ref).abs().max() / ref.abs().max())


def variable_boundaries(length: int, lo: int, hi: int, seed: int) -> torch.Tensor:
    """Random chunk lengths in [lo, hi] (the last may be shorter): a predictor-like partition."""
    rng = np.random.default_rng(seed)
    b = [0]
    while b[-1] < length:
        b.append(min(length, b[-1] + int(rng.integers(lo, hi + 1))))
    return torch.tensor(b, dtype=torch.int64)


def make_qkv(hq: int, hkv: int, d: int, lq: int, lk: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(hq, lq, d, generator=g)
    k = torch.randn(hkv, lk, d, generator=g)
    v = torch.randn(hkv, lk, d, generator=g)
    return q, k, v


def run_selection(q, k, b, budget: int, sinks: int, normalize: bool = True, width: int | None = None):
    hq, lq, d = q.shape
    hkv = k.shape[0]
    bl = b.tolist()
    nq = query_chunk_count(bl, lq)
    m = width or max_selected(budget, sinks, int(np.diff(bl).min()), len(bl) - 1)
    kern = registry.get_kernel(
        OP_SELECT, heads_q=hq, heads_kv=hkv, head_dim=d, budget=budget, sinks=sinks, normalize=normalize
    )
    sel = registry.empty((hkv, nq, m), "int32").fill_(POISON_I)
    nsel = registry.empty((hkv, nq), "int32").fill_(POISON_I)
    bt = registry.empty((len(bl),), "int32").copy_(b)
    kern(q, k, bt, sel, nsel)
    return sel, nsel, bt


def keep_from_sel(sel, nsel, nc: int) -> np.ndarray:
    hkv, nq, _ = sel.shape
    keep = np.zeros((hkv, nq, nc), bool)
    for h in range(hkv):
        for c in range(nq):
            keep[h, c, sel[h, c, : nsel[h, c]].numpy()] = True
    return keep


def reference(q, k, v, cfg, b, softcap=None, window=None):
    return dhsa.attention(
        q[None].double(), k[None].double(), v[None].double(), cfg, softcap=softcap, window=window, boundaries=b
    )[0]


def dense_ref(q, k, v, softcap=None, window=None):
    d = q.shape[-1]
    return dhsa.dense_attention(
        q[None].double(), k[None].double(), v[None].double(), 1 / math.sqrt(d), softcap, window
    )[0]


def run_sparse(q, k, v, b, cfg, softcap=None, window=None):
    hq, lq, d = q.shape
    sel, nsel, bt = run_selection(q, k, b, cfg.budget, cfg.sinks, cfg.kind == "dhsa")
    assert (nsel > 0).all()
    kern = registry.get_kernel(
        OP_SPARSE,
        heads_q=hq,
        heads_kv=k.shape[0],
        head_dim=d,
        sinks=cfg.sinks,
        softcap=softcap,
        window=window,
        decode=lq == 1,
    )
    out = registry.empty((hq, lq, d)).fill_(float("nan"))
    kern(q, k, v, bt, sel, nsel, out)
    assert not torch.isnan(out).any(), "output not fully written"
    return out, sel, nsel


def run_dense(q, k, v, softcap=None, window=None, decode=None):
    hq, lq, d = q.shape
    kern = registry.get_kernel(
        OP_DENSE,
        heads_q=hq,
        heads_kv=k.shape[0],
        head_dim=d,
        softcap=softcap,
        window=window,
        decode=(lq == 1) if decode is None else decode,
    )
    out = registry.empty((hq, lq, d)).fill_(float("nan"))
    kern(q, k, v, out)
    assert not torch.isnan(out).any(), "output not fully written"
    return out


# ------------------------------------------------------------------ selection


@pytest.mark.parametrize(
    "hq,hkv,kind",
    [
        (1, 1, "dhsa"),
        (2, 1, "dhsa"),
        (4, 1, "dhsa"),
        (8, 1, "dhsa"),
        (4, 2, "dhsa"),
        (1, 1, "block-sparse"),
        (4, 2, "block-sparse"),
    ],
)
def test_selection_identical_to_reference(hq: int, hkv: int, kind: str) -> None:
    d, length, chunk, budget, sinks = 32, 203, 8, 48, 3
    q, k, _ = make_qkv(hq, hkv, d, length, length, seed=hq + 10 * hkv)
    cases = [(dhsa.fixed_boundaries(length, chunk), k)]
    if kind == "dhsa":
        varied = variable_boundaries(length, 3, 17, seed=hq)
        # keys with a large common component: the centring term decides the order here
        common = 2.0 * torch.randn(d, generator=torch.Generator().manual_seed(hq))
        cases += [(varied, k), (varied, k + common.to(k.dtype))]
    cfg = AttentionConfig(observe=0, kind=kind, budget=budget, chunk_size=chunk, sinks=sinks, max_chunk=17, min_chunk=3)
    for b, k in cases:
        for lq in (length, 1, 37):  # prefill, decode, a suffix of queries
            qq = q[:, length - lq :]
            sel, nsel, _ = run_selection(qq, k, b, budget, sinks, normalize=kind == "dhsa")
            _, keep = dhsa.select_for(qq[None].double(), k[None].double(), cfg, b)
            nc = len(b) - 1
            assert np.array_equal(keep_from_sel(sel, nsel, nc), keep[0].numpy())
            for h in range(hkv):
                for c in range(sel.shape[1]):
                    row = sel[h, c].numpy()
                    n = int(nsel[h, c])
                    assert (np.diff(row[:n]) > 0).all()  # ascending
                    assert row[n - 1] == c + nc - sel.shape[1]  # own chunk last
                    assert (row[n:] == -1).all()  # tail written


def test_selection_reports_overflow_when_width_is_too_small() -> None:
    q, k, _ = make_qkv(4, 1, 16, 64, 64)
    b = dhsa.fixed_boundaries(64, 4)
    sel, nsel, _ = run_selection(q, k, b, budget=64, sinks=0, width=3)
    assert (nsel[0, -1] == -1) and (sel[0, -1] == -1).all()
    assert (nsel[0, :2] > 0).all()  # early rows fit


# ------------------------------------------------------------------ sparse attention


@pytest.mark.parametrize("hq,hkv,softcap", [(1, 1, None), (2, 1, 7.5), (4, 1, None), (8, 1, 7.5), (8, 2, None)])
def test_sparse_attention_matches_reference(hq: int, hkv: int, softcap: float | None) -> None:
    d, length = 32, 157
    q, k, v = make_qkv(hq, hkv, d, length, length, seed=hq * 3 + hkv)
    cfg = AttentionConfig(observe=0, kind="dhsa", budget=40, chunk_size=8, sinks=4, min_chunk=3, max_chunk=19)
    for b in (dhsa.fixed_boundaries(length, 8), variable_boundaries(length, 3, 19, seed=hq)):
        out, _, _ = run_sparse(q, k, v, b, cfg, softcap=softcap)
        assert rel_err(out, reference(q, k, v, cfg, b, softcap)) <= RTOL


def _host_has(feature: str) -> bool:
    from tvm.target import codegen

    return bool(codegen.target_has_features(feature, registry.host_target()))


@pytest.mark.parametrize("mcpu,feature", [("haswell", "avx2"), ("skylake-avx512", "avx512f")])
@pytest.mark.parametrize("query_tile", [8, 16, 32])
def test_sparse_attention_for_each_vector_width_and_query_tile(mcpu: str, feature: str, query_tile: int) -> None:
    """Every default schedule of the sparse kernel on x86 (AVX2: 40-key tiles at <= 64 rows), not
    only the host's: the kept keys are gathered into tiles across chunk borders, masks by position."""
    if not _host_has(feature):
        pytest.skip(f"this CPU has no {feature}: a {mcpu} build cannot run here")
    q, k, v = make_qkv(4, 1, 64, 163, 163, seed=query_tile)
    cfg = AttentionConfig(observe=0, kind="dhsa", budget=44, chunk_size=16, sinks=3)
    target = {"kind": "llvm", "mcpu": mcpu}
    for b, softcap, window in (
        (dhsa.fixed_boundaries(163, 16), None, None),
        (variable_boundaries(163, 3, 21, seed=query_tile), 7.5, None),
        (variable_boundaries(163, 5, 13, seed=1), None, 37),
    ):
        sel, nsel, bt = run_selection(q, k, b, cfg.budget, cfg.sinks)
        kern = registry.get_kernel(
            OP_SPARSE, target, heads_q=4, heads_kv=1, head_dim=64, sinks=3, softcap=softcap, window=window,
            query_tile=query_tile,
        )  # fmt: skip
        out = registry.empty((4, 163, 64)).fill_(float("nan"))
        kern(q, k, v, bt, sel, nsel, out)
        assert rel_err(out, reference(q, k, v, cfg, b, softcap, window)) <= RTOL


@pytest.mark.parametrize("window", [5, 40])
def test_sparse_attention_with_window_and_block_sparse(window: int) -> None:
    q, k, v = make_qkv(4, 2, 32, 141, 141, seed=window)
    for kind in ("dhsa", "block-sparse"):
        cfg = AttentionConfig(observe=0, kind=kind, budget=48, chunk_size=8, sinks=2)
        b = dhsa.fixed_boundaries(141, 8)
        out, _, _ = run_sparse(q, k, v, b, cfg, window=window)
        assert rel_err(out, reference(q, k, v, cfg, b, window=window)) <= RTOL


@pytest.mark.parametrize("hq,hkv,softcap", [(1, 1, None), (8, 1, 7.5), (8, 2, None)])
def test_sparse_decode_and_query_suffix(hq: int, hkv: int, softcap: float | None) -> None:
    d, length = 32, 203
    q, k, v = make_qkv(hq, hkv, d, length, length, seed=7)
    cfg = AttentionConfig(observe=0, kind="dhsa", budget=48, chunk_size=8, sinks=4, min_chunk=3, max_chunk=19)
    for b in (dhsa.fixed_boundaries(length, 8), variable_boundaries(length, 3, 19, seed=1)):
        for lq in (1, 29):
            qq = q[:, length - lq :]
            out, _, _ = run_sparse(qq, k, v, b, cfg, softcap=softcap)
            assert rel_err(out, reference(qq, k, v, cfg, b, softcap)) <= RTOL


def test_budget_at_least_length_equals_dense() -> None:
    d, length = 32, 133
    q, k, v = make_qkv(4, 1, d, length, length, seed=3)
    cfg = AttentionConfig(observe=0, kind="dhsa", budget=length, chunk_size=8, sinks=4)
    dense = dhsa.dense_attention(q[None].double(), k[None].double(), v[None].double(), 1 / math.sqrt(d))[0]
    for b in (dhsa.fixed_boundaries(length, 8), variable_boundaries(length, 4, 16, seed=2)):
        out, sel, nsel = run_sparse(q, k, v, b, cfg)
        assert (nsel[0] == torch.arange(1, len(b))).all()  # every causal chunk kept
        assert rel_err(out, dense) <= RTOL
        assert rel_err(out, run_dense(q, k, v)) <= RTOL
    # decode too
    out, _, _ = run_sparse(q[:, -1:], k, v, dhsa.fixed_boundaries(length, 8), cfg)
    assert rel_err(out, dense[:, -1:]) <= RTOL


# ------------------------------------------------------------------ dense flash attention


@pytest.mark.parametrize(
    "hq,hkv,softcap,window",
    [(1, 1, None, None), (2, 1, 6.0, None), (4, 1, None, 33), (8, 1, None, None), (8, 4, 6.0, 33)],
)
def test_dense_flash_matches_reference(hq: int, hkv: int, softcap: float | None, window: int | None) -> None:
    d = 32
    for length in (131, 77):
        q, k, v = make_qkv(hq, hkv, d, length, length, seed=length)
        ref = dense_ref(q, k, v, softcap, window)
        assert rel_err(run_dense(q, k, v, softcap, window), ref) <= RTOL


@pytest.mark.parametrize("window", [None, 20])
def test_dense_decode_and_suffix(window: int | None) -> None:
    q, k, v = make_qkv(4, 1, 32, 300, 300, seed=5)
    for lq, decode in ((1, True), (1, False), (13, False)):
        qq = q[:, -lq:]
        ref = dense_ref(qq, k, v, None, window)
        assert rel_err(run_dense(qq, k, v, window=window, decode=decode), ref) <= RTOL


def test_head_dim_256_default_model_shape() -> None:
    """The default model's global layer: Hq=4, Hkv=1, D=256, chunk 32, sinks 4."""
    q, k, v = make_qkv(4, 1, 256, 301, 301, seed=11)
    cfg = AttentionConfig(observe=0, kind="dhsa", budget=128, chunk_size=32, sinks=4)
    b = dhsa.fixed_boundaries(301, 32)
    out, _, _ = run_sparse(q, k, v, b, cfg)
    assert rel_err(out, reference(q, k, v, cfg, b)) <= RTOL
    dense = dhsa.dense_attention(q[None].double(), k[None].double(), v[None].double(), 1 / 16)[0]
    assert rel_err(run_dense(q, k, v), dense) <= RTOL


def test_no_out_of_bounds_reads_on_large_tensors() -> None:
    """Regression: a vectorised Select once read q past its end (rows of a partial tile), which
    segfaulted once q was a large, separately mapped tensor; 1024 tokens x D=256 is such a one."""
    cfg = AttentionConfig(observe=0, kind="dhsa", budget=256, chunk_size=32, sinks=4)
    for length in (200, 1021):
        q, k, v = make_qkv(4, 1, 256, length, length, seed=length)
        b = dhsa.fixed_boundaries(length, 32)
        out, _, _ = run_sparse(q, k, v, b, cfg)
        assert rel_err(out, reference(q, k, v, cfg, b)) <= RTOL


def test_fp16_inputs_within_1e3() -> None:
    """CPU kernels compute in fp32; fp16 tensors are converted on load (and the output rounded)."""
    hq, hkv, d, length = 4, 1, 32, 97
    q, k, v = (x.half() for x in make_qkv(hq, hkv, d, length, length, seed=9))
    kern = registry.get_kernel(OP_DENSE, heads_q=hq, heads_kv=hkv, head_dim=d, dtype="float16")
    out = registry.empty((hq, length, d), "float16").fill_(float("nan"))
    kern(q, k, v, out)
    ref = dhsa.dense_attention(q[None].double(), k[None].double(), v[None].double(), 1 / math.sqrt(d))[0]
    assert not torch.isnan(out).any()
    assert rel_err(out.float(), ref) <= 1e-3


# ------------------------------------------------------------------ registry and host wrapper


def test_run_layer_batch_and_numpy() -> None:
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 90, 32, generator=g)
    k = torch.randn(2, 2, 90, 32, generator=g)
    v = torch.randn(2, 2, 90, 32, generator=g)
    cfg = AttentionConfig(observe=0, kind="dhsa", budget=40, chunk_size=8, sinks=4)
    times = registry.LayerTimes()
    out = registry.run_layer(q, k, v, cfg, times=times)
    ref = dhsa.attention(q.double(), k.double(), v.double(), cfg)
    assert rel_err(out, ref) <= RTOL and times.select_s > 0 and times.attention_s > 0
    out_np = registry.run_layer(q.numpy(), k.numpy(), v.numpy(), AttentionConfig(kind="dense"))
    assert isinstance(out_np, np.ndarray)
    assert rel_err(out_np, dhsa.attention(q.double(), k.double(), v.double(), AttentionConfig(kind="dense"))) <= RTOL


def test_kernels_are_cached_and_length_symbolic() -> None:
    a = registry.get_kernel(OP_DENSE, heads_q=4, heads_kv=1, head_dim=32)
    b = registry.get_kernel("DenseFlashAttention", "llvm", heads_q=4, heads_kv=1, head_dim=32)
    assert a is b
    for length in (5, 64, 129):  # one compiled function for every length
        q, k, v = make_qkv(4, 1, 32, length, length, seed=length)
        out = registry.empty((4, length, 32)).fill_(float("nan"))
        a(q, k, v, out)
        ref = dhsa.dense_attention(q[None].double(), k[None].double(), v[None].double(), 1 / math.sqrt(32))[0]
        assert rel_err(out, ref) <= RTOL
    assert isinstance(a.mod, tvm.IRModule) and a.symbol in [gv.name_hint for gv in a.mod.get_global_vars()]


def test_primfunc_signatures_follow_the_abi() -> None:
    from edgeattn.kernels_tvm.abi import ARGS, SYMBOL

    for op, extra in ((OP_SELECT, {}), (OP_SPARSE, {}), (OP_DENSE, {}), (OP_SPARSE, {"decode": True})):
        mod = registry.build_module(op, heads_q=4, heads_kv=1, head_dim=32, **extra)
        func = mod[SYMBOL[op]]
        assert len(func.params) == len(ARGS[op])


def test_gpu_family_dispatches_to_gpu_kernels_module() -> None:
    try:
        import edgeattn.kernels_tvm.gpu_kernels  # noqa: F401
    except ModuleNotFoundError:
        with pytest.raises(NotImplementedError, match="gpu_kernels.py"):
            registry.get_kernel(OP_DENSE, "cuda", heads_q=4, heads_kv=1, head_dim=32, compile=False)
        return
    mod = registry.get_kernel(
        OP_DENSE, {"kind": "cuda", "arch": "sm_80"}, heads_q=4, heads_kv=1, head_dim=32, compile=False
    ).mod
    assert isinstance(mod, tvm.IRModule)


def test_aarch64_neon_schedules_compile() -> None:
    target = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"], "mcpu": "cortex-a76"}
    for op, extra in ((OP_SELECT, {}), (OP_SPARSE, {}), (OP_DENSE, {"decode": True})):
        kern = registry.get_kernel(op, target, heads_q=4, heads_kv=1, head_dim=64, **extra)
        asm = kern.lib.mod.inspect_source("asm")
        assert "fmla" in asm  # NEON fused multiply-add
        assert "expf" not in asm  # the polynomial exp, no libm call per score


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="multiple"):
        KernelSpec(OP_DENSE, 3, 2, 32)
    with pytest.raises(ValueError, match="unknown kernel op"):
        registry.get_kernel("Attention", heads_q=4, heads_kv=1, head_dim=32)
