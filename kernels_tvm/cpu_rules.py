"""CPU schedules for the standard ops of a whole model: packed-weight GEMM and a generic rule set.

Why: TVM 0.27's CPU pipeline legalizes every Relax op to plain TIR and schedules
nothing (DLight has GPU rules, and for CPUs only GEMV and reduction rules).  A
transformer's time is its GEMMs, so the weights of every ``x @ W`` are packed at
compile time into column panels ``Wp[N / nb, K, nb]`` and the product runs as a
hand-written register-tiled kernel (:func:`gemm_primfunc`): ``mr`` rows of A
broadcast against ``nb`` columns held in vector registers, K innermost, one
contiguous panel read per tile.  The same layout on this machine's Ice Lake
reached torch's GEMM rate (ENVIRONMENT.md).  The other fused ops (norms, RoPE,
GELU, residual adds, softmax of what is left) get :class:`ParallelVectorize`:
spatial loops fused and parallelized, the innermost static axis vectorized.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import tvm
from tvm.script import tirx as T

from .schedule import target_lanes


@dataclass(frozen=True)
class GemmTile:
    """Register tile of the GEMM micro-kernel: ``mr`` rows x ``nb`` columns (``nb / lanes`` vectors)."""

    lanes: int
    mr: int
    nb: int


def gemm_tile(target: Any) -> GemmTile:
    """The tile for a target's vector ISA (AVX-512: 8 x 32 in 16 zmm; AVX2: 6 x 16 in 12 ymm; NEON: 8 x 8)."""
    lanes = target_lanes(target)
    if lanes >= 16:
        return GemmTile(lanes=16, mr=8, nb=32)
    if lanes == 8:
        return GemmTile(lanes=8, mr=6, nb=16)
    return GemmTile(lanes=4, mr=8, nb=8)


def pack_weight(w: np.ndarray, nb: int, transposed: bool = False) -> np.ndarray:
    """``W [K, N]`` (or ``W^T [N, K]`` with ``transposed``) -> panels ``[N / nb, K, nb]``, contiguous."""
    if transposed:
        n, k = w.shape
        return np.ascontiguousarray(w.reshape(n // nb, nb, k).transpose(0, 2, 1))
    k, n = w.shape
    return np.ascontiguousarray(w.reshape(k, n // nb, nb).transpose(1, 0, 2))


def packable(n: int, tile: GemmTile) -> bool:
    return n % tile.nb == 0


def gemm_primfunc(k_dim: int, n_dim: int, tile: GemmTile, dtype: str = "float32") -> tvm.tirx.PrimFunc:
    """C[M, N] = A[M, K] @ W, W given as panels Wp[N / nb, K, nb]; M symbolic (one kernel for every length).

    Work items are (row block, column panel) pairs, row-block-major: a row block of A
    (``rt`` tiles of ``mr`` rows, sized to stay in L2) is reused by every panel while the
    panels stream through; without the blocking A is re-read from memory once per panel
    (at M = 4096 that halved the GEMM rate).  Full ``mr``-row tiles run the register-tiled
    micro-kernel; the last rows (and M = 1, decode) a one-row kernel over the same panel.
    """
    K, N, nb, mr, vl = k_dim, n_dim, tile.nb, tile.mr, tile.lanes
    npan = N // nb
    nv = nb // vl
    rt = max(1, (256 * 1024) // (mr * K * 4))  # row tiles per block: ~256 KiB of A
    mb = rt * mr
    assert N % nb == 0 and nb % vl == 0

    @T.prim_func
    def gemm(a_h: T.handle, w_h: T.handle, c_h: T.handle):
        T.func_attr({"global_symbol": "edgeattn_gemm", "tirx.noalias": True, "tirx.is_scheduled": True})
        M = T.int64()
        A = T.match_buffer(a_h, (M, K), dtype)
        W = T.match_buffer(w_h, (npan, K, nb), dtype)
        C = T.match_buffer(c_h, (M, N), dtype)
        for t in T.parallel(npan * ((M + mb - 1) // mb)):
            p = T.Bind(t % npan)
            b0 = T.Bind(t // npan * mb)
            for r in range(rt):
                m0 = T.Bind(b0 + r * mr)
                if m0 + mr <= M:
                    acc = T.alloc_buffer((mr, nb), "float32", scope="local")
                    for i in T.unroll(mr):
                        for v in T.unroll(nv):
                            for j in T.vectorized(vl):
                                acc[i, v * vl + j] = T.float32(0)
                    for kk in range(K):
                        for i in T.unroll(mr):
                            for v in T.unroll(nv):
                                for j in T.vectorized(vl):
                                    acc[i, v * vl + j] = acc[i, v * vl + j] + T.Cast("float32", A[m0 + i, kk]) * T.Cast(
                                        "float32", W[p, kk, v * vl + j]
                                    )
                    for i in T.unroll(mr):
                        for v in T.unroll(nv):
                            for j in T.vectorized(vl):
                                C[m0 + i, p * nb + v * vl + j] = T.Cast(dtype, acc[i, v * vl + j])
                elif m0 < M:
                    for i in range(M - m0):
                        acc1 = T.alloc_buffer((nb,), "float32", scope="local")
                        for v in T.unroll(nv):
                            for j in T.vectorized(vl):
                                acc1[v * vl + j] = T.float32(0)
                        for kk in range(K):
                            for v in T.unroll(nv):
                                for j in T.vectorized(vl):
                                    acc1[v * vl + j] = acc1[v * vl + j] + T.Cast("float32", A[m0 + i, kk]) * T.Cast(
                                        "float32", W[p, kk, v * vl + j]
                                    )
                        for v in T.unroll(nv):
                            for j in T.vectorized(vl):
                                C[m0 + i, p * nb + v * vl + j] = T.Cast(dtype, acc1[v * vl + j])

    return gemm


def packed_gather_primfunc(k_dim: int, n_dim: int, tile: GemmTile, dtype: str = "float32") -> tvm.tirx.PrimFunc:
    """out[i, :] = E[ids[i], :] read from the packed panels of E^T (a tied embedding / LM head table).

    Gemma ties the embedding table to the LM head; packing the head for the GEMM
    and keeping the table would hold the largest tensor (the vocabulary) twice.
    """
    K, N, nb = k_dim, n_dim, tile.nb
    npan = N // nb

    @T.prim_func
    def gather(w_h: T.handle, ids_h: T.handle, o_h: T.handle):
        T.func_attr({"global_symbol": "edgeattn_packed_gather", "tirx.noalias": True, "tirx.is_scheduled": True})
        S = T.int64()
        W = T.match_buffer(w_h, (npan, K, nb), dtype)
        IDS = T.match_buffer(ids_h, (S,), "int64")
        O = T.match_buffer(o_h, (S, K), dtype)
        for i in T.parallel(S):
            tok = T.Bind(T.max(T.min(IDS[i], T.int64(N - 1)), T.int64(0)))
            for kk in range(K):
                O[i, kk] = W[tok // nb, kk, tok % nb]

    return gather


def fixed_boundaries_primfunc(chunk: int, gpu: bool = False) -> tvm.tirx.PrimFunc:
    """b[i] = min(i * chunk, T) for i = 0 .. ceil(T / chunk): fixed chunk boundaries over the keys k [B, H, T, D].

    The key tensor is only read for its length (a kernel argument binds T).  On GPUs
    the loop is bound to threads so the function is a valid device kernel.
    """
    c = int(chunk)

    @T.prim_func
    def boundaries(k_h: T.handle, b_h: T.handle):
        T.func_attr({"global_symbol": "edgeattn_fixed_boundaries", "tirx.noalias": True, "tirx.is_scheduled": True})
        B = T.int64()
        H = T.int64()
        L = T.int64()
        D = T.int64()
        T.match_buffer(k_h, (B, H, L, D), "float32")  # binds L from the keys
        OUT = T.match_buffer(b_h, ((L + c - 1) // c + 1,), "int32")
        for i in range((L + c - 1) // c + 1):
            OUT[i] = T.Cast("int32", T.min(i * c, L))

    @T.prim_func
    def boundaries_gpu(k_h: T.handle, b_h: T.handle):
        T.func_attr({"global_symbol": "edgeattn_fixed_boundaries", "tirx.noalias": True, "tirx.is_scheduled": True})
        B = T.int64()
        H = T.int64()
        L = T.int64()
        D = T.int64()
        T.match_buffer(k_h, (B, H, L, D), "float32")  # binds L from the keys
        OUT = T.match_buffer(b_h, ((L + c - 1) // c + 1,), "int32")
        for bx in T.thread_binding(((L + c - 1) // c + 1 + 63) // 64, thread="blockIdx.x"):
            for tx in T.thread_binding(64, thread="threadIdx.x"):
                if bx * 64 + tx < (L + c - 1) // c + 1:
                    OUT[bx * 64 + tx] = T.Cast("int32", T.min((bx * 64 + tx) * c, L))

    return boundaries_gpu if gpu else boundaries


# --------------------------------------------------------------------------- generic rule


def _is_scheduled(func: tvm.tirx.PrimFunc) -> bool:
    attrs = func.attrs
    return attrs is not None and bool(attrs.get("tirx.is_scheduled", False))


def _static(extent: Any) -> int | None:
    return int(extent.value) if isinstance(extent, tvm.tirx.IntImm) else None


def schedule_parallel_vectorize(func: tvm.tirx.PrimFunc, lanes: int) -> tvm.tirx.PrimFunc | None:
    """Parallelize and vectorize every block of an injective / reduction PrimFunc (None: left as it is).

    Per block: the spatial loops above any reduction are fused and run in
    parallel (the batch axis of this model is 1, so fusing is what gives the
    threads work); for a purely spatial block the innermost loop is vectorized
    when its extent is static and a multiple of the vector width (split so the
    vector loop is exactly ``lanes`` wide).  Blocks that resist (opaque, nested)
    keep their loops.
    """
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    try:
        root = sch.get_sblock("root")
        blocks = sch.get_child_blocks(root)
    except Exception:
        return None
    changed = False
    for block in blocks:
        try:
            loops = sch.get_loops(block)
            if not loops:
                continue
            iters = sch.get(block).iter_vars
            kinds = [iv.iter_type for iv in iters]
            n_spatial = 0
            for kind in kinds:
                if kind != tvm.tirx.IterVar.DataPar:
                    break
                n_spatial += 1
            if len(loops) != len(iters):
                continue
            if n_spatial == len(iters):  # spatial block
                inner = loops[-1]
                ext = _static(sch.get(inner).extent)
                outer = loops[:-1]
                if ext is not None and ext % lanes == 0 and ext >= lanes:
                    if ext > lanes:
                        o, i = sch.split(inner, factors=[None, lanes])
                        outer = loops[:-1] + [o]
                        inner = i
                    sch.vectorize(inner)
                if outer:
                    fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
                    sch.parallel(fused)
                changed = True
            elif n_spatial > 0:  # reduction: parallel over the spatial prefix
                spatial = loops[:n_spatial]
                fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
                sch.parallel(fused)
                changed = True
        except Exception:  # a block this rule cannot handle keeps its loops (still correct)
            continue
    if not changed:
        return None
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


@tvm.transform.module_pass(opt_level=0, name="edgeattn.CpuParallelVectorize")
class ParallelVectorize:
    """Module pass: :func:`schedule_parallel_vectorize` on every unscheduled PrimFunc."""

    def __init__(self, target: Any) -> None:
        self.lanes = target_lanes(target)

    def transform_module(self, mod: tvm.IRModule, _ctx: Any) -> tvm.IRModule:
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tvm.tirx.PrimFunc) or _is_scheduled(func):
                continue
            new = schedule_parallel_vectorize(func, self.lanes)
            if new is not None:
                updates[gv] = new
        for gv, func in updates.items():
            mod[gv] = func
        return mod
