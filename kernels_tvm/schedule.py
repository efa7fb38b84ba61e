"""The knobs of the CPU attention loop nest, and the vector width they are counted in.

Apart from cpu.py (which builds the kernels from them) so that the tuning records
(tuning_records.py) can read and check schedules without importing the kernel builders.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm.target import codegen


@dataclass(frozen=True)
class CpuSchedule:
    """The knobs of the CPU attention loop nest."""

    lanes: int = 8  # fp32 lanes of one vector register
    qt: int = 32  # queries per head in a tile (R = g * qt rows)
    kt: int = 32  # keys per tile
    jb: int = 4  # S-GEMM register tile: keys (broadcast) ...
    rb: int = 16  # ... x rows (vector)
    ri: int = 4  # PV-GEMM register tile: rows (broadcast) ...
    db: int = 16  # ... x head dims (vector)
    par: int = 64  # parallel lanes (static extent); work item w runs on lane w % par
    prefetch: bool = True  # software-prefetch the next key tile's K/V rows (sparse: scattered chunks)
    jb_tail: int = 8  # keys per block in the narrower S tail block (R % rb rows)
    db_tail: int = 32  # head dims per block in the PV tail block (R % ri rows)


def target_lanes(target: tvm.target.Target) -> int:
    """fp32 lanes of the target's native vector registers (16: AVX-512, 8: AVX2, 4: NEON/SSE)."""
    triple = str(target.attrs.get("mtriple", "")) or str(codegen.llvm_get_system_triple())
    if triple.startswith(("aarch64", "arm")):
        return 4
    try:
        if codegen.target_has_features("avx512f", target):
            return 16
        if codegen.target_has_features("avx2", target) or codegen.target_has_features("avx", target):
            return 8
    except Exception:  # pragma: no cover - feature query unsupported
        pass
    return 4
