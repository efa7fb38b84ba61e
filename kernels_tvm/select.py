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

    RB = 8  # query-chunk rows per block of step 2

    def nqb(nq):
        return (nq + RB - 1) // RB

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
        # ---- 2.-4. blocks of RB rows (KV head, query chunk): each pooled key chunk is read once for the
        # block's rows, not once per row (from L3 at 64K: 4 MiB of kbar per row made step 2 bandwidth-bound);
        # blocks in zig-zag order (0, n-1, 1, n-2, ...) so that each thread's contiguous share holds as
        # many early (short) rows as late (long) ones
        for item in T.parallel(hkv * nqb(Nq)):
            hh = T.Bind(item // nqb(Nq))
            i = T.Bind(item % nqb(Nq))
            blk = T.Bind(T.Select(i % 2 == 0, i // 2, nqb(Nq) - 1 - i // 2))
            c0 = T.Bind(blk * RB)
            nr = T.Bind(T.min(RB, Nq - c0))
            qbars = T.alloc_buffer((RB, d), "float32")
            qmus = T.alloc_buffer((RB,), "float32")
            scores = T.alloc_buffer((RB, Nc1 - 1), "float32")
            for r in range(nr):
                own = T.Bind(c0 + r + (Nc1 - 1) - Nq)
                ks = T.Bind(B[own])
                ke = T.Bind(B[own + 1])
                qs = T.Bind(T.max(ks, Lk - Lq))
                for dd in T.vectorized(d):
                    qbars[r, dd] = T.float32(0)
                for gi in range(g):
                    for t in range(ke - qs):
                        for d0 in range(nd):
                            for dv in T.vectorized(vl):
                                qbars[r, d0 * vl + dv] = qbars[r, d0 * vl + dv] + T.Cast(
                                    "float32", Q[hh * g + gi, qs + t - (Lk - Lq), d0 * vl + dv]
                                )
                qscale = T.alloc_buffer((1,), "float32", scope="local")
                if normalize:
                    qscale[0] = T.rsqrt(T.Cast("float32", ke - qs)) * T.float32(ginv)
                else:
                    qscale[0] = T.float32(ginv) / T.Cast("float32", ke - qs)
                for dd in T.vectorized(d):
                    qbars[r, dd] = qbars[r, dd] * qscale[0]
                # DHSA centring: q̄ · μ with μ = the mean key before the own chunk
                qmus[r] = T.float32(0)
                if normalize:
                    for dd in range(d):
                        qmus[r] = qmus[r] + qbars[r, dd] * kpre[hh, own, dd]
                    qmus[r] = qmus[r] / T.Cast("float32", T.max(ks, 1))
            # scores of the candidates x < own of each row (the last row has the most)
            part = T.alloc_buffer((vl,), "float32", scope="local")
            for x in range(c0 + nr - 1 + (Nc1 - 1) - Nq):
                for r in range(nr):
                    if x < c0 + r + (Nc1 - 1) - Nq:
                        for dv in T.vectorized(vl):
                            part[dv] = T.float32(0)
                        for d0 in range(nd):
                            for dv in T.vectorized(vl):
                                part[dv] = part[dv] + qbars[r, d0 * vl + dv] * kbar[hh, x, d0 * vl + dv]
                        scores[r, x] = T.float32(0)
                        for dv in range(vl):
                            scores[r, x] = scores[r, x] + part[dv]
                        if normalize:
                            scores[r, x] = scores[r, x] - T.sqrt(T.Cast("float32", B[x + 1] - B[x])) * qmus[r]
            # top-list insertion over candidates x < own (descending score, ties: lower id first)
            for r in range(nr):
                c = T.Bind(c0 + r)
                own = T.Bind(c + (Nc1 - 1) - Nq)
                ks = T.Bind(B[own])
                ke = T.Bind(B[own + 1])
                iv = T.alloc_buffer((5,), "int32", scope="local")  # count, pos, flag, used, kept (toplist.py)
                sc = T.alloc_buffer((1,), "float32", scope="local")
                iv[0] = 0
                for x in range(own):
                    sc[0] = scores[r, x]
                    if local > 0:
                        if B[x + 1] > ks - local:  # the local band ranks first (the reference's +inf)
                            sc[0] = T.float32(BAND_SCORE)
                    if observe > 0:
                        if pinned[hh, x] == 1:  # so do the vertical chunks
                            sc[0] = T.float32(BAND_SCORE)
                    insert(topv, SEL, hh, c, M, sc[0], x, iv)
                finish(B, SEL, NSEL, hh, c, M, own, ks, ke, iv)

    return tvm.IRModule({SYMBOL[OP_SELECT]: dhsa_chunk_select})
