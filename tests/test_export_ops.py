"""The ai.edgeattn function bodies, run by ONNX Runtime, against the PyTorch reference (edgeattn.dhsa)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto

from edgeattn import dhsa
from edgeattn.config import AttentionConfig
from edgeattn.export import ops

F, I = TensorProto.FLOAT, TensorProto.INT64
Q = ("q", F, ["B", "Hq", "Lq", "D"])
K = ("k", F, ["B", "Hkv", "Lk", "D"])
V = ("v", F, ["B", "Hkv", "Lk", "D"])
BND = ("boundaries", I, ["N"])
SEL = ("sel", I, ["B", "Hkv", "Nq", "M"])
NSEL = ("nsel", I, ["B", "Hkv", "Nq"])
OUT = ("out", F, ["B", "Hq", "Lq", "D"])


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    onnx.checker.check_model(model, full_check=True)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _sel_from_keep(keep: torch.Tensor, width: int) -> np.ndarray:
    b, h, nq, _ = keep.shape
    ref = -np.ones((b, h, nq, width), np.int64)
    for i in range(b):
        for j in range(h):
            for c in range(nq):
                ids = keep[i, j, c].nonzero().flatten().tolist()
                ref[i, j, c, : len(ids)] = ids
    return ref


def run_ops(q, k, v, boundaries, cfg: AttentionConfig, scaling=0.25, softcap=None, window=None, min_chunk=None):
    width = ops.max_selected(cfg.budget, cfg.sinks, min_chunk or cfg.chunk_size)
    select = ops.single_op_model(
        ops.OP_SELECT,
        [Q, K, BND],
        [SEL, NSEL],
        budget=cfg.budget,
        sinks=cfg.sinks,
        max_selected=width,
        normalize=int(cfg.kind == "dhsa"),
        local=cfg.local,
        **({"observe": cfg.observe, "vertical": cfg.vertical_tokens} if cfg.vertical_tokens else {}),
    )
    sparse = ops.single_op_model(
        ops.OP_SPARSE,
        [Q, K, V, BND, SEL, NSEL],
        [OUT],
        scaling=scaling,
        softcap=float(softcap or 0.0),
        window=int(window or 0),
        sinks=cfg.sinks,
    )
    sel, nsel = _session(select).run(None, {"q": q.numpy(), "k": k.numpy(), "boundaries": boundaries.numpy()})
    feed = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "boundaries": boundaries.numpy(), "sel": sel, "nsel": nsel}
    (out,) = _session(sparse).run(None, feed)
    return sel, nsel, out, width


CASES = [
    # (batch, Hq, Hkv, Lq, Lk, chunk, budget, sinks, kind, softcap, window)
    (1, 4, 1, 37, 37, 4, 12, 2, "dhsa", None, None),  # prefill, odd length, one KV head
    (2, 4, 2, 45, 45, 8, 24, 4, "dhsa", 5.0, 12),  # batch 2, GQA, softcap + window
    (1, 2, 2, 33, 33, 4, 16, 0, "block-sparse", None, None),  # plain-mean pooling, no sinks
    (1, 4, 2, 1, 41, 4, 12, 2, "dhsa", None, None),  # decode: one query after a cache
    (1, 4, 2, 7, 41, 4, 12, 3, "dhsa", None, None),  # a query suffix that starts mid-chunk
    (1, 4, 2, 30, 30, 3, 13, 5, "dhsa", None, None),  # sinks straddle a chunk
]


@pytest.mark.parametrize("b,hq,hkv,lq,lk,chunk,budget,sinks,kind,softcap,window", CASES)
def test_ops_match_reference(b, hq, hkv, lq, lk, chunk, budget, sinks, kind, softcap, window):
    torch.manual_seed(lq * 31 + lk)
    d = 8
    q, k, v = torch.randn(b, hq, lq, d), torch.randn(b, hkv, lk, d), torch.randn(b, hkv, lk, d)
    cfg = AttentionConfig(kind=kind, budget=budget, chunk_size=chunk, sinks=sinks)
    bounds = dhsa.fixed_boundaries(lk, chunk)
    sel, nsel, out, width = run_ops(q, k, v, bounds, cfg, 0.25, softcap, window)
    _, keep = dhsa.select_for(q, k, cfg, bounds)
    assert (sel == _sel_from_keep(keep, width)).all()
    assert (nsel == keep.sum(-1).numpy()).all()
    # the own chunk is the last valid entry of every list (the ABI of kernels_tvm)
    last = np.take_along_axis(sel, (nsel - 1)[..., None], axis=-1)[..., 0]
    nc, nq = len(bounds) - 1, sel.shape[2]
    assert (last == np.arange(nc - nq, nc)[None, None, :]).all()
    ref = dhsa.sparse_attention(q, k, v, keep, bounds, 0.25, sinks, softcap, window)
    assert np.abs(out - ref.numpy()).max() < 1e-5
    assert keep.float().mean() < 1.0  # the selection really drops chunks in these cases


@pytest.mark.parametrize("key_offset", [0.0, 2.0])
def test_variable_boundaries_as_input(key_offset: float):
    """Adaptive chunking feeds boundaries as a tensor: the ops take any valid partition.

    ``key_offset`` gives the keys a common component (as real keys have), where
    the centring term of DHSA's chunk scores decides the order.
    """
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 4, 40, 8), torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8)
    k = k + key_offset * torch.randn(8)
    bounds = torch.tensor([0, 3, 9, 12, 20, 26, 27, 35, 40])
    cfg = AttentionConfig(kind="dhsa", budget=16, chunk_size=8, sinks=2, chunking="shift", min_chunk=1, max_chunk=8)
    sel, _, out, width = run_ops(q, k, v, bounds, cfg, min_chunk=1)
    _, keep = dhsa.select_for(q, k, cfg, bounds)
    assert (sel == _sel_from_keep(keep, width)).all()
    ref = dhsa.sparse_attention(q, k, v, keep, bounds, 0.25, 2)
    assert np.abs(out - ref.numpy()).max() < 1e-5


@pytest.mark.parametrize(
    "kind,lq,option,tokens",
    [
        ("dhsa", 45, "local", 10),
        ("block-sparse", 45, "local", 20),
        ("dhsa", 1, "local", 10),
        ("dhsa", 7, "local", 30),
        ("dhsa", 45, "observe", 8),
        ("dhsa", 1, "observe", 8),
        ("dhsa", 7, "observe", 12),
    ],
)
def test_selection_options_match_reference(kind: str, lq: int, option: str, tokens: int):
    """The chunks an option ranks first, in the function body as in the reference (prefill, decode, a
    query suffix): ``local``, the band of recent keys; ``observe``, the observation window's vertical
    chunks (the body's ``vertical`` overload)."""
    torch.manual_seed(3 if option == "local" else 4)
    lk = 45
    q, k, v = torch.randn(1, 4, lq, 8), torch.randn(1, 2, lk, 8) + 1.0, torch.randn(1, 2, lk, 8)
    off = AttentionConfig(kind=kind, budget=24, chunk_size=4, sinks=2, local=0, observe=0)
    cfg = off.with_(**{option: tokens})
    bounds = dhsa.fixed_boundaries(lk, 4)
    sel, _, out, width = run_ops(q, k, v, bounds, cfg)
    _, keep = dhsa.select_for(q, k, cfg, bounds)
    assert (sel == _sel_from_keep(keep, width)).all()
    assert not torch.equal(keep, dhsa.select_for(q, k, off, bounds)[1])  # the option changes the selection here
    ref = dhsa.sparse_attention(q, k, v, keep, bounds, 0.25, 2)
    assert np.abs(out - ref.numpy()).max() < 1e-5


def test_full_budget_equals_dense():
    """With N_b >= L the ops keep every key: DHSA equals dense attention (the first test of every backend)."""
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 4, 51, 16), torch.randn(1, 2, 51, 16), torch.randn(1, 2, 51, 16)
    cfg = AttentionConfig(kind="dhsa", budget=4096, chunk_size=8, sinks=4)
    _, _, out, _ = run_ops(q, k, v, dhsa.fixed_boundaries(51, 8), cfg, scaling=0.3)
    dense = dhsa.dense_attention(q, k, v, 0.3)
    assert np.abs(out - dense.numpy()).max() < 1e-5


def test_functions_are_standard_onnx_only():
    """Bodies use default-domain ops only, none that TVM's frontend lacks (If, Loop) or cannot import
    with data-dependent sizes (TopK, NonZero)."""
    for fn in ops.functions():
        assert fn.domain == ops.DOMAIN
        kinds = {n.op_type for n in fn.node}
        assert all(n.domain in ("", "ai.onnx") for n in fn.node)
        assert not kinds & {"If", "Loop", "Scan", "TopK", "NonZero", "Unique"}
    names = [(fn.name, fn.overload) for fn in ops.functions()]
    assert names == [
        ("DHSAChunkSelect", ""),
        ("DHSAChunkSelect", "vertical"),
        ("DHSASparseAttention", ""),
        ("DHSASparseAttention", "nosoftcap"),
        ("DenseFlashAttention", ""),
        ("DenseFlashAttention", "nosoftcap"),
    ]
    assert not {n for n, _ in names} & {"Attention", "SparseAttention"}
