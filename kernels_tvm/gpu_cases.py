"""Reference cases in the kernel ABI layout, with the PyTorch reference's answers.

Why: every target (OpenCL on PoCL, CUDA on a GPU, AArch64 over RPC) is checked
the same way: random inputs with odd lengths, the selection and the outputs
computed by :mod:`edgeattn.dhsa` (the spec), and the kernel's outputs poisoned
before the run.  This module turns one configuration into those arrays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from edgeattn import dhsa
from edgeattn.config import AttentionConfig

from .abi import OP_DENSE, OP_SELECT, OP_SPARSE, KernelSpec, max_selected


def random_boundaries(length: int, min_chunk: int, max_chunk: int, rng: np.random.Generator) -> np.ndarray:
    """Variable-length chunks (lengths in [min_chunk, max_chunk]; the last may be shorter)."""
    bounds = [0]
    while bounds[-1] < length:
        bounds.append(min(length, bounds[-1] + int(rng.integers(min_chunk, max_chunk + 1))))
    return np.array(bounds, dtype=np.int64)


@dataclass
class AttentionCase:
    """Inputs (ABI layout, one sequence) and reference outputs for the three ops."""

    heads_q: int
    heads_kv: int
    head_dim: int
    dtype: str
    budget: int
    sinks: int
    softcap: float | None
    window: int | None
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    boundaries: np.ndarray  # int32 [Nc+1]
    sel: np.ndarray  # int32 [Hkv, Nq, M]: the reference selection
    nsel: np.ndarray  # int32 [Hkv, Nq]
    ref_sparse: np.ndarray  # float32 [Hq, Lq, D]
    ref_dense: np.ndarray  # float32 [Hq, Lq, D]
    extra: dict = field(default_factory=dict)
    local: int = 0  # AttentionConfig.local: the band of recent keys the selection always keeps
    observe: int = 0  # AttentionConfig.observe: the observation window of the vertical chunks
    vertical: int = 0  # AttentionConfig.vertical_tokens

    def spec(self, op: str) -> KernelSpec:
        return KernelSpec(
            op=op,
            heads_q=self.heads_q,
            heads_kv=self.heads_kv,
            head_dim=self.head_dim,
            dtype=self.dtype,
            softcap=self.softcap,
            window=self.window,
            sinks=self.sinks,
            budget=self.budget,
            local=self.local if op == OP_SELECT else 0,
            observe=self.observe if op == OP_SELECT else 0,
            vertical=self.vertical if op == OP_SELECT else 0,
        )

    def args(self, op: str) -> list[np.ndarray]:
        """Kernel arguments in ABI order, outputs poisoned (NaN for floats, 0x7fff_ffff for ints)."""
        out = np.full(self.q.shape, np.nan, dtype=self.dtype)
        if op == OP_DENSE:
            return [self.q, self.k, self.v, out]
        if op == OP_SPARSE:
            return [self.q, self.k, self.v, self.boundaries, self.sel, self.nsel, out]
        if op == OP_SELECT:
            sel = np.full(self.sel.shape, 0x7FFFFFFF, dtype=np.int32)
            nsel = np.full(self.nsel.shape, 0x7FFFFFFF, dtype=np.int32)
            return [self.q, self.k, self.boundaries, sel, nsel]
        raise ValueError(f"unknown op {op!r}")


def make_case(
    heads_q: int,
    heads_kv: int,
    head_dim: int,
    k_len: int,
    q_len: int | None = None,
    chunk: int = 8,
    budget: int = 32,
    sinks: int = 4,
    softcap: float | None = None,
    window: int | None = None,
    variable_chunks: tuple[int, int] | None = None,
    dtype: str = "float32",
    seed: int = 0,
    key_offset: float = 0.0,
    local: int = 0,
    observe: int = 0,
) -> AttentionCase:
    """Random q/k/v, boundaries (fixed ``chunk`` or random lengths in ``variable_chunks``) and references.

    ``q_len`` < ``k_len`` makes the queries the last positions (decode with a
    KV cache).  Half-precision cases round the inputs to fp16 first, so the
    reference sees exactly what the kernel reads.  ``key_offset`` adds that many
    times one random vector to every key: a common component like real keys
    have, which DHSA's centred chunk scores must ignore.
    """
    q_len = k_len if q_len is None else q_len
    if not 1 <= q_len <= k_len:
        raise ValueError(f"need 1 <= q_len <= k_len, got q_len={q_len}, k_len={k_len}")
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((heads_q, q_len, head_dim)).astype(dtype)
    k = rng.standard_normal((heads_kv, k_len, head_dim))
    k = (k + key_offset * rng.standard_normal(head_dim)).astype(dtype)
    v = rng.standard_normal((heads_kv, k_len, head_dim)).astype(dtype)
    if variable_chunks is not None:
        bounds = random_boundaries(k_len, variable_chunks[0], variable_chunks[1], rng)
    else:
        bounds = dhsa.fixed_boundaries(k_len, chunk).numpy()
    tb = torch.from_numpy(bounds)
    qt, kt, vt = (torch.from_numpy(x.astype(np.float32))[None] for x in (q, k, v))
    cfg = AttentionConfig(kind="dhsa", budget=budget, chunk_size=chunk, sinks=sinks, local=local, observe=observe)
    _, keep = dhsa.select_for(qt, kt, cfg, tb)
    scaling = 1.0 / math.sqrt(head_dim)
    with torch.no_grad():
        ref_sparse = dhsa.sparse_attention(qt, kt, vt, keep, tb, scaling, sinks, softcap, window)[0].numpy()
        ref_dense = dhsa.dense_attention(qt, kt, vt, scaling, softcap, window)[0].numpy()
    keep = keep[0].numpy()
    nq, nc = keep.shape[-2:]
    lengths = np.diff(bounds)
    m = max_selected(budget, sinks, int(lengths.min()), nc)
    sel = np.full((heads_kv, nq, m), -1, dtype=np.int32)
    nsel = np.zeros((heads_kv, nq), dtype=np.int32)
    for h in range(heads_kv):
        for c in range(nq):
            ids = np.flatnonzero(keep[h, c])
            sel[h, c, : len(ids)] = ids
            nsel[h, c] = len(ids)
    return AttentionCase(
        heads_q=heads_q,
        heads_kv=heads_kv,
        head_dim=head_dim,
        dtype=dtype,
        budget=budget,
        sinks=sinks,
        softcap=softcap,
        window=window,
        q=q,
        k=k,
        v=v,
        boundaries=bounds.astype(np.int32),
        sel=sel,
        nsel=nsel,
        ref_sparse=ref_sparse,
        ref_dense=ref_dense,
        local=local,
        observe=observe,
        vertical=cfg.vertical_tokens,
    )


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got - ref| / max |ref| (NaN anywhere in ``got`` gives inf: an unwritten output fails)."""
    got = got.astype(np.float64)
    if not np.isfinite(got).all():
        return math.inf
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))
