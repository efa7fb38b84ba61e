"""GPU schedules (OpenCL for Mali/Adreno, CUDA for Jetson and desktop) of the three DHSA kernels.

Same ABI as the CPU kernels (KERNELS.md, :mod:`.abi`): one PrimFunc per op,
named ``SYMBOL[op]`` with the parameters ``ARGS[op]``.  The schedules are
written by hand with explicit thread binding, because the loop structure is
data dependent (key ranges read from ``sel``/``boundaries``), which TVM's
automatic GPU rules (dlight) do not handle.

Attention (sparse and dense), one work-group per (KV head, query tile):

* ``blockIdx.x`` = KV head × query chunk (sparse) or KV head × query tile (dense);
  ``threadIdx.x`` = TQ query rows × the g query heads of the group, so one K/V
  tile in shared (local) memory serves every query head of the group (GQA).
* Keys stream through shared memory in tiles of TK (chosen so 2·TK·D floats fit
  the target's ``max_shared_memory_per_block``: 16 KiB on Mali/Adreno, 48 KiB CUDA).
* Each thread keeps its query row's accumulator in registers and runs the
  online softmax per key tile (one rescale per tile), so no L×L buffer exists.
* Sparse: the key loop runs over the sinks range ``[0, min(sinks, Lk))`` and the
  kept chunks ``sel[h, c, :nsel]`` cut to start after the sinks (the union of
  the reference's key ranges, without double counting).

Selection: kernels in one PrimFunc.  (0) clear the top-lists; (1) pooled keys
k̄ [Hkv, Nc, D] and chunk key sums (one work-group per key chunk and KV head,
threads over D); (2) one work-group per (KV head, query chunk) row: pooled group
query and the key sum before the own chunk (threads over D), centred scores
against k̄ for the chunks before its own (threads over chunks, a block at a time),
an insertion top-list of capacity M, the greedy prefix under the budget and the
ascending sort (thread 0): exactly :func:`edgeattn.dhsa.select_for`.

Decode (``spec.decode``, Lq = 1): flash-decoding, the keys of each query head
dealt round-robin to 256 threads with partial softmax states in a workspace,
then a combining kernel (see :func:`build_decode_attention`).

Arithmetic is float32; with ``dtype="float16"`` inputs/outputs are half and
loads are widened to float32 (accumulation stays float32).
"""

from __future__ import annotations

from typing import Any

import tvm
from tvm.script import tirx as T

from .abi import BAND_SCORE, OP_DENSE, OP_SELECT, OP_SPARSE, SYMBOL, KernelSpec
from .toplist import toplist_macros, vertical_pin_macro

NEG = -(2.0**127)  # "minus infinity" that keeps exp() and max() finite; exact in fp32 (no inf arithmetic)


def _target_limit(target: Any, key: str, default: int) -> int:
    if target is None:
        return default
    value = target.attrs.get(key, None)
    return int(value) if value is not None else default


def _pow2_floor(x: int) -> int:
    p = 1
    while p * 2 <= x:
        p *= 2
    return p


def attention_tiles(spec: KernelSpec, target: Any = None) -> tuple[int, int]:
    """(TQ query rows per work-group, TK keys per shared-memory tile) for ``spec`` on ``target``.

    TQ·g threads must fit ``max_num_threads``; 2·TK·D float32 values must fit
    ``max_shared_memory_per_block``.  Defaults are the mobile-GPU limits
    (256 threads, 16 KiB), which every listed target meets.
    """
    max_threads = _target_limit(target, "max_num_threads", 256)
    max_shared = _target_limit(target, "max_shared_memory_per_block", 16384)
    g = spec.group
    if g > max_threads:
        raise ValueError(f"GQA group of {g} query heads exceeds the target's {max_threads} threads per work-group")
    tq = max(1, min(64, _pow2_floor(max_threads // g)))
    tk = _pow2_floor(max(1, max_shared // (2 * 4 * spec.head_dim)))
    tk = max(1, min(32, tk))
    return tq, tk


# ------------------------------------------------------------------ attention


def _attention_macros(spec: KernelSpec, tq: int, tk: int) -> tuple[Any, Any, Any]:
    """TVMScript macros shared by the sparse and the dense kernel: init, one key tile, store."""
    d, g = spec.head_dim, spec.group
    scale, cap = spec.scale, spec.cap
    win = spec.win if spec.win > 0 else 1 << 30  # "no window" = a window wider than any sequence
    nthr = tq * g
    nload = (tk * d + nthr - 1) // nthr

    @T.macro
    def init_row(acc, st):
        for dd in range(d):
            acc[dd] = T.float32(0)
        st[0] = T.float32(NEG)  # running max
        st[1] = T.float32(0)  # running sum

    @T.macro
    def key_tile(K, V, Ks, Vs, acc, st, sc, Q, h, tx, qrow, qpos, qoff, active, k0, k1):
        # cooperative load of keys [k0, k0 + tk) ∩ [.., k1) (all threads, uniform control flow)
        for li in range(nload):
            e = li * nthr + tx
            if e < tk * d:
                if k0 + e // d < k1:
                    Ks[e // d, e % d] = T.Cast("float32", K[h, k0 + e // d, e % d])
                    Vs[e // d, e % d] = T.Cast("float32", V[h, k0 + e // d, e % d])
        T.tvm_storage_sync("shared")
        if active:
            st[2] = st[0]  # tile max
            for j in range(tk):
                sc[j] = T.float32(NEG)
                if k0 + j < k1 and k0 + j <= qpos and qpos - (k0 + j) < win:
                    sc[j] = T.float32(0)
                    for dd in range(d):
                        sc[j] = sc[j] + T.Cast("float32", Q[qrow, qpos - qoff, dd]) * Ks[j, dd]
                    sc[j] = sc[j] * T.float32(scale)
                    if cap > 0:
                        sc[j] = T.float32(cap) * T.tanh(sc[j] * T.float32(1.0 / cap))
                    st[2] = T.max(st[2], sc[j])
            if st[2] > T.float32(NEG):
                st[3] = T.exp(st[0] - st[2])  # rescale of the old state
                st[1] = st[1] * st[3]
                for dd in range(d):
                    acc[dd] = acc[dd] * st[3]
                for j in range(tk):
                    if sc[j] > T.float32(NEG):
                        st[3] = T.exp(sc[j] - st[2])
                        st[1] = st[1] + st[3]
                        for dd in range(d):
                            acc[dd] = acc[dd] + st[3] * Vs[j, dd]
                st[0] = st[2]
        T.tvm_storage_sync("shared")

    @T.macro
    def store_row(O, acc, st, qrow, qi):
        for dd in range(d):
            O[qrow, qi, dd] = T.Cast(O.dtype, acc[dd] / st[1])

    return init_row, key_tile, store_row


def build_sparse_attention(spec: KernelSpec, target: Any = None) -> tvm.IRModule:
    """``dhsa_sparse_attention(q, k, v, boundaries, sel, nsel, out)`` with GPU thread binding."""
    if spec.op != OP_SPARSE:
        raise ValueError(f"build_sparse_attention needs op {OP_SPARSE}, got {spec.op}")
    hq, hkv, d, g, dtype = spec.heads_q, spec.heads_kv, spec.head_dim, spec.group, spec.dtype
    tq, tk = attention_tiles(spec, target)
    nthr = tq * g
    sinks = int(spec.sinks)
    init_row, key_tile, store_row = _attention_macros(spec, tq, tk)

    @T.prim_func
    def dhsa_sparse_attention(
        q: T.handle, k: T.handle, v: T.handle, boundaries: T.handle, sel: T.handle, nsel: T.handle, out: T.handle
    ):
        T.func_attr({"global_symbol": SYMBOL[OP_SPARSE], "tirx.noalias": True})
        Lq = T.int32()
        Lk = T.int32()
        Nc1 = T.int32()
        Nq = T.int32()
        M = T.int32()
        Q = T.match_buffer(q, (hq, Lq, d), dtype)
        K = T.match_buffer(k, (hkv, Lk, d), dtype)
        V = T.match_buffer(v, (hkv, Lk, d), dtype)
        B = T.match_buffer(boundaries, (Nc1,), "int32")
        SEL = T.match_buffer(sel, (hkv, Nq, M), "int32")
        NSEL = T.match_buffer(nsel, (hkv, Nq), "int32")
        O = T.match_buffer(out, (hq, Lq, d), dtype)
        for bx in T.thread_binding(hkv * Nq, thread="blockIdx.x"):
            for tx in T.thread_binding(nthr, thread="threadIdx.x"):
                Ks = T.alloc_buffer((tk, d), "float32", scope="shared")
                Vs = T.alloc_buffer((tk, d), "float32", scope="shared")
                acc = T.alloc_buffer((d,), "float32", scope="local")
                st = T.alloc_buffer((4,), "float32", scope="local")
                sc = T.alloc_buffer((tk,), "float32", scope="local")
                h = bx // Nq
                c = bx % Nq
                own = c + (Nc1 - 1) - Nq
                qs = T.max(B[own], Lk - Lq)
                qe = B[own + 1]
                s_end = T.min(sinks, Lk)
                qrow = h * g + tx // tq
                for qt in range((qe - qs + tq - 1) // tq):
                    qpos = qs + qt * tq + tx % tq
                    init_row(acc, st)
                    for seg in range(NSEL[h, c] + 1):
                        x = SEL[h, c, T.max(seg - 1, 0)]
                        k0 = T.if_then_else(seg == 0, 0, T.max(B[x], s_end))
                        k1 = T.if_then_else(seg == 0, s_end, B[x + 1])
                        for kt in range(T.max(k1 - k0 + tk - 1, 0) // tk):
                            key_tile(
                                K, V, Ks, Vs, acc, st, sc, Q, h, tx, qrow, qpos, Lk - Lq, qpos < qe, k0 + kt * tk, k1
                            )
                    if qpos < qe:
                        store_row(O, acc, st, qrow, qpos - (Lk - Lq))

    return tvm.IRModule({SYMBOL[OP_SPARSE]: dhsa_sparse_attention})


def build_dense_attention(spec: KernelSpec, target: Any = None) -> tvm.IRModule:
    """``dense_flash_attention(q, k, v, out)``: causal flash attention with GPU thread binding."""
    if spec.op != OP_DENSE:
        raise ValueError(f"build_dense_attention needs op {OP_DENSE}, got {spec.op}")
    hq, hkv, d, g, dtype = spec.heads_q, spec.heads_kv, spec.head_dim, spec.group, spec.dtype
    tq, tk = attention_tiles(spec, target)
    nthr = tq * g
    win = spec.win if spec.win > 0 else 1 << 30
    init_row, key_tile, store_row = _attention_macros(spec, tq, tk)

    @T.prim_func
    def dense_flash_attention(q: T.handle, k: T.handle, v: T.handle, out: T.handle):
        T.func_attr({"global_symbol": SYMBOL[OP_DENSE], "tirx.noalias": True})
        Lq = T.int32()
        Lk = T.int32()
        Q = T.match_buffer(q, (hq, Lq, d), dtype)
        K = T.match_buffer(k, (hkv, Lk, d), dtype)
        V = T.match_buffer(v, (hkv, Lk, d), dtype)
        O = T.match_buffer(out, (hq, Lq, d), dtype)
        for bx in T.thread_binding(hkv * ((Lq + tq - 1) // tq), thread="blockIdx.x"):
            for tx in T.thread_binding(nthr, thread="threadIdx.x"):
                Ks = T.alloc_buffer((tk, d), "float32", scope="shared")
                Vs = T.alloc_buffer((tk, d), "float32", scope="shared")
                acc = T.alloc_buffer((d,), "float32", scope="local")
                st = T.alloc_buffer((4,), "float32", scope="local")
                sc = T.alloc_buffer((tk,), "float32", scope="local")
                ntiles = (Lq + tq - 1) // tq
                h = bx // ntiles
                first = (Lk - Lq) + (bx % ntiles) * tq  # absolute position of the tile's first query
                last = T.min(first + tq, Lk)  # one past the tile's last query
                lo = T.max(first - win + 1, 0)
                qrow = h * g + tx // tq
                qpos = first + tx % tq
                init_row(acc, st)
                for kt in range((last - lo + tk - 1) // tk):
                    key_tile(K, V, Ks, Vs, acc, st, sc, Q, h, tx, qrow, qpos, Lk - Lq, qpos < last, lo + kt * tk, last)
                if qpos < last:
                    store_row(O, acc, st, qrow, qpos - (Lk - Lq))

    return tvm.IRModule({SYMBOL[OP_DENSE]: dense_flash_attention})


# ------------------------------------------------------------------ decode (Lq == 1)

DECODE_PARTS = 256  # key shares per query head (flash-decoding): enough work-groups for one query


def build_decode_attention(spec: KernelSpec, target: Any = None) -> tvm.IRModule:
    """Decode kernel (one query, ``spec.decode``): the kept keys split over threads, then combined.

    With one query the prefill kernels keep one work-group per KV head busy; here
    every query head's keys (the sinks and kept chunks for DHSA, the causal /
    window range for dense) are dealt round-robin to ``DECODE_PARTS`` threads,
    each keeping a partial (max, sum, accumulator) in a workspace, and a second
    kernel combines the partials (threads over D).  The caller passes Lq == 1.
    """
    if spec.op not in (OP_SPARSE, OP_DENSE):
        raise ValueError(f"decode kernels exist for {OP_SPARSE} and {OP_DENSE}, not {spec.op}")
    hq, hkv, d, g, dtype = spec.heads_q, spec.heads_kv, spec.head_dim, spec.group, spec.dtype
    scale, cap = spec.scale, spec.cap
    win = spec.win if spec.win > 0 else 1 << 30
    sinks = int(spec.sinks)
    max_threads = _target_limit(target, "max_num_threads", 256)
    parts = DECODE_PARTS
    ts = min(64, max_threads)  # threads per work-group in the split kernel
    nb = parts // ts
    td = min(_pow2_floor(d), 64, max_threads)  # threads over D in the combine kernel
    ndc = (d + td - 1) // td

    @T.macro
    def one_key(Q, K, V, acc, st, hh, h, kk, qpos):
        if qpos - kk < win:
            st[2] = T.float32(0)
            for dd in range(d):
                st[2] = st[2] + T.Cast("float32", Q[hh, 0, dd]) * T.Cast("float32", K[h, kk, dd])
            st[2] = st[2] * T.float32(scale)
            if cap > 0:
                st[2] = T.float32(cap) * T.tanh(st[2] * T.float32(1.0 / cap))
            if st[2] > st[0]:
                st[3] = T.exp(st[0] - st[2])
                st[1] = st[1] * st[3]
                for dd in range(d):
                    acc[dd] = acc[dd] * st[3]
                st[0] = st[2]
            st[3] = T.exp(st[2] - st[0])
            st[1] = st[1] + st[3]
            for dd in range(d):
                acc[dd] = acc[dd] + st[3] * T.Cast("float32", V[h, kk, dd])

    @T.macro
    def combine(O, pm, pl, po):
        for bc in T.thread_binding(hq, thread="blockIdx.x"):
            for tc in T.thread_binding(td, thread="threadIdx.x"):
                cs = T.alloc_buffer((3,), "float32", scope="local")  # max, sum, weight
                cs[0] = T.float32(NEG)
                for u in range(parts):
                    cs[0] = T.max(cs[0], pm[bc, u])
                cs[1] = T.float32(0)
                for u in range(parts):
                    cs[1] = cs[1] + pl[bc, u] * T.exp(pm[bc, u] - cs[0])
                for p in range(ndc):
                    if p * td + tc < d:
                        cs[2] = T.float32(0)
                        for u in range(parts):
                            cs[2] = cs[2] + po[bc, u, p * td + tc] * T.exp(pm[bc, u] - cs[0])
                        O[bc, 0, p * td + tc] = T.Cast(O.dtype, cs[2] / cs[1])

    @T.macro
    def store_part(pm, pl, po, acc, st, hh, u):
        pm[hh, u] = st[0]
        pl[hh, u] = st[1]
        for dd in range(d):
            po[hh, u, dd] = acc[dd]

    if spec.op == OP_SPARSE:

        @T.prim_func
        def decode_sparse(
            q: T.handle, k: T.handle, v: T.handle, boundaries: T.handle, sel: T.handle, nsel: T.handle, out: T.handle
        ):
            T.func_attr({"global_symbol": SYMBOL[OP_SPARSE], "tirx.noalias": True})
            Lq = T.int32()
            Lk = T.int32()
            Nc1 = T.int32()
            Nq = T.int32()
            M = T.int32()
            Q = T.match_buffer(q, (hq, Lq, d), dtype)
            K = T.match_buffer(k, (hkv, Lk, d), dtype)
            V = T.match_buffer(v, (hkv, Lk, d), dtype)
            B = T.match_buffer(boundaries, (Nc1,), "int32")
            SEL = T.match_buffer(sel, (hkv, Nq, M), "int32")
            NSEL = T.match_buffer(nsel, (hkv, Nq), "int32")
            O = T.match_buffer(out, (hq, Lq, d), dtype)
            pm = T.alloc_buffer((hq, parts), "float32")
            pl = T.alloc_buffer((hq, parts), "float32")
            po = T.alloc_buffer((hq, parts, d), "float32")
            for bx in T.thread_binding(hq * nb, thread="blockIdx.x"):
                for tx in T.thread_binding(ts, thread="threadIdx.x"):
                    acc = T.alloc_buffer((d,), "float32", scope="local")
                    st = T.alloc_buffer((4,), "float32", scope="local")  # max, sum, score, factor
                    off = T.alloc_buffer((1,), "int32", scope="local")  # kept tokens before the segment
                    hh = bx // nb
                    u = (bx % nb) * ts + tx
                    h = hh // g
                    qpos = Lk - Lq
                    s_end = T.min(sinks, Lk)
                    for dd in range(d):
                        acc[dd] = T.float32(0)
                    st[0] = T.float32(NEG)
                    st[1] = T.float32(0)
                    off[0] = 0
                    for seg in range(NSEL[h, Nq - 1] + 1):
                        x = SEL[h, Nq - 1, T.max(seg - 1, 0)]
                        k0 = T.if_then_else(seg == 0, 0, T.max(B[x], s_end))
                        n = T.max(T.if_then_else(seg == 0, s_end, T.min(B[x + 1], qpos + 1)) - k0, 0)
                        t0 = T.floormod(u - off[0], parts)
                        for t in range(T.max(n - t0 + parts - 1, 0) // parts):
                            one_key(Q, K, V, acc, st, hh, h, k0 + t0 + t * parts, qpos)
                        off[0] = off[0] + n
                    store_part(pm, pl, po, acc, st, hh, u)
            combine(O, pm, pl, po)

        func = decode_sparse
    else:

        @T.prim_func
        def decode_dense(q: T.handle, k: T.handle, v: T.handle, out: T.handle):
            T.func_attr({"global_symbol": SYMBOL[OP_DENSE], "tirx.noalias": True})
            Lq = T.int32()
            Lk = T.int32()
            Q = T.match_buffer(q, (hq, Lq, d), dtype)
            K = T.match_buffer(k, (hkv, Lk, d), dtype)
            V = T.match_buffer(v, (hkv, Lk, d), dtype)
            O = T.match_buffer(out, (hq, Lq, d), dtype)
            pm = T.alloc_buffer((hq, parts), "float32")
            pl = T.alloc_buffer((hq, parts), "float32")
            po = T.alloc_buffer((hq, parts, d), "float32")
            for bx in T.thread_binding(hq * nb, thread="blockIdx.x"):
                for tx in T.thread_binding(ts, thread="threadIdx.x"):
                    acc = T.alloc_buffer((d,), "float32", scope="local")
                    st = T.alloc_buffer((4,), "float32", scope="local")
                    hh = bx // nb
                    u = (bx % nb) * ts + tx
                    h = hh // g
                    qpos = Lk - Lq
                    lo = T.max(qpos - win + 1, 0)
                    for dd in range(d):
                        acc[dd] = T.float32(0)
                    st[0] = T.float32(NEG)
                    st[1] = T.float32(0)
                    for t in range(T.max(qpos + 1 - lo - u + parts - 1, 0) // parts):
                        one_key(Q, K, V, acc, st, hh, h, lo + u + t * parts, qpos)
                    store_part(pm, pl, po, acc, st, hh, u)
            combine(O, pm, pl, po)

        func = decode_dense
    return tvm.IRModule({SYMBOL[spec.op]: func})


# ------------------------------------------------------------------ selection


def _vertical_kernels(hkv: int, g: int, d: int, nt: int, rt: int, observe: int, vertical: int, sinks: int, insert):
    """The vertical chunks (select.py's step 0) as GPU kernels: ``pinned[h, x]`` = 1 or 0.

    V0 clears the per-head top-list (which also keeps it a function-level workspace, see kernel 0
    of the selection); V1 gives each (KV head, chunk) a work-group whose threads share the
    (query, key) pairs and reduce their largest q·k in shared memory; V2 runs one head's top-list
    and greedy prefix on thread 0, as the rows do.
    """
    pin = vertical_pin_macro(vertical, sinks, insert)

    @T.macro
    def vertical_chunks(Q, K, B, pinned, Lq, Lk, Nc1, M):
        vscore = T.alloc_buffer((hkv, Nc1 - 1), "float32")
        vtop = T.alloc_buffer((hkv, 1, M), "float32")
        vsel = T.alloc_buffer((hkv, 1, M), "int32")
        for bv in T.thread_binding(hkv, thread="blockIdx.x"):
            for tv in T.thread_binding(rt, thread="threadIdx.x"):
                for i in range((M + rt - 1) // rt):
                    if i * rt + tv < M:
                        vtop[bv, 0, i * rt + tv] = T.float32(NEG)
                        vsel[bv, 0, i * rt + tv] = -1
        for bw in T.thread_binding(hkv * (Nc1 - 1), thread="blockIdx.x"):
            for tw in T.thread_binding(nt, thread="threadIdx.x"):
                red = T.alloc_buffer((nt,), "float32", scope="shared")
                best = T.alloc_buffer((2,), "float32", scope="local")
                hw = bw // (Nc1 - 1)
                xw = bw % (Nc1 - 1)
                wn = T.min(observe, Lq)
                n = B[xw + 1] - B[xw]
                best[0] = T.float32(NEG)
                if B[xw + 1] <= Lk - wn:  # strictly before the window's first chunk
                    for p in range((g * wn * n + nt - 1) // nt):
                        if p * nt + tw < g * wn * n:
                            best[1] = T.float32(0)
                            for dd in range(d):
                                best[1] = best[1] + T.Cast(
                                    "float32",
                                    Q[hw * g + (p * nt + tw) // (wn * n), Lq - wn + (p * nt + tw) // n % wn, dd],
                                ) * T.Cast("float32", K[hw, B[xw] + (p * nt + tw) % n, dd])
                            best[0] = T.max(best[0], best[1])
                red[tw] = best[0]
                T.tvm_storage_sync("shared")
                if tw == 0:
                    for i in range(1, nt):
                        best[1] = red[i]
                        best[0] = T.max(best[0], best[1])
                    vscore[hw, xw] = best[0]
                    pinned[hw, xw] = 0
        for bh in T.thread_binding(hkv, thread="blockIdx.x"):
            for _th in T.thread_binding(1, thread="threadIdx.x"):
                iv = T.alloc_buffer((5,), "int32", scope="local")  # count, pos, flag, used (toplist.py)
                pin(B, Nc1, vscore, vtop, vsel, pinned, bh, M, Lk - T.min(observe, Lq), iv)

    return vertical_chunks


def build_chunk_select(spec: KernelSpec, target: Any = None) -> tvm.IRModule:
    """``dhsa_chunk_select(q, k, boundaries, sel, nsel)``: pooling kernel, then one work-group per row."""
    if spec.op != OP_SELECT:
        raise ValueError(f"build_chunk_select needs op {OP_SELECT}, got {spec.op}")
    hq, hkv, d, g, dtype = spec.heads_q, spec.heads_kv, spec.head_dim, spec.group, spec.dtype
    budget, sinks, normalize = int(spec.budget), int(spec.sinks), bool(spec.normalize)
    local = int(spec.local)
    observe, vertical = (int(spec.observe), int(spec.vertical)) if spec.vertical else (0, 0)
    max_threads = _target_limit(target, "max_num_threads", 256)
    tp = min(_pow2_floor(d), 64, max_threads)  # threads over D in the pooling kernel
    npool = (d + tp - 1) // tp
    rt = min(32, max_threads)  # threads of the clearing kernel
    nt = min(256, max_threads)  # threads per row in the selection kernel
    un = 16  # chunk sums loaded ahead in the centring sum
    ndt = (d + nt - 1) // nt
    insert, finish = toplist_macros(budget, sinks)
    ginv = 1.0 / g
    vertical_chunks = _vertical_kernels(hkv, g, d, nt, rt, observe, vertical, sinks, insert)

    @T.prim_func
    def dhsa_chunk_select(q: T.handle, k: T.handle, boundaries: T.handle, sel: T.handle, nsel: T.handle):
        T.func_attr({"global_symbol": SYMBOL[OP_SELECT], "tirx.noalias": True})
        Lq = T.int32()
        Lk = T.int32()
        Nc1 = T.int32()
        Nq = T.int32()
        M = T.int32()
        Q = T.match_buffer(q, (hq, Lq, d), dtype)
        K = T.match_buffer(k, (hkv, Lk, d), dtype)
        B = T.match_buffer(boundaries, (Nc1,), "int32")
        SEL = T.match_buffer(sel, (hkv, Nq, M), "int32")
        NSEL = T.match_buffer(nsel, (hkv, Nq), "int32")
        kbar = T.alloc_buffer((hkv, Nc1 - 1, d), "float32")
        topv = T.alloc_buffer((hkv, Nq, M), "float32")
        csum = T.alloc_buffer((hkv, Nc1 - 1, d), "float32")  # csum[h, x] = sum of K[h] over chunk x (DHSA)
        pinned = T.alloc_buffer((hkv, Nc1 - 1), "int32")  # vertical chunks (kernels V1-V2), 1 = ranks first
        if observe > 0:
            vertical_chunks(Q, K, B, pinned, Lq, Lk, Nc1, M)
        # ---- kernel 0: clear the top-list scores.  Also keeps ``topv`` a function-level workspace: a
        # global buffer used inside one thread-bound kernel only is compacted to a per-thread region
        # by TVM 0.27's CompactBufferAllocation, with wrong offsets.
        for bz in T.thread_binding(hkv * Nq, thread="blockIdx.x"):
            for tz in T.thread_binding(rt, thread="threadIdx.x"):
                for i in range((M + rt - 1) // rt):
                    if i * rt + tz < M:
                        topv[bz // Nq, bz % Nq, i * rt + tz] = T.float32(NEG)
        # ---- kernel 1: pooled keys
        for bp in T.thread_binding(hkv * (Nc1 - 1), thread="blockIdx.x"):
            for tp_ in T.thread_binding(tp, thread="threadIdx.x"):
                acc = T.alloc_buffer((1,), "float32", scope="local")
                hp = bp // (Nc1 - 1)
                xp = bp % (Nc1 - 1)
                for p in range(npool):
                    if p * tp + tp_ < d:
                        acc[0] = T.float32(0)
                        for t in range(B[xp + 1] - B[xp]):
                            acc[0] = acc[0] + T.Cast("float32", K[hp, B[xp] + t, p * tp + tp_])
                        if normalize:
                            kbar[hp, xp, p * tp + tp_] = acc[0] * T.rsqrt(T.Cast("float32", B[xp + 1] - B[xp]))
                            csum[hp, xp, p * tp + tp_] = acc[0]
                        else:
                            kbar[hp, xp, p * tp + tp_] = acc[0] / T.Cast("float32", B[xp + 1] - B[xp])
        # ---- kernel 2: one work-group per (KV head, query chunk) row.  Threads over D pool the
        # group query and sum the keys before the own chunk; threads over chunks score a block of
        # nt chunks at a time into shared memory; thread 0 keeps the top-list, then runs the
        # budget prefix and the sort.  (One thread per row left a decode step -- one row -- to a
        # single thread scoring every chunk: 97 % of DHSA decode time on an H200 at 64K.)
        # Each sum runs in the same order as before, so the scores are the same bits.
        for bx in T.thread_binding(hkv * Nq, thread="blockIdx.x"):
            for tx in T.thread_binding(nt, thread="threadIdx.x"):
                qbar = T.alloc_buffer((d,), "float32", scope="shared")
                mu = T.alloc_buffer((d,), "float32", scope="shared")  # sum of the keys before own (DHSA)
                blk = T.alloc_buffer((nt,), "float32", scope="shared")  # one block of chunk scores
                cen = T.alloc_buffer((1,), "float32", scope="shared")  # q̄·μ (DHSA centring)
                acc = T.alloc_buffer((2,), "float32", scope="local")
                ld = T.alloc_buffer((un,), "float32", scope="local")
                sv = T.alloc_buffer((2,), "float32", scope="local")  # score, q̄·μ partial
                iv = T.alloc_buffer((5,), "int32", scope="local")  # count, pos, flag, used, kept (toplist.py)
                h = bx // Nq
                c = bx % Nq
                own = c + (Nc1 - 1) - Nq
                ks = B[own]
                ke = B[own + 1]
                qs = T.max(ks, Lk - Lq)
                for p in range(ndt):
                    if p * nt + tx < d:
                        acc[0] = T.float32(0)
                        for gi in range(g):
                            for t in range(ke - qs):
                                acc[0] = acc[0] + T.Cast("float32", Q[h * g + gi, qs + t - (Lk - Lq), p * nt + tx])
                        if normalize:
                            qbar[p * nt + tx] = acc[0] * (T.rsqrt(T.Cast("float32", ke - qs)) * T.float32(ginv))
                            # sum in chunk order, loads issued un at a time: one row (a decode step)
                            # is otherwise a chain of Nc dependent global loads, 1.3 ms at 64K on an H200
                            acc[1] = T.float32(0)
                            for xo in range(own // un):
                                for u in T.unroll(un):
                                    ld[u] = csum[h, xo * un + u, p * nt + tx]
                                for u in T.unroll(un):
                                    acc[1] = acc[1] + ld[u]
                            for xr in range(own % un):
                                acc[1] = acc[1] + csum[h, own - own % un + xr, p * nt + tx]
                            mu[p * nt + tx] = acc[1]
                        else:
                            qbar[p * nt + tx] = acc[0] * (T.float32(ginv) / T.Cast("float32", ke - qs))
                T.tvm_storage_sync("shared")
                if normalize:
                    if tx == 0:
                        sv[1] = T.float32(0)
                        for dd in range(d):
                            sv[1] = sv[1] + qbar[dd] * mu[dd]
                        cen[0] = sv[1] / T.Cast("float32", T.max(ks, 1))
                    T.tvm_storage_sync("shared")
                # top-list (descending score, ties: lower chunk id first) over the chunks before own
                iv[0] = 0
                for blo in range((own + nt - 1) // nt):
                    if blo * nt + tx < own:
                        sv[0] = T.float32(0)
                        for dd in range(d):
                            sv[0] = sv[0] + qbar[dd] * kbar[h, blo * nt + tx, dd]
                        if normalize:
                            sv[0] = sv[0] - T.sqrt(T.Cast("float32", B[blo * nt + tx + 1] - B[blo * nt + tx])) * cen[0]
                        if local > 0:
                            if B[blo * nt + tx + 1] > ks - local:  # local band first (abi.BAND_SCORE)
                                sv[0] = T.float32(BAND_SCORE)
                        if observe > 0:
                            if pinned[h, blo * nt + tx] == 1:  # so do the vertical chunks
                                sv[0] = T.float32(BAND_SCORE)
                        blk[tx] = sv[0]
                    T.tvm_storage_sync("shared")
                    if tx == 0:
                        for i in range(T.min(nt, own - blo * nt)):
                            sv[0] = blk[i]  # (a shared load in an if condition trips TVM's storage-access pass)
                            insert(topv, SEL, h, c, M, sv[0], blo * nt + i, iv)
                    T.tvm_storage_sync("shared")
                if tx == 0:
                    finish(B, SEL, NSEL, h, c, M, own, ks, ke, iv)

    return tvm.IRModule({SYMBOL[OP_SELECT]: dhsa_chunk_select})


_BUILDERS = {OP_SELECT: build_chunk_select, OP_SPARSE: build_sparse_attention, OP_DENSE: build_dense_attention}


def build(spec: KernelSpec, target: Any) -> tvm.IRModule:
    """The GPU kernel for ``spec`` (KERNELS.md builder contract), scheduled for ``target``'s limits.

    ``target`` is a ``tvm.target.Target`` of kind opencl or cuda (its thread and
    shared-memory limits size the tiles); ``decode`` attention specs get the
    split-key decode kernel (the caller passes Lq == 1).
    """
    kind = target.kind.name if target is not None else None
    if kind not in ("opencl", "cuda"):
        raise ValueError(f"gpu_kernels.build needs an opencl or cuda target, got {kind!r}; CPU targets use cpu.build")
    if spec.kv_type != spec.dtype:
        raise NotImplementedError(
            f"the GPU kernels take one dtype for Q, K and V; got {spec.dtype} queries over {spec.kv_type} K/V "
            "(a float16 KV cache under float32 queries runs on the CPU kernels)"
        )
    if spec.decode and spec.op in (OP_SPARSE, OP_DENSE):
        return build_decode_attention(spec, target)
    return _BUILDERS[spec.op](spec, target)
