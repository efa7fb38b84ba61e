"""Compiled host kernels cached on disk, so a second `edgeattn run` does not compile them again.

Every run of the model needs about eight kernels (dense flash with and without a
window, DHSA selection and attention, their decode variants); compiling them
takes seconds each, and even building their IR does: TVMScript's parser spends
~1 s per attention kernel walking Python's stack for each macro (~5 s per
`edgeattn run` start with torch loaded).  So the key is computed *before* any
IR exists, from what the IR is made of: the SHA-256 of the kernel package's own
source files, the TVM version, the target, and the kernel's description (its
spec and schedule).  Any change to a schedule, a spec, the kernel code or TVM
gives a new key, so a stale library is never loaded, and a hit loads the
library without building the IR at all.  Only libraries for this machine's own
CPU are cached (a cross-compiled one cannot be loaded here anyway).  The cache
lives in ``$EDGEATTN_CACHE/kernels`` (``~/.cache/edgeattn/kernels``), or in
``$EDGEATTN_KERNEL_CACHE_DIR`` when that is set (one kernel cache for several model caches: the
test suite gives each test its own ``$EDGEATTN_CACHE`` but shares its kernels);
``EDGEATTN_KERNEL_CACHE=0`` turns it off.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tvm


def cache_dir() -> Path | None:
    if os.environ.get("EDGEATTN_KERNEL_CACHE", "1") == "0":
        return None
    if os.environ.get("EDGEATTN_KERNEL_CACHE_DIR"):
        return Path(os.environ["EDGEATTN_KERNEL_CACHE_DIR"])
    from edgeattn.models import cache_dir as edgeattn_cache

    return edgeattn_cache() / "kernels"


def cacheable(target: tvm.target.Target) -> bool:
    """Host LLVM code only: a library for another triple cannot be loaded in this process."""
    if target.kind.name != "llvm":
        return False
    triple = str(target.attrs.get("mtriple", "") or "")
    return not triple or triple.startswith(os.uname().machine)


@functools.cache
def code_fingerprint() -> str:
    """SHA-256 of every source file of the kernel package: the code that writes the IR."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def key_of(description: Any, target: tvm.target.Target) -> str:
    """The cache key of the kernel ``description`` (a repr-stable spec/schedule tuple) for ``target``."""
    text = "\n".join([tvm.__version__, str(target), code_fingerprint(), repr(description)])
    return hashlib.sha256(text.encode()).hexdigest()[:40]


def compile_cached(description: Any, target: tvm.target.Target, compile_fn: Callable[[], Any]) -> Any:
    """``compile_fn()``, or the library it produced before for the same kernel and target.

    ``compile_fn`` builds the IR and compiles it; it is not called on a hit.
    """
    folder = cache_dir()
    if folder is None or not cacheable(target):
        return compile_fn()
    path = folder / f"{key_of(description, target)}.so"
    if path.is_file():
        try:
            return tvm.runtime.load_module(str(path))
        except Exception:  # a truncated or foreign file: rebuild it
            path.unlink(missing_ok=True)
    lib = compile_fn()
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".so", dir=folder)
    os.close(fd)
    try:
        lib.export_library(tmp)
        os.replace(tmp, path)
    except Exception:
        Path(tmp).unlink(missing_ok=True)  # caching is an optimisation: the compiled library still serves
    return lib
