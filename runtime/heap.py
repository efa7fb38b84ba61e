"""Hand freed heap memory back to the OS, so that a long prefill's peak RSS is what it holds.

glibc keeps freed heap pages mapped (it returns only the top of the heap, and blocks under its
mmap threshold, up to 32 MiB, come from the heap once one that size was freed).  A prefill frees
an attention's temporaries (projections, norms, RoPE outputs, contiguous copies) just before the
MLP allocates its own, the largest of the step, so the pages the attention freed stayed in RSS
under the MLP's peak.  Measured on Gemma 3 270M at 8K (torch backend, dense, VmHWM per prefill,
two runs each, one process): the peak was 559-816 MiB above the RSS before the prefill without
trimming, 414-430 MiB trimming after each attention, 467-483 MiB trimming after each layer.  The
price is page faults: the next layer touches fresh pages again (+0.6M minor faults, about 3.5 s
of system time over the two threads of an ~28 s prefill).  No-op off glibc.

The ort backend trims after each ONNX Runtime segment of a prefill (``ort_ops.SegmentedModel``):
without it the RSS before each segment grew ~64 MiB a layer faster than the tensors alive (the
KV cache), and the last MLP's segment peaked 1.3-1.45 GiB higher at 32K (Gemma 3 270M, 5.4 GiB
dense / 5.2 GiB DHSA against 4.0 GiB / 4.0 GiB trimmed, one process each), in no more time.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any


def _libc_trim() -> Any:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim through
        return None


_TRIM = _libc_trim()

# prefill calls this long or longer trim the heap after each attention / segment.  The trim costs
# page faults and buys less the shorter the call: torch dense, Gemma 3 270M, Intel Xeon, 2 threads,
# 3 prefills each, trim on / off: 2K 2.43-2.76 / 2.21-2.47 s for 1803 / 1832 MiB peak; 4K
# 4.47-4.78 / 4.32-4.75 s for 1858 / 1965 MiB; 8K 9.95-10.07 / 9.53-9.68 s for 2095 / 2346 MiB
TRIM_FROM_TOKENS = 4096


def release_freed_memory() -> None:
    """Return the heap's free pages to the OS (glibc ``malloc_trim(0)``)."""
    if _TRIM is not None:
        _TRIM(0)


@contextmanager
def trimmed_after_each(modules: Iterable[Any]) -> Iterator[None]:
    """Within the block, release freed memory after each forward of ``modules`` (torch modules)."""
    handles = [m.register_forward_hook(_trim_hook) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _trim_hook(module: Any, args: Any, output: Any) -> None:
    release_freed_memory()  # returns None: the module's output stands
