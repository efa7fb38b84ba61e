"""The kernel ABI shared by every target family (see KERNELS.md).

Everything a kernel builder needs to know about an op instance is in a frozen,
hashable :class:`KernelSpec`; the argument lists of the PrimFuncs are fixed
here in prose and in :data:`ARGS`, and every target's builder must produce a
PrimFunc with exactly these parameters (names, order, shapes, dtypes).

Shapes are per sequence and per layer (the batch is folded out by the caller):

* ``q``   [Hq,  Lq, D]   queries; query ``i`` sits at absolute position ``Lk - Lq + i``
* ``k``   [Hkv, Lk, D]   keys;   ``v`` [Hkv, Lk, D] values
* ``boundaries`` int32 [Nc + 1]: 0 = b_0 < b_1 < ... < b_Nc = Lk (key chunks)
* ``sel`` int32 [Hkv, Nq, M]: per KV head and query chunk, the kept key-chunk ids
  in ascending order (own chunk included, so it is the last); unused tail = -1
* ``nsel`` int32 [Hkv, Nq]: how many entries of ``sel`` are valid (-1: overflow,
  M was too small; never happens with ``M >= max_selected(...)``)
* ``out`` [Hq, Lq, D]

Symbolic (run-time) sizes: Lq, Lk, Nc + 1, Nq, M.  Static (compile-time): Hq, Hkv,
D, dtype and the attributes of the spec.  Query chunk ``c`` is key chunk
``c + Nc - Nq`` cut to the query range, so Nq = Nc in prefill and 1 in decode.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

# ONNX custom-op names (domain ai.edgeattn); also the registry's op keys.
OP_SELECT = "DHSAChunkSelect"
OP_SPARSE = "DHSASparseAttention"
OP_DENSE = "DenseFlashAttention"
OPS = (OP_SELECT, OP_SPARSE, OP_DENSE)

# PrimFunc parameter lists (names in order); every target's builder must match.
ARGS: dict[str, tuple[str, ...]] = {
    OP_SELECT: ("q", "k", "boundaries", "sel", "nsel"),
    OP_SPARSE: ("q", "k", "v", "boundaries", "sel", "nsel", "out"),
    OP_DENSE: ("q", "k", "v", "out"),
}
# How many trailing parameters are outputs (destination-passing style, as Relax call_tir wants).
NUM_OUTPUTS = {OP_SELECT: 2, OP_SPARSE: 1, OP_DENSE: 1}

# Global symbol of the PrimFunc inside the IRModule a builder returns.
SYMBOL = {OP_SELECT: "dhsa_chunk_select", OP_SPARSE: "dhsa_sparse_attention", OP_DENSE: "dense_flash_attention"}


# The selection score of a key chunk in the local band (KernelSpec.local): above any real chunk
# score, so band chunks rank first with ties by id, as the reference's +inf (finite, so the TIR
# and ONNX comparisons never meet inf arithmetic).
BAND_SCORE = 3.0e38


@dataclass(frozen=True)
class KernelSpec:
    """One op instance: the compile-time parameters of a kernel (the cache key with the target).

    ``scaling`` None means 1/sqrt(D).  ``softcap`` 0 / None: off.  ``window`` 0 / None: off
    (a query at p sees keys with p - key < window).  ``normalize``: DHSA's sqrt(len) pooling
    (True) or block-sparse plain mean (False); selection only.  ``decode``: the shape class
    with one query (Lq == 1); a builder may return a kernel specialised for it, and the
    caller must then pass Lq == 1.  ``budget``/``sinks``: DHSA's N_b and sink count.
    ``local``: selection only, the band of recent keys always kept (``AttentionConfig.local``).
    ``observe``/``vertical``: selection only, the observation window of the call's last queries and
    the tokens its vertical chunks may take (``AttentionConfig.observe``, ``vertical_tokens``).
    ``query_tile``: sparse prefill only, a schedule hint, the queries per head of one CPU tile;
    set it to the usual chunk length (a 16-token chunk in a 32-query tile wastes half the rows).
    The result does not depend on it: every row sees the same key tiles in the same order.
    """

    op: str
    heads_q: int
    heads_kv: int
    head_dim: int
    dtype: str = "float32"
    kv_dtype: str | None = None  # K and V (a float16 KV cache under float32 queries); None: ``dtype``
    scaling: float | None = None
    softcap: float | None = None
    window: int | None = None
    sinks: int = 4
    budget: int = 2048
    normalize: bool = True
    decode: bool = False
    local: int = 0
    observe: int = 0
    vertical: int = 0
    query_tile: int = 32

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"unknown kernel op {self.op!r}; choose one of {', '.join(OPS)}")
        if self.heads_q < 1 or self.heads_kv < 1 or self.heads_q % self.heads_kv:
            raise ValueError(f"query heads ({self.heads_q}) must be a positive multiple of KV heads ({self.heads_kv})")
        if self.head_dim < 1:
            raise ValueError(f"head_dim must be >= 1, got {self.head_dim}")
        if self.dtype not in ("float32", "float16"):
            raise ValueError(f"dtype must be float32 or float16, got {self.dtype!r}")
        if self.kv_dtype not in (None, "float32", "float16"):
            raise ValueError(f"kv_dtype must be float32, float16 or None (as dtype), got {self.kv_dtype!r}")
        if self.sinks < 0:
            raise ValueError(f"sinks must be >= 0, got {self.sinks}")
        if self.softcap is not None and self.softcap < 0:
            raise ValueError(f"softcap must be > 0 (or None/0 for off), got {self.softcap}")
        if self.local < 0:
            raise ValueError(f"local must be >= 0, got {self.local}")
        if self.observe < 0 or self.vertical < 0:
            raise ValueError(f"observe and vertical must be >= 0, got {self.observe} and {self.vertical}")
        if self.query_tile < 1:
            raise ValueError(f"query_tile must be >= 1, got {self.query_tile}")
        if self.window is not None and self.window < 0:
            raise ValueError(f"window must be >= 1 (or None/0 for off), got {self.window}")

    # Normalised views (builders use these, not the raw fields).
    @property
    def group(self) -> int:
        return self.heads_q // self.heads_kv

    @property
    def kv_type(self) -> str:
        """The dtype of K and V (``kv_dtype``, else ``dtype``)."""
        return self.kv_dtype or self.dtype

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim) if self.scaling is None else float(self.scaling)

    @property
    def cap(self) -> float:
        """Softcap value, 0.0 when off."""
        return float(self.softcap or 0.0)

    @property
    def win(self) -> int:
        """Sliding window, 0 when off."""
        return int(self.window or 0)

    def with_(self, **changes: Any) -> KernelSpec:
        return replace(self, **changes)

    def key(self) -> tuple:
        """The part of the spec that changes the generated code for ``op`` (cache key)."""
        common = (self.op, self.heads_q, self.heads_kv, self.head_dim, self.dtype)
        if self.kv_type != self.dtype:
            common += ("kv", self.kv_type)
        if self.op == OP_SELECT:
            band = (self.local,) if self.local else ()
            window = ("observe", self.observe, self.vertical) if self.observe and self.vertical else ()
            return common + (self.budget, self.sinks, self.normalize) + band + window
        attn = common + (round(self.scale, 12), self.cap, self.win, self.decode)
        return attn + ((self.sinks, self.query_tile) if self.op == OP_SPARSE else ())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def max_selected(budget: int, sinks: int, min_chunk_len: int, num_chunks: int) -> int:
    """A safe M (width of ``sel``) for a selection: the most chunks one query chunk can keep.

    Chunks charged > 0 tokens cost >= min_chunk_len each except the one straddling the
    sinks; chunks entirely inside the sinks cost 0 (at most ``sinks`` of them); plus the
    own chunk.  Never more than the number of chunks.
    """
    if min_chunk_len < 1:
        raise ValueError(f"min_chunk_len must be >= 1, got {min_chunk_len}")
    return max(1, min(num_chunks, budget // min_chunk_len + sinks + 2))


def query_chunk_count(boundaries: list[int] | Any, q_len: int) -> int:
    """Nq: number of key chunks that contain at least one query (queries = last q_len keys)."""
    b = [int(x) for x in boundaries]
    k_len = b[-1]
    start = k_len - q_len
    return sum(1 for e in b[1:] if e > start)
