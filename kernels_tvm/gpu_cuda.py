"""CUDA kernels: TVM's CUDA source, compiled with the local nvcc per architecture, or shipped as source.

Why: with no GPU here, compiling TVM's generated CUDA C with NVIDIA's own
compiler for each deployment architecture is the strongest check available
(the source TVM's runtime would hand to NVRTC on the device).  nvcc 13 dropped
the Volta architectures, so sm_72 (Jetson Xavier) cannot be compiled here: its
profile says ``ship_source=True`` and :func:`write_cuda_artifact` writes the
``.cu`` source for the device's own JetPack nvcc/NVRTC instead.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import tvm

from .gpu_launch import device_source
from .targets import TargetProfile


class NvccError(RuntimeError):
    """nvcc is missing or rejected the source; the message has its output."""


def nvcc_path() -> str | None:
    """The nvcc on PATH (or CUDA_HOME/bin), None when there is none."""
    import os

    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and Path(home, "bin", "nvcc").exists():
        return str(Path(home, "bin", "nvcc"))
    return None


@functools.lru_cache(maxsize=1)
def nvcc_supported_arches() -> tuple[str, ...]:
    """The ``sm_XX`` architectures the local nvcc compiles (``nvcc --list-gpu-arch``); () without nvcc."""
    nvcc = nvcc_path()
    if nvcc is None:
        return ()
    out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, check=False)
    return tuple(f"sm_{m}" for m in re.findall(r"compute_(\d+[a-z]?)", out.stdout))


def nvcc_supports(arch: str) -> bool:
    return arch in nvcc_supported_arches()


def cuda_source(mod: tvm.IRModule, target: Any) -> str:
    """The CUDA C source TVM generates for ``mod`` (works without a GPU)."""
    return device_source(mod, target, "cuda")


def kernel_names(source: str) -> list[str]:
    """Names of the ``__global__`` kernels in a CUDA source."""
    return re.findall(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(', source)


def nvcc_compile(source: str, arch: str, out_path: Path, fmt: str = "ptx") -> Path:
    """Compile CUDA ``source`` for ``arch`` (``sm_87``) to ``fmt`` ("ptx" or "cubin") at ``out_path``."""
    if fmt not in ("ptx", "cubin"):
        raise ValueError(f"fmt must be 'ptx' or 'cubin', got {fmt!r}")
    nvcc = nvcc_path()
    if nvcc is None:
        raise NvccError("nvcc not found: install the CUDA toolkit or set CUDA_HOME")
    if not nvcc_supports(arch):
        raise NvccError(
            f"the local nvcc cannot compile {arch} (it supports {', '.join(nvcc_supported_arches())}); "
            "ship the source and compile on the device"
        )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    src = out_path.with_suffix(".cu")
    src.write_text(source)
    cmd = [nvcc, f"-arch={arch}", f"--{fmt}", "-diag-suppress=177,1046", str(src), "-o", str(out_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise NvccError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return out_path


def write_cuda_artifact(mod: tvm.IRModule, profile: TargetProfile, out_dir: Path, stem: str) -> Path:
    """The deployable device code of ``mod`` for a CUDA profile: PTX where nvcc can, else the .cu source.

    Returns the written path (``stem.ptx`` or, for ``ship_source`` profiles, ``stem.cu``).
    """
    if profile.family != "cuda" or profile.nvcc_arch is None:
        raise ValueError(f"{profile.name} is not a CUDA profile")
    source = cuda_source(mod, profile.target())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if profile.ship_source or not nvcc_supports(profile.nvcc_arch):
        path = out_dir / f"{stem}.cu"
        path.write_text(source)
        return path
    return nvcc_compile(source, profile.nvcc_arch, out_dir / f"{stem}.ptx")
