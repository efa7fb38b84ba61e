"""One thread count for every engine in the process: torch, TVM's pool, OpenMP/MKL (ORT: per session)."""

from __future__ import annotations

import os


def set_threads(n: int) -> int:
    """Use ``n`` threads everywhere; call it before the first TVM kernel runs (TVM reads
    TVM_NUM_THREADS when its pool starts).  Returns ``n``."""
    for var in ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    try:
        import torch

        torch.set_num_threads(n)
    except ImportError:  # pragma: no cover - a device-side runtime without torch
        pass
    return n
