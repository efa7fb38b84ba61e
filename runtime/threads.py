"""One thread count for every engine in the process: torch, TVM's pool, OpenMP/MKL (ORT: per session)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


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


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run the torch ops of the block on one thread, then restore the count.

    Two uses, both measured on this 2-core machine.  Small ops (the chunk index's O(#chunks)
    work): entering an OpenMP parallel region costs more than the op (a 2048-element sqrt took
    14 ms with 2 threads and microseconds with 1).  A decode step beside the TVM kernels: its
    torch ops are matrix-vector products, bound by memory, and after each one libgomp's idle
    workers spin, so TVM's pool waits for a scheduler slice before every kernel (a 512-key
    sliding-window decode call took 4.4 ms instead of 0.3 ms; Gemma 3 270M at 4K decoded at
    300-335 ms a step with 2 torch threads and 153-178 ms with 1, TVM keeping its 2).
    """
    import torch

    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
