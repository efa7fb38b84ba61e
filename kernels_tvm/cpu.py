"""CPU (LLVM: x86-64 and AArch64) kernels for the three ops; see KERNELS.md.

The attention kernels are written as TIR loop nests whose schedule is explicit
(`CpuSchedule` holds the knobs) rather than derived by schedule primitives: the
data-dependent key ranges of DHSA do not fit TensorIR blocks, and the loop nest
*is* the schedule.  One work item = (KV head, query tile); all g query heads of the
group times QT queries form the R = g·QT rows of the tile, so every K/V tile load
serves the whole group (GQA).  Per key tile of KT keys:

1. S^T[j, r] = K[j, :] · Qt[:, r]   GEMM, register tile JB keys × RB rows
   (Qt = the query tile transposed, pre-scaled, packed [R/RB, D, RB] once per item);
2. softcap, masks (only on tiles that need them), online softmax vectorised over r,
   with a polynomial exp (tirmath.fexp_nonpos) — no libm call per score;
3. O[r, :] = alpha[r]·O[r, :] + Σ_j P^T[j, r] V[j, :]   GEMM, register tile RI rows × DB dims,
   V read from the tile's rows packed as [D/DB, KT, DB] panels (once per tile, shared by all rows).

Dense attention walks its key range in place; DHSA first gathers the kept keys (sinks, kept chunks)
kt at a time into a packed tile (K rows, V rows, positions), so scattered short chunks still fill
whole tiles.

Work items run in a `T.parallel` loop whose order is zig-zagged (0, N-1, 1, N-2, …)
so that TVM's contiguous static split gives each thread the same causal work.
No buffer depends on L except the inputs/outputs: per item Qt, O [R, D], S [KT, R], Vp [KT, D]
(DHSA also Kp [KT, D] and the positions [KT]).
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

from .abi import OP_DENSE, OP_SELECT, OP_SPARSE, SYMBOL, KernelSpec
from .schedule import CpuSchedule, target_lanes
from .select import build_chunk_select
from .tirmath import fexp, fexp_nonpos, softcapped
from .tuning_records import tuned_schedule


def schedule_for(spec: KernelSpec, target: tvm.target.Target) -> CpuSchedule:
    """The schedule to build with: a matching tuning record's (see tune.py), else the default."""
    return schedule_and_source(spec, target)[0]


def schedule_and_source(spec: KernelSpec, target: tvm.target.Target) -> tuple[CpuSchedule, str]:
    """(schedule, where it came from): ``"tuned (<record file>)"`` or ``"default"``.

    Records live in ``kernels_tvm/tuning/<profile>.json``; for ``x86-host`` one applies only
    when it was measured on this CPU model (the same knobs can be slower on another CPU).
    A corrupt or foreign record file raises ``tuning_records.TuningRecordError`` naming the file.
    """
    default = default_schedule(spec, target)
    tuned, path = tuned_schedule(spec, target, lanes=default.lanes)
    if tuned is not None:
        return tuned, f"tuned ({path})"
    return default, "default"


def default_schedule(spec: KernelSpec, target: tvm.target.Target) -> CpuSchedule:
    """Hand-picked schedule for a target (AVX2: 8 lanes, AVX-512: 16, NEON: 4)."""
    lanes = target_lanes(target)
    g, d = spec.group, spec.head_dim
    while d % lanes:  # odd head sizes: narrower vectors
        lanes //= 2
    if lanes >= 16:  # AVX-512: 32 zmm registers
        jb, rb, ri, db = 8, 32, 8, 32
    elif lanes == 8:  # AVX2: 16 ymm registers
        jb, rb, ri, db = 4, 16, 4, 16
    else:  # NEON: 32 q registers of 4 lanes
        jb, rb, ri, db = 8, 8, 8, 8
    if lanes == 8:
        # AVX2 (16 ymm): 12-accumulator tiles, 4 keys x 3 vectors in S, 6 rows x 2 vectors in PV;
        # dense rows are free to choose (R = 192 = 8 x 24 has no tail block)
        jb, rb, ri, db = 4, 24, 6, 16
    if spec.op == OP_DENSE and lanes == 8:
        qt = max(lanes, 192 // g)
    elif spec.op == OP_DENSE:
        qt = max(lanes, 128 // g)
    else:
        # DHSA: a query chunk is one tile per head; spec.query_tile is the usual chunk length
        qt = max(lanes, min(-(-spec.query_tile // lanes) * lanes, 128 // g))
    r = g * qt
    kt = 32
    if lanes == 8 and spec.op != OP_DENSE and r <= 64:
        # AVX2, a DHSA tile of <= 64 rows (chunk 16, 4 heads per KV head): 5 keys x 2 vectors in S over
        # 40-key tiles; 10 % faster than 4 x 3 over 32 at 16K (the gathered tiles make any kt fit)
        jb, rb, kt = 5, 16, 40
    # tail blocks handle R % rb and R % ri; only keep blocks no wider than R
    while rb > r or rb % lanes:
        rb = rb // 2 if rb % 3 else rb // 3 * 2
    ri = min(ri, r)
    while d % db or db % lanes:
        db //= 2
    if lanes < 8:
        rb, db = max(rb, lanes), max(db, lanes)
    return CpuSchedule(lanes=lanes, qt=qt, kt=kt, jb=jb, rb=max(rb, 1), ri=max(ri, 1), db=max(db, 1))


# --------------------------------------------------------------------------- attention


def _attention_primfunc(spec: KernelSpec, sch: CpuSchedule, sparse: bool):
    hq, hkv, d, g = spec.heads_q, spec.heads_kv, spec.head_dim, spec.group
    dtype = spec.dtype
    kv_dtype = spec.kv_type
    scale = spec.scale
    cap = spec.cap
    win = spec.win
    sinks = int(spec.sinks)
    vl, qt, kt, jb, rb, ri, db = sch.lanes, sch.qt, sch.kt, sch.jb, sch.rb, sch.ri, sch.db
    r_rows = g * qt
    # row blocks: full blocks of rb (S-GEMM) / ri (PV) rows plus one narrower tail block
    assert r_rows % vl == 0 and qt % vl == 0 and rb % vl == 0 and db % vl == 0 and d % db == 0
    assert kt % jb == 0, "S rows are written in whole blocks of jb keys"
    jbt = sch.jb_tail if kt % sch.jb_tail == 0 else jb
    dbt = sch.db_tail if d % sch.db_tail == 0 and sch.db_tail % vl == 0 else db
    nvr = rb // vl
    nrb = r_rows // rb
    rb_tail = r_rows % rb  # a multiple of vl
    nrb_all = nrb + (1 if rb_tail else 0)
    nri = r_rows // ri
    ri_tail = r_rows % ri
    nrv = r_rows // vl
    # window as "p - j <= winm1"; without a window a bound no position reaches
    winm1 = win - 1 if win > 0 else (1 << 30)
    neg_inf = -3.0e38  # finite "minus infinity": keeps the max/exp arithmetic NaN-free
    sym = SYMBOL[OP_SPARSE if sparse else OP_DENSE]
    prefetch = sch.prefetch
    # a fixed number of parallel lanes, each taking every par-th work item: TVM hands each thread
    # a contiguous block of lanes, and every lane samples the (causally growing) work uniformly
    par = sch.par
    fpl = 16 if kv_dtype == "float32" else 32  # K/V elements per 64-byte cache line
    lines = (d + fpl - 1) // fpl

    has_cap = bool(cap)

    def score(x):
        return softcapped(x, cap)

    @T.macro
    def sgemm(h, j0, kn, rbo, nv, jbx, Qt, S, K, Lk, packed):
        # S^T[j, rbo*rb + (0 .. nv*vl)] for the keys of the tile: jbx keys x nv vectors in registers;
        # packed: K is the tile's gathered rows Kp [kt, D] (rows past kn hold stale keys, never read)
        for jbo in range((kn + jbx - 1) // jbx):
            acc = T.alloc_buffer((jbx, nv * vl), "float32", scope="local")
            for jj in T.unroll(jbx):
                for rv in T.unroll(nv):
                    for rr in T.vectorized(vl):
                        acc[jj, rv * vl + rr] = T.float32(0)
            for dd in range(d):
                for jj in T.unroll(jbx):
                    for rv in T.unroll(nv):
                        for rr in T.vectorized(vl):
                            if packed:
                                acc[jj, rv * vl + rr] = (
                                    acc[jj, rv * vl + rr] + K[jbo * jbx + jj, dd] * Qt[rbo, dd, rv * vl + rr]
                                )
                            else:
                                acc[jj, rv * vl + rr] = (
                                    acc[jj, rv * vl + rr]
                                    + T.Cast("float32", K[h, T.min(j0 + jbo * jbx + jj, Lk - 1), dd])
                                    * Qt[rbo, dd, rv * vl + rr]
                                )
            for jj in T.unroll(jbx):
                for rv in T.unroll(nv):
                    for rr in T.vectorized(vl):
                        S[jbo * jbx + jj, rbo * rb + rv * vl + rr] = acc[jj, rv * vl + rr]

    @T.macro
    def pack_v(h, j0, kn, V, Vp):
        # Vp[c, j, :] = V[j0 + j, c*db : (c+1)*db]: the PV micro-kernel's column panel of the tile is
        # then one contiguous kn x db block; read in place, its rows sit 4*D bytes apart (1 KiB at
        # D = 256) and fall into a handful of L1 sets that evict each other
        for jq in range(kn):
            for c in range(d // db):
                for dw in T.unroll(db // vl):
                    for dv in T.vectorized(vl):
                        Vp[c, jq, dw * vl + dv] = T.Cast("float32", V[h, j0 + jq, c * db + dw * vl + dv])

    @T.macro
    def pv(kn, r0, nr, dbx, S, O, alpha, Vp):
        # O[r0 .. r0+nr, :] = alpha * O + P V: nr rows x dbx dims in registers, V from the packed Vp
        for dbo in range(d // dbx):
            acc2 = T.alloc_buffer((nr, dbx), "float32", scope="local")
            for ii in T.unroll(nr):
                for dw in T.unroll(dbx // vl):
                    for dv in T.vectorized(vl):
                        acc2[ii, dw * vl + dv] = O[r0 + ii, dbo * dbx + dw * vl + dv] * alpha[r0 + ii]
            for jq in range(kn):
                for ii in T.unroll(nr):
                    for dw in T.unroll(dbx // vl):
                        for dv in T.vectorized(vl):
                            acc2[ii, dw * vl + dv] = (
                                acc2[ii, dw * vl + dv]
                                + S[jq, r0 + ii] * Vp[(dbo * dbx + dw * vl) // db, jq, (dbo * dbx + dw * vl) % db + dv]
                            )
            for ii in T.unroll(nr):
                for dw in T.unroll(dbx // vl):
                    for dv in T.vectorized(vl):
                        O[r0 + ii, dbo * dbx + dw * vl + dv] = acc2[ii, dw * vl + dv]

    def key_at(j0, j, packed, pos):
        # the position of the tile's key j
        return pos[j] if packed else j0 + j

    @T.macro
    def tile(h, j0, kn, qa, qb, Qt, S, O, m, l, alpha, K, V, Vp, Lk, need_mask, packed, pos):
        # packed: K holds the tile's gathered rows (Kp), Vp is already filled and key j sits at
        # position pos[j]; else the tile is keys j0 .. j0 + kn of K and V
        # 1. S^T = K_tile Qt (full row blocks, then the tail block)
        for rbo in range(nrb):
            sgemm(h, j0, kn, rbo, nvr, jb, Qt, S, K, Lk, packed)
        if rb_tail > 0:
            sgemm(h, j0, kn, nrb, rb_tail // vl, jbt, Qt, S, K, Lk, packed)
        # 2. softcap, mask, online softmax (vectorised over rows)
        for rv in range(nrv):
            mt = T.alloc_buffer((vl,), "float32", scope="local")
            ls = T.alloc_buffer((vl,), "float32", scope="local")
            for lane in T.vectorized(vl):
                mt[lane] = m[rv * vl + lane]
                ls[lane] = T.float32(0)
            if need_mask:
                for j in range(kn):
                    for lane in T.vectorized(vl):
                        S[j, rv * vl + lane] = T.Select(
                            (key_at(j0, j, packed, pos) <= qa + (rv * vl) % qt + lane)
                            and (qa + (rv * vl) % qt + lane - key_at(j0, j, packed, pos) <= winm1),
                            score(S[j, rv * vl + lane]),
                            T.float32(neg_inf),
                        )
                        mt[lane] = T.max(mt[lane], S[j, rv * vl + lane])
            elif has_cap:
                for j in range(kn):
                    for lane in T.vectorized(vl):
                        S[j, rv * vl + lane] = score(S[j, rv * vl + lane])
                        mt[lane] = T.max(mt[lane], S[j, rv * vl + lane])
            else:  # the common case: no store, just the row maxima
                for j in range(kn):
                    for lane in T.vectorized(vl):
                        mt[lane] = T.max(mt[lane], S[j, rv * vl + lane])
            for lane in T.vectorized(vl):
                # rows that saw no visible key yet keep m = -big; exp(-big - (-big)) must not be 1
                alpha[rv * vl + lane] = T.Select(
                    mt[lane] > T.float32(-1.0e38), fexp(m[rv * vl + lane] - mt[lane]), T.float32(1.0)
                )
            if need_mask:
                for j in range(kn):
                    for lane in T.vectorized(vl):
                        S[j, rv * vl + lane] = T.Select(
                            S[j, rv * vl + lane] > T.float32(-1.0e38),
                            fexp_nonpos(S[j, rv * vl + lane] - mt[lane]),
                            T.float32(0),
                        )
                        ls[lane] = ls[lane] + S[j, rv * vl + lane]
            else:  # no masked score in the tile, so every row max is finite
                for j in range(kn):
                    for lane in T.vectorized(vl):
                        S[j, rv * vl + lane] = fexp_nonpos(S[j, rv * vl + lane] - mt[lane])
                        ls[lane] = ls[lane] + S[j, rv * vl + lane]
            for lane in T.vectorized(vl):
                l[rv * vl + lane] = l[rv * vl + lane] * alpha[rv * vl + lane] + ls[lane]
                m[rv * vl + lane] = mt[lane]
        # 3. O = alpha * O + P V
        if not packed:
            pack_v(h, j0, kn, V, Vp)
        for rio in range(nri):
            pv(kn, rio * ri, ri, db, S, O, alpha, Vp)
        if ri_tail > 0:
            pv(kn, nri * ri, ri_tail, dbt, S, O, alpha, Vp)

    @T.macro
    def prefetch_rows(h, j0, K, V, Lk):
        # the kt rows of K and V from key j0 on, one prefetch per 64-byte line
        if prefetch:
            for jj in range(kt):
                for cl in range(lines):
                    T.evaluate(
                        T.call_intrin(
                            "void", "tirx.prefetch", T.address_of(K[h, T.min(j0 + jj, Lk - 1), cl * fpl]), 0, 3, 1
                        )
                    )
                    T.evaluate(
                        T.call_intrin(
                            "void", "tirx.prefetch", T.address_of(V[h, T.min(j0 + jj, Lk - 1), cl * fpl]), 0, 3, 1
                        )
                    )

    @T.macro
    def key_range(h, s0, e0, qa, qb, Qt, S, O, m, l, alpha, K, V, Vp, Lk):
        # keys [s, e) against query rows at positions [qa, qb); clip to causal limit and window
        s = T.Bind(T.max(s0, qa - winm1))
        e = T.Bind(T.min(e0, qb))
        if e > s:
            for t in range((e - s + kt - 1) // kt):
                j0 = T.Bind(s + t * kt)
                kn = T.Bind(T.min(kt, e - j0))
                if j0 + kt < e:
                    prefetch_rows(h, j0 + kt, K, V, Lk)
                if (kn < kt) or (j0 + kt - 1 > qa) or (j0 <= qb - 1 - winm1 - 1):
                    tile(h, j0, kn, qa, qb, Qt, S, O, m, l, alpha, K, V, Vp, Lk, True, False, None)
                else:
                    tile(h, j0, kn, qa, qb, Qt, S, O, m, l, alpha, K, V, Vp, Lk, False, False, None)

    @T.macro
    def gathered_tile(h, kn, qa, qb, Qt, S, O, m, l, alpha, Kp, Vp, pos, Lk):
        # keys ascend, so pos[0] is the earliest and pos[kn - 1] the latest: a mask is needed only
        # when a key lies past the first query row (the diagonal) or before the last row's window
        if (pos[kn - 1] > qa) or (pos[0] <= qb - 1 - winm1 - 1):
            tile(h, 0, kn, qa, qb, Qt, S, O, m, l, alpha, Kp, None, Vp, Lk, True, True, pos)
        else:
            tile(h, 0, kn, qa, qb, Qt, S, O, m, l, alpha, Kp, None, Vp, Lk, False, True, pos)

    @T.macro
    def gather_key(h, p, K, V, Kp, Vp, pos, cnt):
        # append key p to the pending tile: its position, its K row and its V row (as PV reads it)
        pos[cnt[0]] = p
        for dd in T.vectorized(d):
            Kp[cnt[0], dd] = T.Cast("float32", K[h, p, dd])
        for cc in range(d // db):
            for dw in T.unroll(db // vl):
                for dv in T.vectorized(vl):
                    Vp[cc, cnt[0], dw * vl + dv] = T.Cast("float32", V[h, p, cc * db + dw * vl + dv])
        cnt[0] = cnt[0] + 1

    @T.macro
    def prologue(h, qa, qb, qoff, Q, Qt, O, m, l):
        # pack Qt[R/RB, D, RB] = scale * q (rows beyond qb are zero), reset O, m, l.
        # A statement-level `if`, not a Select: TVM simplifies a Select's branch under its
        # condition (dropping index clamps) yet evaluates both branches of a vector Select.
        for r in range(nrb_all * rb):
            if r < r_rows and qa + r % qt < qb:
                for dd in range(d):
                    Qt[r // rb, dd, r % rb] = T.Cast("float32", Q[h * g + r // qt, qa + r % qt - qoff, dd]) * T.float32(
                        scale
                    )
            else:
                for dd in range(d):
                    Qt[r // rb, dd, r % rb] = T.float32(0)
        for rr in range(r_rows):
            for dd in T.vectorized(d):
                O[rr, dd] = T.float32(0)
        for rr in T.vectorized(r_rows):
            m[rr] = T.float32(neg_inf)
            l[rr] = T.float32(0)

    @T.macro
    def epilogue(h, qa, qb, qoff, O, l, OUT):
        for gi in range(g):
            for qi in range(qb - qa):
                for dd in T.vectorized(d):
                    OUT[h * g + gi, qa + qi - qoff, dd] = T.Cast(dtype, O[gi * qt + qi, dd] / l[gi * qt + qi])

    if sparse:

        @T.prim_func
        def sparse_attention(
            q_h: T.handle,
            k_h: T.handle,
            v_h: T.handle,
            b_h: T.handle,
            sel_h: T.handle,
            nsel_h: T.handle,
            o_h: T.handle,
        ):
            T.func_attr({"global_symbol": sym, "tirx.noalias": True})
            Lq = T.int32()
            Lk = T.int32()
            Nc1 = T.int32()
            Nq = T.int32()
            M = T.int32()
            Q = T.match_buffer(q_h, (hq, Lq, d), dtype)
            K = T.match_buffer(k_h, (hkv, Lk, d), kv_dtype)
            V = T.match_buffer(v_h, (hkv, Lk, d), kv_dtype)
            B = T.match_buffer(b_h, (Nc1,), "int32")
            SEL = T.match_buffer(sel_h, (hkv, Nq, M), "int32")
            NSEL = T.match_buffer(nsel_h, (hkv, Nq), "int32")
            OUT = T.match_buffer(o_h, (hq, Lq, d), dtype)
            for lane in T.parallel(par):
                Qt = T.alloc_buffer((nrb_all, d, rb), "float32")
                S = T.alloc_buffer((kt, r_rows), "float32")
                O = T.alloc_buffer((r_rows, d), "float32")
                m = T.alloc_buffer((r_rows,), "float32")
                l = T.alloc_buffer((r_rows,), "float32")
                alpha = T.alloc_buffer((r_rows,), "float32")
                Vp = T.alloc_buffer((d // db, kt, db), "float32")
                Kp = T.alloc_buffer((kt, d), "float32")
                pos = T.alloc_buffer((kt,), "int32")
                rng = T.alloc_buffer((2,), "int32", scope="local")
                cnt = T.alloc_buffer((1,), "int32", scope="local")
                for it in range((hkv * Nq + par - 1) // par):
                    # round `it` holds items it*par .. it*par + n - 1, spread evenly over the lanes
                    n = T.Bind(T.min(par, hkv * Nq - it * par))
                    k = T.Bind((lane * n + par - 1) // par)
                    if k < n and (k * par) // n == lane:
                        # zig-zag inside the round (0, n-1, 1, n-2, ...): every contiguous block of
                        # lanes, i.e. every thread, gets as many early (cheap) as late (costly) items
                        w = T.Bind(it * par + T.Select(k % 2 == 0, k // 2, n - 1 - k // 2))
                        h = T.Bind(w % hkv)
                        c = T.Bind(w // hkv)
                        own = T.Bind(c + Nc1 - 1 - Nq)
                        qoff = T.Bind(Lk - Lq)
                        qs0 = T.Bind(T.max(B[own], qoff))
                        qe0 = T.Bind(B[own + 1])
                        for sub in range((qe0 - qs0 + qt - 1) // qt):
                            qa = T.Bind(qs0 + sub * qt)
                            qb = T.Bind(T.min(qa + qt, qe0))
                            prologue(h, qa, qb, qoff, Q, Qt, O, m, l)
                            # the kept keys -- sinks, then the kept chunks ascending, each clipped to
                            # the causal limit and the window -- gathered kt at a time into packed
                            # tiles: a lone chunk shorter than kt shares its tile with the next one
                            # instead of running a short, masked tile of its own
                            cnt[0] = 0
                            for i in range(NSEL[h, c] + 1):
                                if i == 0:
                                    rng[0] = 0
                                    rng[1] = T.min(sinks, qb)
                                else:
                                    rng[0] = T.max(B[SEL[h, c, i - 1]], sinks)
                                    rng[1] = B[SEL[h, c, i - 1] + 1]
                                ks = T.Bind(T.max(rng[0], qa - winm1))
                                ke = T.Bind(T.min(rng[1], qb))
                                if ke > ks:
                                    for jq in range(ke - ks):
                                        gather_key(h, ks + jq, K, V, Kp, Vp, pos, cnt)
                                        if cnt[0] == kt:
                                            gathered_tile(h, kt, qa, qb, Qt, S, O, m, l, alpha, Kp, Vp, pos, Lk)
                                            cnt[0] = 0
                            if cnt[0] > 0:
                                gathered_tile(h, cnt[0], qa, qb, Qt, S, O, m, l, alpha, Kp, Vp, pos, Lk)
                            epilogue(h, qa, qb, qoff, O, l, OUT)

        return sparse_attention

    @T.prim_func
    def dense_attention(q_h: T.handle, k_h: T.handle, v_h: T.handle, o_h: T.handle):
        T.func_attr({"global_symbol": sym, "tirx.noalias": True})
        Lq = T.int32()
        Lk = T.int32()
        Q = T.match_buffer(q_h, (hq, Lq, d), dtype)
        K = T.match_buffer(k_h, (hkv, Lk, d), kv_dtype)
        V = T.match_buffer(v_h, (hkv, Lk, d), kv_dtype)
        OUT = T.match_buffer(o_h, (hq, Lq, d), dtype)
        for lane in T.parallel(par):
            Qt = T.alloc_buffer((nrb_all, d, rb), "float32")
            S = T.alloc_buffer((kt, r_rows), "float32")
            O = T.alloc_buffer((r_rows, d), "float32")
            m = T.alloc_buffer((r_rows,), "float32")
            l = T.alloc_buffer((r_rows,), "float32")
            alpha = T.alloc_buffer((r_rows,), "float32")
            Vp = T.alloc_buffer((d // db, kt, db), "float32")
            for it in range((hkv * ((Lq + qt - 1) // qt) + par - 1) // par):
                # round `it` holds items it*par .. it*par + n - 1, spread evenly over the lanes
                n = T.Bind(T.min(par, hkv * ((Lq + qt - 1) // qt) - it * par))
                k = T.Bind((lane * n + par - 1) // par)
                if k < n and (k * par) // n == lane:
                    # zig-zag inside the round (0, n-1, 1, n-2, ...): every contiguous block of
                    # lanes, i.e. every thread, gets as many early (cheap) as late (costly) items
                    w = T.Bind(it * par + T.Select(k % 2 == 0, k // 2, n - 1 - k // 2))
                    h = T.Bind(w % hkv)
                    c = T.Bind(w // hkv)
                    qoff = T.Bind(Lk - Lq)
                    qa = T.Bind(qoff + c * qt)
                    qb = T.Bind(T.min(qa + qt, Lk))
                    prologue(h, qa, qb, qoff, Q, Qt, O, m, l)
                    key_range(h, 0, qb, qa, qb, Qt, S, O, m, l, alpha, K, V, Vp, Lk)
                    epilogue(h, qa, qb, qoff, O, l, OUT)

    return dense_attention


# --------------------------------------------------------------------------- decode (Lq == 1)


def _decode_primfunc(spec: KernelSpec, sch: CpuSchedule, sparse: bool, parts: int = 32):
    """One query per head: split the kept keys over ``parts`` work items, then combine.

    Each part computes a partial (m, l, o) for the g query heads of its KV head over its
    share of the key tokens (the merged ranges concatenated, cut in equal shares); a
    second parallel loop rescales and sums the parts (flash-decoding).
    """
    hq, hkv, d, g = spec.heads_q, spec.heads_kv, spec.head_dim, spec.group
    dtype = spec.dtype
    kv_dtype = spec.kv_type
    scale = spec.scale
    cap = spec.cap
    win = spec.win
    sinks = int(spec.sinks)
    vl, kt = sch.lanes, 16
    while d % vl:
        vl //= 2
    nd = d // vl
    winm1 = win - 1 if win > 0 else (1 << 30)
    neg_inf = -3.0e38
    sym = SYMBOL[OP_SPARSE if sparse else OP_DENSE]

    @T.macro
    def keys(h, j0, kn, qv, m, l, o, K, V):
        # partial attention of the g queries (qv, pre-scaled) over keys [j0, j0 + kn), kn <= kt
        sc = T.alloc_buffer((kt, g), "float32", scope="local")
        part = T.alloc_buffer((vl,), "float32", scope="local")
        mt = T.alloc_buffer((1,), "float32", scope="local")
        for j in range(kn):
            for gi in range(g):
                for dv in T.vectorized(vl):
                    part[dv] = T.float32(0)
                for d0 in range(nd):
                    for dv in T.vectorized(vl):
                        part[dv] = part[dv] + T.Cast("float32", K[h, j0 + j, d0 * vl + dv]) * qv[gi, d0 * vl + dv]
                sc[j, gi] = T.float32(0)
                for dv in range(vl):
                    sc[j, gi] = sc[j, gi] + part[dv]
                sc[j, gi] = softcapped(sc[j, gi], cap)
        for gi in range(g):
            mt[0] = m[gi]
            for j in range(kn):
                mt[0] = T.max(mt[0], sc[j, gi])
            l[gi] = l[gi] * fexp(m[gi] - mt[0])
            for dd in T.vectorized(d):
                o[gi, dd] = o[gi, dd] * fexp(m[gi] - mt[0])
            m[gi] = mt[0]
            for j in range(kn):
                sc[j, gi] = fexp(sc[j, gi] - mt[0])
                l[gi] = l[gi] + sc[j, gi]
        for j in range(kn):
            for gi in range(g):
                for dd in T.vectorized(d):
                    o[gi, dd] = o[gi, dd] + sc[j, gi] * T.Cast("float32", V[h, j0 + j, dd])

    @T.macro
    def span(h, s, e, lo, hi, acc, qv, m, l, o, K, V):
        # keys [s, e) sit at [acc, acc + e - s) in the concatenated token space; take [lo, hi)
        a = T.Bind(T.max(acc[0], lo))
        b = T.Bind(T.min(acc[0] + e - s, hi))
        if b > a:
            for t in range((b - a + kt - 1) // kt):
                keys(h, s + a - acc[0] + t * kt, T.min(kt, b - a - t * kt), qv, m, l, o, K, V)
        acc[0] = acc[0] + (e - s)

    @T.macro
    def load_q(h, Q, Lq, qv, m, l, o):
        for gi in range(g):
            for dd in T.vectorized(d):
                qv[gi, dd] = T.Cast("float32", Q[h * g + gi, Lq - 1, dd]) * T.float32(scale)
                o[gi, dd] = T.float32(0)
            m[gi] = T.float32(neg_inf)
            l[gi] = T.float32(0)

    @T.macro
    def combine(PM, PL, PO, OUT, Lq):
        for hg in T.parallel(hkv * g):
            h = T.Bind(hg // g)
            gi = T.Bind(hg % g)
            mx = T.alloc_buffer((1,), "float32", scope="local")
            den = T.alloc_buffer((1,), "float32", scope="local")
            acc = T.alloc_buffer((d,), "float32", scope="local")
            mx[0] = T.float32(neg_inf)
            for p in range(parts):
                mx[0] = T.max(mx[0], PM[h, p, gi])
            den[0] = T.float32(0)
            for dd in T.vectorized(d):
                acc[dd] = T.float32(0)
            for p in range(parts):
                den[0] = den[0] + PL[h, p, gi] * fexp(PM[h, p, gi] - mx[0])
                for dd in T.vectorized(d):
                    acc[dd] = acc[dd] + PO[h, p, gi, dd] * fexp(PM[h, p, gi] - mx[0])
            for dd in T.vectorized(d):
                OUT[h * g + gi, Lq - 1, dd] = T.Cast(dtype, acc[dd] / den[0])

    if sparse:

        @T.prim_func
        def sparse_decode(
            q_h: T.handle,
            k_h: T.handle,
            v_h: T.handle,
            b_h: T.handle,
            sel_h: T.handle,
            nsel_h: T.handle,
            o_h: T.handle,
        ):
            T.func_attr({"global_symbol": sym, "tirx.noalias": True})
            Lq = T.int32()
            Lk = T.int32()
            Nc1 = T.int32()
            Nq = T.int32()
            M = T.int32()
            Q = T.match_buffer(q_h, (hq, Lq, d), dtype)
            K = T.match_buffer(k_h, (hkv, Lk, d), kv_dtype)
            V = T.match_buffer(v_h, (hkv, Lk, d), kv_dtype)
            B = T.match_buffer(b_h, (Nc1,), "int32")
            SEL = T.match_buffer(sel_h, (hkv, Nq, M), "int32")
            NSEL = T.match_buffer(nsel_h, (hkv, Nq), "int32")
            OUT = T.match_buffer(o_h, (hq, Lq, d), dtype)
            PM = T.alloc_buffer((hkv, parts, g), "float32")
            PL = T.alloc_buffer((hkv, parts, g), "float32")
            PO = T.alloc_buffer((hkv, parts, g, d), "float32")
            for w in T.parallel(hkv * parts):
                h = T.Bind(w // parts)
                p = T.Bind(w % parts)
                c = T.Bind(Nq - 1)
                qb = T.Bind(Lk)
                wlo = T.Bind(T.max(0, Lk - 1 - winm1))
                qv = T.alloc_buffer((g, d), "float32")
                o = T.alloc_buffer((g, d), "float32")
                m = T.alloc_buffer((g,), "float32")
                l = T.alloc_buffer((g,), "float32")
                cur = T.alloc_buffer((2,), "int32", scope="local")
                acc = T.alloc_buffer((1,), "int32", scope="local")
                tot = T.alloc_buffer((1,), "int32", scope="local")
                load_q(h, Q, Lq, qv, m, l, o)
                # pass 1: total kept tokens (merged ranges clipped to the window)
                tot[0] = 0
                cur[0] = 0
                cur[1] = T.min(sinks, qb)
                for i in range(NSEL[h, c]):
                    xs = T.Bind(T.max(B[SEL[h, c, i]], sinks))
                    xe = T.Bind(B[SEL[h, c, i] + 1])
                    if xe > xs:
                        if xs == cur[1]:
                            cur[1] = xe
                        else:
                            tot[0] = tot[0] + T.max(0, cur[1] - T.max(cur[0], wlo))
                            cur[0] = xs
                            cur[1] = xe
                tot[0] = tot[0] + T.max(0, T.min(cur[1], qb) - T.max(cur[0], wlo))
                lo = T.Bind(tot[0] * p // parts)
                hi = T.Bind(tot[0] * (p + 1) // parts)
                # pass 2: this part's share
                acc[0] = 0
                cur[0] = 0
                cur[1] = T.min(sinks, qb)
                for i in range(NSEL[h, c]):
                    xs = T.Bind(T.max(B[SEL[h, c, i]], sinks))
                    xe = T.Bind(B[SEL[h, c, i] + 1])
                    if xe > xs:
                        if xs == cur[1]:
                            cur[1] = xe
                        else:
                            if cur[1] > T.max(cur[0], wlo):
                                span(h, T.max(cur[0], wlo), cur[1], lo, hi, acc, qv, m, l, o, K, V)
                            cur[0] = xs
                            cur[1] = xe
                if T.min(cur[1], qb) > T.max(cur[0], wlo):
                    span(h, T.max(cur[0], wlo), T.min(cur[1], qb), lo, hi, acc, qv, m, l, o, K, V)
                for gi in range(g):
                    PM[h, p, gi] = m[gi]
                    PL[h, p, gi] = l[gi]
                    for dd in T.vectorized(d):
                        PO[h, p, gi, dd] = o[gi, dd]
            combine(PM, PL, PO, OUT, Lq)

        return sparse_decode

    @T.prim_func
    def dense_decode(q_h: T.handle, k_h: T.handle, v_h: T.handle, o_h: T.handle):
        T.func_attr({"global_symbol": sym, "tirx.noalias": True})
        Lq = T.int32()
        Lk = T.int32()
        Q = T.match_buffer(q_h, (hq, Lq, d), dtype)
        K = T.match_buffer(k_h, (hkv, Lk, d), kv_dtype)
        V = T.match_buffer(v_h, (hkv, Lk, d), kv_dtype)
        OUT = T.match_buffer(o_h, (hq, Lq, d), dtype)
        PM = T.alloc_buffer((hkv, parts, g), "float32")
        PL = T.alloc_buffer((hkv, parts, g), "float32")
        PO = T.alloc_buffer((hkv, parts, g, d), "float32")
        for w in T.parallel(hkv * parts):
            h = T.Bind(w // parts)
            p = T.Bind(w % parts)
            wlo = T.Bind(T.max(0, Lk - 1 - winm1))
            qv = T.alloc_buffer((g, d), "float32")
            o = T.alloc_buffer((g, d), "float32")
            m = T.alloc_buffer((g,), "float32")
            l = T.alloc_buffer((g,), "float32")
            acc = T.alloc_buffer((1,), "int32", scope="local")
            load_q(h, Q, Lq, qv, m, l, o)
            acc[0] = 0
            span(h, wlo, Lk, (Lk - wlo) * p // parts, (Lk - wlo) * (p + 1) // parts, acc, qv, m, l, o, K, V)
            for gi in range(g):
                PM[h, p, gi] = m[gi]
                PL[h, p, gi] = l[gi]
                for dd in T.vectorized(d):
                    PO[h, p, gi, dd] = o[gi, dd]
        combine(PM, PL, PO, OUT, Lq)

    return dense_decode


def build(spec: KernelSpec, target: tvm.target.Target, schedule: CpuSchedule | None = None) -> tvm.IRModule:
    """IRModule with one PrimFunc named SYMBOL[spec.op] (parameters abi.ARGS[spec.op])."""
    if isinstance(target, dict | str):
        target = tvm.target.Target(target)
    if spec.op == OP_SELECT:
        return build_chunk_select(spec, lanes=target_lanes(target))
    sch = schedule or schedule_for(spec, target)
    if spec.decode:
        func = _decode_primfunc(spec, sch, sparse=spec.op == OP_SPARSE)
    else:
        func = _attention_primfunc(spec, sch, sparse=spec.op == OP_SPARSE)
    return tvm.IRModule({SYMBOL[spec.op]: func})
