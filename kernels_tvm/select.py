"""DHSAChunkSelect: chunk pooling, chunk scores and budgeted selection in TIR.

Semantics are exactly those of :func:`edgeattn.dhsa.select_for` (see KERNELS.md):

1. k̄[h, x] = pool of K over key chunk x (mean × sqrt(len) for DHSA, plain mean for
   block-sparse); q̄[h, c] = the same pool of the queries of query chunk c (the key
   chunk ``own = c + Nc - Nq`` cut to the query range), averaged over the g query
   heads of KV head h.
2. score[x] = q̄ · k̄[x] - sqrt(len(x)) · q̄ · μ for the key chunks x < own, where μ is the
   mean key before the own chunk (DHSA only: the centring of :mod:`edgeattn.dhsa`); μ comes
   from chunk prefix sums of the keys, kpre[h, x] = sum of K[h, :b_x].
3. Candidates in score order (descending; ties: lower chunk id first) are kept while
   their running token charge (chunk length minus its overlap with the sinks) fits in
   ``budget - len(own) - min(start(own), sinks)``: a prefix of the order.
4. Output: kept ids ascending, then ``own``; tail filled with -1; nsel = count.

With ``spec.local`` > 0 the key chunks that end after ``start(own) - local`` (the band of recent
keys) score ``abi.BAND_SCORE`` instead, above every real score: they rank first, ties by id,
as the reference's +inf.

With ``spec.observe`` > 0 (and ``spec.vertical`` tokens) step 0 picks the vertical chunks of
:func:`edgeattn.dhsa.vertical_chunks`: each key chunk before the chunk of the call's window (its
last ``min(observe, Lq)`` queries) scores the largest q·k between a window query of the group and
a key of the chunk; a top-list in that order is cut to its greedy prefix under ``vertical``
tokens, and those chunks score ``abi.BAND_SCORE`` in every row where they are candidates.  Cost:
O(observe·g·L·D), parallel over chunks.

No sort library: the candidates go through an insertion top-list of capacity M (the
width of ``sel``, :func:`abi.max_selected` guarantees the kept prefix fits), which
costs O(Nc) per row plus O(M) per insertion.  The whole kernel is O(L·D + Nc²·D/2)
work and O(Nc·D + Nq·M) memory: no L² buffer.  It runs in TIR on every target; the
loops are written for CPUs (parallel over chunk rows).
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

from .abi import BAND_SCORE, OP_SELECT, SYMBOL, KernelSpec
from .toplist import toplist_macros, vertical_pin_macro


def _lanes(d: int, maxl: int = 8) -> int:
    for v in (16, 8, 4, 2, 1):
        if v <= maxl and d % v == 0:
            return v
    return 1


def _vertical_macro(hkv: int, g: int, d: int, vl: int, observe: int, vertical: int, sinks: int, insert):
    """Step 0 as a TVMScript macro: ``pinned[h, x]`` = 1 for the vertical chunks, else 0."""
    nd = d // vl
    pin = vertical_pin_macro(vertical, sinks, insert)

    @T.macro
    def vertical_chunks(Q, K, B, pinned, Lq, Lk, Nc1, M):
        vscore = T.alloc_buffer((hkv, Nc1 - 1), "float32")
        vtop = T.alloc_buffer((hkv, 1, M), "float32")
        vsel = T.alloc_buffer((hkv, 1, M), "int32")
        for x in T.parallel(Nc1 - 1):
            for h in range(hkv):
                pinned[h, x] = 0
                vscore[h, x] = T.float32(-BAND_SCORE)
                if B[x + 1] <= Lk - T.min(observe, Lq):  # strictly before the window's first chunk
                    for gi in range(g):
                        for t in range(T.min(observe, Lq)):
                            for j in range(B[x + 1] - B[x]):
                                part = T.alloc_buffer((vl,), "float32", scope="local")
                                dot = T.alloc_buffer((1,), "float32", scope="local")
                                for dv in T.vectorized(vl):
                                    part[dv] = T.float32(0)
                                for d0 in range(nd):
                                    for dv in T.vectorized(vl):
                                        part[dv] = part[dv] + T.Cast(
                                            "float32", Q[h * g + gi, Lq - T.min(observe, Lq) + t, d0 * vl + dv]
                                        ) * T.Cast("float32", K[h, B[x] + j, d0 * vl + dv])
                                dot[0] = T.float32(0)
                                for dv in range(vl):
                                    dot[0] = dot[0] + part[dv]
                                vscore[h, x] = T.max(vscore[h, x], dot[0])
        for h in T.parallel(hkv):
            iv = T.alloc_buffer((5,), "int32", scope="local")  # count, pos, flag, used (toplist.py)
            pin(B, Nc1, vscore, vtop, vsel, pinned, h, M, Lk - T.min(observe, Lq), iv)

    return vertical_chunks


def build_chunk_select(spec: KernelSpec, lanes: int = 8) -> tvm.IRModule:
    """IRModule with one PrimFunc ``dhsa_chunk_select(q, k, boundaries, sel, nsel)``."""
    if spec.op != OP_SELECT:
        raise ValueError(f"build_chunk_select needs op {OP_SELECT}, got {spec.op}")
    hq, hkv, d, g = spec.heads_q, spec.heads_kv, spec.head_dim, spec.group
    dtype, kv_dtype = spec.dtype, spec.kv_type
    budget, sinks = int(spec.budget), int(spec.sinks)
    normalize = bool(spec.normalize)
    local = int(spec.local)
    observe, vertical = (int(spec.observe), int(spec.vertical)) if spec.vertical else (0, 0)
    vl = _lanes(d, lanes)
    nd = d // vl
    ginv = 1.0 / g
    insert, finish = toplist_macros(budget, sinks)
    vertical_chunks = _vertical_macro(hkv, g, d, vl, observe, vertical, sinks, insert)

    @T.prim_func
    def dhsa_chunk_select(q_h: T.handle, k_h: T.handle, b_h: T.handle, sel_h: T.handle, nsel_h: T.handle):
        T.func_attr({"global_symbol": SYMBOL[OP_SELECT], "tirx.noalias": True})
        Lq = T.int32()
        Lk = T.int32()
        Nc1 = T.int32()
        Nq = T.int32()
        M = T.int32()
        Q = T.match_buffer(q_h, (hq, Lq, d), dtype)
        K = T.match_buffer(k_h, (hkv, Lk, d), kv_dtype)
        B = T.match_buffer(b_h, (Nc1,), "int32")
        SEL = T.match_buffer(sel_h, (hkv, Nq, M), "int32")
        NSEL = T.match_buffer(nsel_h, (hkv, Nq), "int32")
        kbar = T.alloc_buffer((hkv, Nc1 - 1, d), "float32")
        topv = T.alloc_buffer((hkv, Nq, M), "float32")
        kpre = T.alloc_buffer((hkv, Nc1, d), "float32")  # kpre[h, x] = sum of K[h, :B[x]] (DHSA centring)
        pinned = T.alloc_buffer((hkv, Nc1 - 1), "int32")  # vertical chunks (step 0), 1 = ranks first
        if observe > 0:
            vertical_chunks(Q, K, B, pinned, Lq, Lk, Nc1, M)
        # ---- 1. key-chunk pooling
        for x in T.parallel(Nc1 - 1):
            for h in range(hkv):
                for d0 in range(nd):
                    acc = T.alloc_buffer((vl,), "float32", scope="local")
                    for dv in T.vectorized(vl):
                        acc[dv] = T.float32(0)
                    for t in range(B[x + 1] - B[x]):
                        for dv in T.vectorized(vl):
                            acc[dv] = acc[dv] + T.Cast("float32", K[h, B[x] + t, d0 * vl + dv])
                    for dv in T.vectorized(vl):
                        if normalize:
                            kbar[h, x, d0 * vl + dv] = acc[dv] * T.rsqrt(T.Cast("float32", B[x + 1] - B[x]))
                            kpre[h, x + 1, d0 * vl + dv] = acc[dv]
                        else:
                            kbar[h, x, d0 * vl + dv] = acc[dv] / T.Cast("float32", B[x + 1] - B[x])
        # ---- 1b. chunk sums -> prefix sums over chunks (sequential in x, parallel over heads and dims)
        if normalize:
            for hd in T.parallel(hkv * nd):
                for dv in T.vectorized(vl):
                    kpre[hd // nd, 0, (hd % nd) * vl + dv] = T.float32(0)
                for x in range(1, Nc1):
                    for dv in T.vectorized(vl):
                        kpre[hd // nd, x, (hd % nd) * vl + dv] = (
                            kpre[hd // nd, x, (hd % nd) * vl + dv] + kpre[hd // nd, x - 1, (hd % nd) * vl + dv]
                        )
        # ---- 2.-4. one row (KV head, query chunk) at a time
        for hc in T.parallel(hkv * Nq):
            hh = T.Bind(hc // Nq)
            c = T.Bind(hc % Nq)
            own = T.Bind(c + (Nc1 - 1) - Nq)
            ks = T.Bind(B[own])
            ke = T.Bind(B[own + 1])
            qs = T.Bind(T.max(ks, Lk - Lq))
            qbar = T.alloc_buffer((d,), "float32", scope="local")
            for dd in T.vectorized(d):
                qbar[dd] = T.float32(0)
            for gi in range(g):
                for t in range(ke - qs):
                    for d0 in range(nd):
                        for dv in T.vectorized(vl):
                            qbar[d0 * vl + dv] = qbar[d0 * vl + dv] + T.Cast(
                                "float32", Q[hh * g + gi, qs + t - (Lk - Lq), d0 * vl + dv]
                            )
            qscale = T.alloc_buffer((1,), "float32", scope="local")
            if normalize:
                qscale[0] = T.rsqrt(T.Cast("float32", ke - qs)) * T.float32(ginv)
            else:
                qscale[0] = T.float32(ginv) / T.Cast("float32", ke - qs)
            for dd in T.vectorized(d):
                qbar[dd] = qbar[dd] * qscale[0]
            # DHSA centring: q̄ · μ with μ = the mean key before the own chunk
            qmu = T.alloc_buffer((1,), "float32", scope="local")
            qmu[0] = T.float32(0)
            if normalize:
                for dd in range(d):
                    qmu[0] = qmu[0] + qbar[dd] * kpre[hh, own, dd]
                qmu[0] = qmu[0] / T.Cast("float32", T.max(ks, 1))
            # top-list insertion over candidates x < own (descending score, ties: lower id first)
            iv = T.alloc_buffer((5,), "int32", scope="local")  # count, pos, flag, used, kept (toplist.py)
            sc = T.alloc_buffer((1,), "float32", scope="local")
            part = T.alloc_buffer((vl,), "float32", scope="local")
            iv[0] = 0
            for x in range(own):
                for dv in T.vectorized(vl):
                    part[dv] = T.float32(0)
                for d0 in range(nd):
                    for dv in T.vectorized(vl):
                        part[dv] = part[dv] + qbar[d0 * vl + dv] * kbar[hh, x, d0 * vl + dv]
                sc[0] = T.float32(0)
                for dv in range(vl):
                    sc[0] = sc[0] + part[dv]
                if normalize:
                    sc[0] = sc[0] - T.sqrt(T.Cast("float32", B[x + 1] - B[x])) * qmu[0]
                if local > 0:
                    if B[x + 1] > ks - local:  # the local band ranks first (the reference's +inf)
                        sc[0] = T.float32(BAND_SCORE)
                if observe > 0:
                    if pinned[hh, x] == 1:  # so do the vertical chunks
                        sc[0] = T.float32(BAND_SCORE)
                insert(topv, SEL, hh, c, M, sc[0], x, iv)
            finish(B, SEL, NSEL, hh, c, M, own, ks, ke, iv)

    return tvm.IRModule({SYMBOL[OP_SELECT]: dhsa_chunk_select})
