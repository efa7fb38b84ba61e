"""Compiled host kernels cached on disk, so a second `edgeattn run` does not compile them again.

Every run of the model needs about eight kernels (dense flash with and without a
window, DHSA selection and attention, their decode variants); compiling them
takes seconds each.  The cache key is the SHA-256 of the kernel's TIR script,
the target and the TVM version: any change to a schedule, a spec or TVM gives a
new key, so a stale library is never loaded.  Only libraries for this machine's
own CPU are cached (a cross-compiled one cannot be loaded here anyway).  The
cache lives in ``$EDGEATTN_CACHE/kernels`` (``~/.cache/edgeattn/kernels``);
``EDGEATTN_KERNEL_CACHE=0`` turns it off.
"""

from __future__ import annotations

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
    root = Path(os.environ.get("EDGEATTN_CACHE", Path.home() / ".cache" / "edgeattn"))
    return root / "kernels"


def cacheable(target: tvm.target.Target) -> bool:
    """Host LLVM code only: a library for another triple cannot be loaded in this process."""
    if target.kind.name != "llvm":
        return False
    triple = str(target.attrs.get("mtriple", "") or "")
    return not triple or triple.startswith(os.uname().machine)


def key_of(mod: tvm.IRModule, target: tvm.target.Target) -> str:
    text = "\n".join([tvm.__version__, str(target), mod.script()])
    return hashlib.sha256(text.encode()).hexdigest()[:40]


def compile_cached(mod: tvm.IRModule, target: tvm.target.Target, compile_fn: Callable[..., Any]) -> Any:
    """``compile_fn(mod, target)``, or the library it produced before for the same code and target."""
    folder = cache_dir()
    if folder is None or not cacheable(target):
        return compile_fn(mod, target)
    path = folder / f"{key_of(mod, target)}.so"
    if path.is_file():
        try:
            return tvm.runtime.load_module(str(path))
        except Exception:  # a truncated or foreign file: rebuild it
            path.unlink(missing_ok=True)
    lib = compile_fn(mod, target)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".so", dir=folder)
    os.close(fd)
    try:
        lib.export_library(tmp)
        os.replace(tmp, path)
    except Exception:
        Path(tmp).unlink(missing_ok=True)  # caching is an optimisation: the compiled library still serves
    return lib
