"""The ``ai.edgeattn`` custom ops as ONNX functions (FunctionProto), bodies in standard ONNX.

Two ops carry DHSA (``export/OPS.md`` is their contract; ``edgeattn.dhsa`` their
reference semantics):

* ``DHSAChunkSelect(q, k, boundaries) -> (sel, nsel)``: length-normalized chunk
  pooling, chunk-to-chunk scores (group-averaged per KV head) and the greedy
  budget fill, output as the kept key-chunk ids per (KV head, query chunk).
* ``DHSASparseAttention(q, k, v, boundaries, sel, nsel) -> out``: exact softmax
  attention over the sinks and the kept chunks (causal, optional window and
  softcap).

The outputs follow the TVM kernel ABI (``kernels_tvm/abi.py``: ``sel`` ascending
chunk ids with -1 padding, own chunk last; ``nsel`` the count) plus a leading
batch axis, so a runtime swaps each node for its kernel one to one.

The bodies use no If/Loop/TopK-with-dynamic-k (TVM's Relax ONNX frontend cannot
import those): the score-order greedy fill is computed without sorting, as
"chunk x is kept iff the charges of the eligible chunks ranked before it, plus
its own, fit", where "ranked before" is a pairwise comparison (higher score, or
equal score and lower index) -- the same order as the reference's stable sort.
This is O(Nq * Nc^2) at chunk level and the attention mask is O(Lq * Lk) at
token level: a portable path, not a fast one.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgeattn.export.onnx_builder import BOOL, FLOAT, INT32, INT64, OPSET, NodeBuilder
from edgeattn.kernels_tvm.abi import BAND_SCORE

DOMAIN = "ai.edgeattn"
DOMAIN_VERSION = 1
# Distinctive names: TVM's frontend dispatches on op_type alone (never `Attention`).
OP_SELECT = "DHSAChunkSelect"
OP_SPARSE = "DHSASparseAttention"
# Dense causal attention (optional sliding window) as one node: the kernels' dense flash ABI.
OP_DENSE = "DenseFlashAttention"
# Function overload of DHSASparseAttention for nodes with softcap == 0 (no capping nodes in the body).
NO_SOFTCAP = "nosoftcap"
# Function overload of DHSAChunkSelect for nodes with an observation window (attribute observe > 0).
VERTICAL = "vertical"


def _common_sizes(nb: NodeBuilder, q: str, k: str, boundaries: str) -> dict[str, str]:
    """Lengths and chunk tables both ops need (names of the tensors).

    For TVM's importer every chunk-indexed tensor is gathered with one index tensor
    (``x``, pinned to length len(boundaries) - 1) and every token-indexed one is pinned
    (Reshape, a no-op in ONNX) to the length of q or k, so its symbolic shape analysis
    can prove the shapes equal and lower the ops; Slice-based tables would get shapes it
    cannot compare.
    """
    zero, one = nb.scalar_i64(0), nb.scalar_i64(1)
    shape_q = nb.op("Shape", q)
    shape_k = nb.op("Shape", k)
    lq = nb.dim_tensor(shape_q, 2)
    lk = nb.dim_tensor(shape_k, 2)
    start = nb.op("Sub", lk, lq, hint="q_start")  # absolute position of query 0
    nc_shape = nb.unsqueeze(nb.op("Sub", nb.dim(nb.op("Shape", boundaries), 0), one), 0)  # [Nc] as a shape
    nc = nb.as_tensor(nc_shape)
    chunk_ids = nb.op("Reshape", nb.op("Range", zero, nc, one), nc_shape, hint="chunk_ids")  # [Nc]
    b_lo = nb.op("Gather", boundaries, chunk_ids, axis=0, hint="b_lo")  # chunk starts [Nc]
    b_hi = nb.op("Gather", boundaries, nb.op("Add", chunk_ids, one), axis=0, hint="b_hi")  # chunk ends [Nc]
    lens = nb.op("Sub", b_hi, b_lo, hint="chunk_len")
    holds_query = nb.op("Greater", b_hi, start)  # chunks that contain a query
    nq = nb.op("ReduceSum", nb.op("Cast", holds_query, to=INT64), keepdims=0, hint="nq")
    key_pos = nb.op("Reshape", nb.op("Range", zero, lk, one), nb.op("Slice", shape_k, nb.i64(2), nb.i64(3)))
    query_pos = nb.op("Reshape", nb.op("Range", start, lk, one), nb.op("Slice", shape_q, nb.i64(2), nb.i64(3)))
    grouped = _grouped_shape(nb, shape_q, shape_k)
    return dict(
        grouped=grouped,
        nq=nq,
        shape_q=shape_q,
        shape_k=shape_k,
        lq=lq,
        lk=lk,
        start=start,
        b_hi=b_hi,
        b_lo=b_lo,
        lens=lens,
        nc=nc,
        x=chunk_ids,
        key_pos=key_pos,
        query_pos=query_pos,
    )


def _grouped_shape(nb: NodeBuilder, shape_q: str, shape_k: str) -> str:
    """[B, Hkv, g, Lq, D] (g = Hq / Hkv), built from shape values only, so TVM's importer keeps it a shape."""
    group = nb.unsqueeze(nb.op("Div", nb.dim(shape_q, 1), nb.dim(shape_k, 1)), 0)  # [1]: g = Hq / Hkv
    return nb.op(
        "Concat",
        nb.op("Slice", shape_q, nb.i64(0), nb.i64(1)),
        nb.op("Slice", shape_k, nb.i64(1), nb.i64(2)),
        group,
        nb.op("Slice", shape_q, nb.i64(2), nb.i64(4)),
        axis=0,
        hint="grouped_shape",
    )


def _masked_attention(nb: NodeBuilder, q: str, k: str, v: str, grouped: str, mask: str, with_softcap: bool) -> str:
    """Exact softmax attention of q over k, v where ``mask`` (broadcast to [B,Hkv,g,Lq,Lk]) holds, query
    heads grouped per KV head: [B,Hkv,g,Lq,D] x [B,Hkv,1,D,Lk].  Returns [B,Hkv,g,Lq,D].

    Reads the attributes ``scaling`` and (``with_softcap``) ``softcap`` of the enclosing function.
    """
    scaling = nb.op("CastLike", nb.attr_const("scaling", "float"), q)
    qg = nb.op("Reshape", q, grouped)
    scores = nb.op("Mul", nb.op("MatMul", qg, nb.unsqueeze(nb.op("Transpose", k, perm=[0, 1, 3, 2]), 2)), scaling)
    if with_softcap:
        # softcap 0 = off; divide by 1 then (TVM rejects a division by the constant 0 even in a dead branch)
        softcap = nb.op("CastLike", nb.attr_const("softcap", "float"), q)
        capping = nb.op("Greater", softcap, nb.op("CastLike", nb.const(0.0, np.float32), q))
        safe_cap = nb.op("Where", capping, softcap, nb.op("CastLike", nb.const(1.0, np.float32), q))
        capped = nb.op("Mul", nb.op("Tanh", nb.op("Div", scores, safe_cap)), safe_cap)
        scores = nb.op("Where", capping, capped, scores)
    neg_inf = nb.op("CastLike", nb.const(-np.inf, np.float32), q)
    scores = nb.op("Where", mask, scores, neg_inf)
    probs = nb.op("Softmax", scores, axis=-1)
    return nb.op("MatMul", probs, nb.unsqueeze(v, 2))


def _prefix_sums(nb: NodeBuilder, x: str) -> str:
    """Exclusive prefix sums of x [B,H,L,D] along axis 2: [B,H,L+1,D], entry j = sum of x[:j]."""
    csum = nb.op("CumSum", x, nb.scalar_i64(2))
    return nb.op("Pad", csum, nb.i64(0, 0, 1, 0, 0, 0, 0, 0), hint="csum")


def _pool(nb: NodeBuilder, x: str, lo: str, hi: str, normalize: str, padded: str | None = None) -> str:
    """Sum of x [B,H,L,D] over [lo, hi) along axis 2, times 1/sqrt(len) (normalize) or 1/len."""
    padded = padded or _prefix_sums(nb, x)
    sums = nb.op("Sub", nb.op("Gather", padded, hi, axis=2), nb.op("Gather", padded, lo, axis=2))
    length = nb.op("CastLike", nb.op("Sub", hi, lo), x)
    scale = nb.op("Where", normalize, nb.op("Reciprocal", nb.op("Sqrt", length)), nb.op("Reciprocal", length))
    return nb.op("Mul", sums, nb.unsqueeze(scale, 1), hint="pooled")


def _vertical_chunks(nb: NodeBuilder, s: dict[str, str], k32: str, q32: str, kbar: str, sinks: str) -> str:
    """The vertical chunks of :func:`edgeattn.dhsa.vertical_chunks`: bool [B, Hkv, Nc].

    Reads the attributes ``observe`` (window of the last queries) and ``vertical`` (tokens).
    """
    observe = nb.attr_const("observe", "int")
    tokens = nb.attr_const("vertical", "int")
    first = nb.op("Sub", s["lk"], nb.op("Min", observe, s["lq"]), hint="window_start")
    # every query's q·k, the rows outside the window masked: the O(Lq·Lk) class of the sparse body's
    # token mask (a Slice of the window would have a data-dependent start that TVM's importer cannot
    # reshape)
    logits = nb.op(
        "MatMul", nb.op("Reshape", q32, s["grouped"]), nb.unsqueeze(nb.op("Transpose", k32, perm=[0, 1, 3, 2]), 2)
    )
    in_window = nb.unsqueeze(nb.op("GreaterOrEqual", s["query_pos"], first), 1)  # [Lq, 1]
    floor_score = nb.const(-BAND_SCORE, np.float32, hint="floor")
    best = nb.op("ReduceMax", nb.op("Where", in_window, logits, floor_score), nb.i64(2, 3), keepdims=0)  # [B,Hkv,Lk]
    k_chunk = nb.op(
        "ReduceSum",
        nb.op("Cast", nb.op("GreaterOrEqual", nb.unsqueeze(s["key_pos"], 1), nb.unsqueeze(s["b_hi"], 0)), to=INT64),
        nb.i64(1),
        keepdims=0,
    )  # [Lk]: chunk of every key
    shape_best = nb.op("Shape", best)
    out_shape = nb.op("Slice", nb.op("Shape", kbar), nb.i64(0), nb.i64(3))  # [B, Hkv, Nc]
    floor = nb.op("Expand", floor_score, out_shape)
    score = nb.op(
        "ScatterElements", floor, nb.op("Expand", k_chunk, shape_best), best, axis=2, reduction="max"
    )  # [B, Hkv, Nc]: the largest q·k of a window query with a key of each chunk
    cand = nb.op("LessOrEqual", s["b_hi"], first, hint="vertical_candidates")  # [Nc]: before the window's chunk
    x = s["x"]
    sx, sy = nb.unsqueeze(score, 3), nb.unsqueeze(score, 2)  # [B,H,Nc(x),1], [B,H,1,Nc(y)]
    y_lower = nb.op("Less", nb.unsqueeze(x, 0), nb.unsqueeze(x, 1))  # [x, y]: y < x
    before = nb.op("Or", nb.op("Greater", sy, sx), nb.op("And", nb.op("Equal", sy, sx), y_lower))
    before = nb.op("And", before, nb.unsqueeze(cand, 0))  # y must be a candidate
    zero = nb.scalar_i64(0)
    sink_overlap = nb.op("Max", nb.op("Sub", nb.op("Min", s["b_hi"], sinks), nb.op("Min", s["b_lo"], sinks)), zero)
    charge = nb.op("Cast", nb.op("Sub", s["lens"], sink_overlap), to=FLOAT)  # [Nc]
    charged = nb.squeeze(nb.op("MatMul", nb.op("Cast", before, to=FLOAT), nb.unsqueeze(charge, 1)), 3)
    fits = nb.op("LessOrEqual", nb.op("Add", charged, charge), nb.op("Cast", tokens, to=FLOAT))
    return nb.op("And", fits, cand, hint="vertical_chunks")


def chunk_select_function(with_vertical: bool = False) -> onnx.FunctionProto:
    """FunctionProto of DHSAChunkSelect (see OPS.md for the contract).

    ``with_vertical=True`` gives the overload ``vertical``: the same op with the observation
    window's vertical chunks (attributes ``observe``, ``vertical``); the default body has none
    of those nodes, so importers that lack ScatterElements' max reduction still read it.
    """
    nb = NodeBuilder()
    q, k, boundaries = "q", "k", "boundaries"
    s = _common_sizes(nb, q, k, boundaries)
    budget = nb.attr_const("budget", "int")
    sinks = nb.attr_const("sinks", "int")
    m_width = nb.attr_const("max_selected", "int")
    normalize = nb.op("Cast", nb.attr_const("normalize", "int"), to=BOOL)
    zero, one = nb.scalar_i64(0), nb.scalar_i64(1)

    # query chunks: the key chunks that contain a query, cut to the query range
    nq = s["nq"]
    offset = nb.op("Sub", s["nc"], nq, hint="offset")
    own = nb.op("Range", offset, s["nc"], one, hint="own_chunk")  # [Nq] key chunk of each query chunk
    own_lo = nb.op("Gather", s["b_lo"], own, hint="own_start")  # [Nq] first key of each own chunk
    q_lo = nb.op("Sub", nb.op("Max", own_lo, s["start"]), s["start"])
    q_hi = nb.op("Sub", nb.op("Gather", s["b_hi"], own), s["start"])

    # the chunk stage runs in float32 whatever the model dtype: running sums over thousands of
    # tokens in float16 would reorder the chunk scores
    k32 = nb.op("Cast", k, to=FLOAT)
    ksum = _prefix_sums(nb, k32)  # [B,Hkv,Lk+1,D]
    kbar = _pool(nb, k32, s["b_lo"], s["b_hi"], normalize, padded=ksum)  # [B,Hkv,Nc,D]
    # group-average the query heads of each KV head first ([B,Hq,Lq,D] -> [B,Hkv,Lq,D]); pooling is
    # linear, so this equals the reference's pool-then-average (to rounding)
    q32 = nb.op("Cast", q, to=FLOAT)
    q_mean = nb.op("ReduceMean", nb.op("Reshape", q32, s["grouped"]), nb.i64(2), keepdims=0)
    qbar = _pool(nb, q_mean, q_lo, q_hi, normalize)  # [B,Hkv,Nq,D]
    raw = nb.op("MatMul", qbar, nb.op("Transpose", kbar, perm=[0, 1, 3, 2]), hint="raw_scores")  # [B,Hkv,Nq,Nc]
    # DHSA scores keys relative to the mean key before the own chunk (edgeattn.dhsa.candidate_mean_term):
    # minus sqrt(|x|)·q̄_c·μ_c, with μ_c read from the prefix sums; block-sparse (normalize=0) skips it
    before = nb.op("Gather", ksum, own_lo, axis=2)  # [B,Hkv,Nq,D]: sum of the keys before each own chunk
    n_before = nb.op("Cast", nb.op("Max", own_lo, one), to=FLOAT)
    q_mu = nb.op("Div", nb.op("ReduceSum", nb.op("Mul", qbar, before), nb.i64(3), keepdims=0), n_before)  # [B,Hkv,Nq]
    sqrt_len = nb.op("Sqrt", nb.op("Cast", s["lens"], to=FLOAT))  # [Nc]
    term = nb.op("Mul", nb.unsqueeze(q_mu, 3), sqrt_len)  # [B,Hkv,Nq,Nc]
    term = nb.op("Where", normalize, term, nb.const(0.0, np.float32, hint="zero_f32"))
    scores = nb.op("Sub", raw, term, hint="chunk_scores")

    x = s["x"]
    x_row = nb.unsqueeze(x, 0)  # [1, Nc]
    own_col = nb.unsqueeze(own, 1)  # [Nq, 1]
    eligible = nb.op("Less", x_row, own_col, hint="eligible")  # [Nq, Nc]: strictly before the own chunk
    # the local band (attribute local, tokens): chunks ending after own_start - local rank first
    local = nb.attr_const("local", "int")
    near = nb.op("Greater", nb.unsqueeze(s["b_hi"], 0), nb.unsqueeze(nb.op("Sub", own_lo, local), 1))
    band = nb.op("And", near, eligible, hint="local_band")  # [Nq, Nc]
    band_score = nb.const(BAND_SCORE, np.float32, hint="band_score")
    scores = nb.op("Where", band, band_score, scores)
    if with_vertical:  # the observation window's chunks rank first too, wherever they are candidates
        pinned = nb.op("And", nb.unsqueeze(_vertical_chunks(nb, s, k32, q32, kbar, sinks), 2), eligible)
        scores = nb.op("Where", pinned, band_score, scores)
    # tokens each chunk costs outside the sinks; what is left after the own chunk and the sinks
    sink_overlap = nb.op("Max", nb.op("Sub", nb.op("Min", s["b_hi"], sinks), nb.op("Min", s["b_lo"], sinks)), zero)
    charge = nb.op("Sub", s["lens"], sink_overlap, hint="charge")  # [Nc]
    remaining = nb.op(
        "Sub",
        nb.op("Sub", budget, nb.op("Gather", s["lens"], own)),
        nb.op("Min", own_lo, sinks),
        hint="remaining",
    )  # [Nq]

    # pairwise "y ranks before x": higher score, or the same score and a lower index (stable sort order)
    sx = nb.unsqueeze(scores, 4)  # [B,H,Nq,Nc(x),1]
    sy = nb.unsqueeze(scores, 3)  # [B,H,Nq,1,Nc(y)]
    y_lower = nb.op("Less", nb.unsqueeze(x, 0), nb.unsqueeze(x, 1))  # [x, y]: y < x
    before = nb.op("Or", nb.op("Greater", sy, sx), nb.op("And", nb.op("Equal", sy, sx), y_lower))
    before = nb.op("And", before, nb.unsqueeze(eligible, 1), hint="ranked_before")  # y must be eligible
    charge_f = nb.unsqueeze(nb.op("Cast", charge, to=FLOAT), 1)  # [Nc, 1]
    charged_before = nb.squeeze(nb.op("MatMul", nb.op("Cast", before, to=FLOAT), charge_f), 4)  # [B,H,Nq,Nc]
    total = nb.op("Add", charged_before, nb.op("Cast", charge, to=FLOAT))
    fits = nb.op("LessOrEqual", total, nb.op("Cast", nb.unsqueeze(remaining, 1), to=FLOAT))
    keep = nb.op("Or", nb.op("And", fits, eligible), nb.op("Equal", x_row, own_col), hint="keep")  # [B,H,Nq,Nc]

    # kept chunk ids in ascending order, padded with -1 to width max_selected
    keep_i = nb.op("Cast", keep, to=INT64)
    # slot of each kept chunk = kept chunks before it (an exclusive prefix count, as a MatMul with the
    # strict upper triangle: TVM cannot lower CumSum over a data-dependent shape)
    earlier = nb.op("Cast", nb.op("Less", nb.unsqueeze(x, 1), x_row), to=FLOAT)  # [y, x]: y < x
    pos = nb.op("Cast", nb.op("MatMul", nb.op("Cast", keep, to=FLOAT), earlier), to=INT64)
    slots = nb.unsqueeze(nb.op("Range", zero, m_width, one), 1)  # [M, 1]
    match = nb.op("And", nb.unsqueeze(keep, 3), nb.op("Equal", nb.unsqueeze(pos, 3), slots))  # [B,H,Nq,M,Nc]
    nb.op(
        "ReduceMax",
        nb.op("Where", match, x, nb.scalar_i64(-1)),
        nb.i64(4),
        keepdims=0,
        outputs=["sel"],
    )
    count = nb.op("ReduceSum", keep_i, nb.i64(3), keepdims=0)
    nb.op("Where", nb.op("Greater", count, m_width), nb.scalar_i64(-1), count, outputs=["nsel"])
    attrs = {"budget": None, "sinks": 4, "max_selected": None, "normalize": 1, "local": 0}
    fn = _function(
        OP_SELECT,
        ["q", "k", "boundaries"],
        ["sel", "nsel"],
        nb,
        attrs | ({"observe": 0, "vertical": 0} if with_vertical else {}),
        "DHSA chunk stage: pooled chunk scores and budgeted key-chunk selection (see export/OPS.md)."
        + (" Overload with the observation window's vertical chunks." if with_vertical else ""),
    )
    if with_vertical:
        fn.overload = VERTICAL
    return fn


def sparse_attention_function(with_softcap: bool = True) -> onnx.FunctionProto:
    """FunctionProto of DHSASparseAttention (see OPS.md for the contract).

    ``with_softcap=False`` gives the overload ``nosoftcap``: the same op for nodes whose
    ``softcap`` is 0, without the capping nodes, which would otherwise cost three extra
    passes (and buffers) over the O(Lq * Lk) score tensor in runtimes that execute both
    branches of a Where (ONNX Runtime does).
    """
    nb = NodeBuilder()
    q, k, v, boundaries, sel = "q", "k", "v", "boundaries", "sel"
    s = _common_sizes(nb, q, k, boundaries)
    window = nb.attr_const("window", "int")
    sinks = nb.attr_const("sinks", "int")
    zero = nb.scalar_i64(0)

    nq = s["nq"]
    offset = nb.op("Sub", s["nc"], nq)
    tok = s["key_pos"]  # [Lk]
    qpos = s["query_pos"]  # [Lq]
    # chunk of every key token: how many chunk ends lie at or before it
    k_chunk = nb.op(
        "ReduceSum",
        nb.op("Cast", nb.op("GreaterOrEqual", nb.unsqueeze(tok, 1), nb.unsqueeze(s["b_hi"], 0)), to=INT64),
        nb.i64(1),
        keepdims=0,
        hint="key_chunk",
    )
    q_chunk = nb.op("Sub", nb.op("Gather", k_chunk, qpos), offset, hint="query_chunk")  # query-chunk index
    # chunk-level kept mask from the id lists: [B,H,Nq,M,1] == [Nc] -> any over M
    hit = nb.op("Cast", nb.op("Equal", nb.unsqueeze(sel, 4), s["x"]), to=INT32)
    kept_chunks = nb.op("Cast", nb.op("ReduceMax", hit, nb.i64(3), keepdims=0), to=BOOL)  # [B,H,Nq,Nc]
    # upsample to tokens as bool (1 byte per score, the token mask is the O(Lq * Lk) part)
    kept = nb.op("Gather", nb.op("Gather", kept_chunks, q_chunk, axis=2), k_chunk, axis=3)  # [B,H,Lq,Lk]
    visible = nb.op("Or", kept, nb.op("Less", tok, sinks))
    q_col = nb.unsqueeze(qpos, 1)
    causal = nb.op("LessOrEqual", nb.unsqueeze(tok, 0), q_col)  # [Lq, Lk]
    in_window = nb.op(
        "Or", nb.op("Less", nb.op("Sub", q_col, nb.unsqueeze(tok, 0)), window), nb.op("LessOrEqual", window, zero)
    )
    mask = nb.op("And", visible, nb.op("And", causal, in_window), hint="token_mask")  # [B,Hkv,Lq,Lk]

    # exact attention, query heads grouped per KV head
    out = _masked_attention(nb, q, k, v, s["grouped"], nb.unsqueeze(mask, 2), with_softcap)
    nb.op("Reshape", out, s["shape_q"], outputs=["out"])
    fn = _function(
        OP_SPARSE,
        ["q", "k", "v", "boundaries", "sel", "nsel"],
        ["out"],
        nb,
        {"scaling": None, "softcap": 0.0, "window": 0, "sinks": 4},
        "DHSA sparse attention: exact softmax over the sinks and the kept key chunks (see export/OPS.md)."
        + ("" if with_softcap else " Overload for softcap == 0."),
    )
    if not with_softcap:
        fn.overload = NO_SOFTCAP
    return fn


def dense_flash_function(with_softcap: bool = True) -> onnx.FunctionProto:
    """FunctionProto of DenseFlashAttention(q, k, v) -> out (see OPS.md).

    Causal GQA attention with optional window and softcap, exactly the plain dense
    attention the exporter writes otherwise, except that padding is not read (the op
    has no mask input, like the kernel ABI): the body builds the [Lq, Lk] mask from
    positions, so it is O(Lq * Lk) -- the portable path; a runtime that knows the op
    runs the dense flash kernel, which never forms it.  ``with_softcap=False`` is the
    overload ``nosoftcap`` (no capping nodes), as for DHSASparseAttention.
    """
    nb = NodeBuilder()
    q, k, v = "q", "k", "v"
    zero, one = nb.scalar_i64(0), nb.scalar_i64(1)
    shape_q, shape_k = nb.op("Shape", q), nb.op("Shape", k)
    lk = nb.dim_tensor(shape_k, 2)
    start = nb.op("Sub", lk, nb.dim_tensor(shape_q, 2), hint="q_start")
    tok = nb.op("Reshape", nb.op("Range", zero, lk, one), nb.op("Slice", shape_k, nb.i64(2), nb.i64(3)))
    qpos = nb.op("Reshape", nb.op("Range", start, lk, one), nb.op("Slice", shape_q, nb.i64(2), nb.i64(3)))
    window = nb.attr_const("window", "int")
    q_col = nb.unsqueeze(qpos, 1)
    causal = nb.op("LessOrEqual", nb.unsqueeze(tok, 0), q_col)  # [Lq, Lk]
    in_window = nb.op(
        "Or", nb.op("Less", nb.op("Sub", q_col, nb.unsqueeze(tok, 0)), window), nb.op("LessOrEqual", window, zero)
    )
    mask = nb.op("And", causal, in_window, hint="dense_mask")  # [Lq, Lk]
    out = _masked_attention(nb, q, k, v, _grouped_shape(nb, shape_q, shape_k), mask, with_softcap)
    nb.op("Reshape", out, shape_q, outputs=["out"])
    fn = _function(
        OP_DENSE,
        ["q", "k", "v"],
        ["out"],
        nb,
        {"scaling": None, "softcap": 0.0, "window": 0},
        "Dense causal attention (GQA, optional sliding window and softcap); see export/OPS.md."
        + ("" if with_softcap else " Overload for softcap == 0."),
    )
    if not with_softcap:
        fn.overload = NO_SOFTCAP
    return fn


def _function(
    name: str, inputs: list[str], outputs: list[str], nb: NodeBuilder, attrs: dict, doc: str
) -> onnx.FunctionProto:
    """Wrap a body; attributes with a default get an attribute_proto, the others are required."""
    required = [a for a, d in attrs.items() if d is None]
    defaults = [helper.make_attribute(a, d) for a, d in attrs.items() if d is not None]
    fn = helper.make_function(
        DOMAIN,
        name,
        inputs,
        outputs,
        nb.nodes,
        opset_imports=[helper.make_opsetid("", OPSET)],
        attributes=required,
        attribute_protos=defaults,
        doc_string=doc,
    )
    return fn


def functions() -> list[onnx.FunctionProto]:
    """Every ai.edgeattn function, to attach to a model (``model.functions``)."""
    return [
        chunk_select_function(),
        chunk_select_function(with_vertical=True),
        sparse_attention_function(),
        sparse_attention_function(with_softcap=False),
        dense_flash_function(),
        dense_flash_function(with_softcap=False),
    ]


def max_selected(budget: int, sinks: int, min_chunk: int) -> int:
    """Width M of ``sel``: the most chunks one query chunk can keep (same bound as the TVM ABI).

    Chunks that cost tokens cost >= min_chunk each, except the one straddling
    the sinks; chunks wholly inside the sinks cost nothing (at most ``sinks``);
    plus the own chunk.
    """
    return max(1, budget // max(1, min_chunk) + sinks + 2)


def single_op_model(op: str, inputs: list[tuple[str, int, list]], outputs: list[tuple[str, int, list]], **attrs):
    """A model holding one ai.edgeattn node and its function (tests and kernel checks)."""
    node = helper.make_node(op, [n for n, _, _ in inputs], [n for n, _, _ in outputs], domain=DOMAIN, **attrs)
    if op == OP_SELECT and attrs.get("observe"):
        node.overload = VERTICAL
    graph = helper.make_graph(
        [node],
        f"{op}_only",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)],
        functions=functions(),
    )
    model.ir_version = 10
    return model


__all__ = [
    "DOMAIN",
    "OP_SELECT",
    "OP_SPARSE",
    "OP_DENSE",
    "VERTICAL",
    "chunk_select_function",
    "dense_flash_function",
    "sparse_attention_function",
    "functions",
    "max_selected",
    "single_op_model",
    "TensorProto",
]
