"""Run a TVM-built OpenCL kernel on a real OpenCL implementation through pyopencl.

Why: this machine has no GPU and TVM's wheel has no OpenCL runtime enabled, but
Debian's PoCL is a conforming OpenCL 3 implementation on the CPU.  Building the
exact source TVM generated for Mali/Adreno with PoCL's compiler and launching
it with TVM's launch plan (:mod:`.gpu_launch`) checks the generated code for
real: syntax, barriers, local memory, index arithmetic, numerics.

Needs ``pyopencl`` (the ``opencl`` extra) and an OpenCL ICD (Debian:
``apt-get install pocl-opencl-icd ocl-icd-libopencl1``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tvm

from .gpu_launch import LaunchPlan, device_source, launch_plan, lower

INSTALL_HINT = "pip install pyopencl and apt-get install pocl-opencl-icd ocl-icd-libopencl1"


def opencl_problem() -> str | None:
    """Why OpenCL cannot run here (None when it can): tests skip with this reason."""
    try:
        import pyopencl as cl
    except ImportError:
        return f"pyopencl is not installed: {INSTALL_HINT}"
    try:
        devices = [d for p in cl.get_platforms() for d in p.get_devices()]
    except cl.Error as err:
        return f"no OpenCL platform ({err}): {INSTALL_HINT}"
    if not devices:
        return f"no OpenCL device: {INSTALL_HINT}"
    return None


def opencl_source(mod: tvm.IRModule, target: Any) -> str:
    """The OpenCL C source TVM generates for ``mod`` (``target`` of kind opencl)."""
    return device_source(mod, target, "opencl")


class OpenCLKernelRunner:
    """A TVM PrimFunc (one per IRModule) compiled to OpenCL, built and launched with pyopencl.

    Calling it with numpy arrays (every parameter, outputs included, in ABI
    order) copies them all to the device, runs TVM's kernel launches in
    order, and returns every array copied back (so an output poisoned with NaN
    on the host must come back fully written).
    """

    def __init__(self, mod: tvm.IRModule, target: Any, device: Any = None) -> None:
        import pyopencl as cl

        self.mod = mod
        self.target = tvm.target.Target(target)
        self.source = opencl_source(mod, self.target)
        self._lowered = lower(mod, self.target)
        if device is None:
            device = next(d for p in cl.get_platforms() for d in p.get_devices())
        self.device = device
        self.context = cl.Context([device])
        self.queue = cl.CommandQueue(self.context)
        self.program = cl.Program(self.context, self.source).build()
        self.last_plan: LaunchPlan | None = None
        self._kernels: dict[str, Any] = {}

    def plan(self, arrays: list[np.ndarray]) -> LaunchPlan:
        return launch_plan(self.mod, self.target, arrays, lowered=self._lowered)

    def __call__(self, *arrays: np.ndarray) -> list[np.ndarray]:
        import pyopencl as cl

        arrays = tuple(np.ascontiguousarray(a) for a in arrays)
        plan = self.plan(list(arrays))
        self.last_plan = plan
        mf = cl.mem_flags
        bufs = [cl.Buffer(self.context, mf.READ_WRITE | mf.COPY_HOST_PTR, hostbuf=a) for a in arrays]
        work: dict[str, Any] = {}
        for name, (shape, dtype) in plan.workspaces.items():
            poison = np.empty(shape, dtype=dtype)
            poison.view(np.uint8)[...] = 0xFF  # NaN / -1: a kernel reading before writing shows up
            work[name] = cl.Buffer(self.context, mf.READ_WRITE | mf.COPY_HOST_PTR, hostbuf=poison)
        for launch in plan.launches:
            if launch.name not in self._kernels:
                self._kernels[launch.name] = cl.Kernel(self.program, launch.name)
            kernel = self._kernels[launch.name]
            args: list[Any] = []
            for arg in launch.args:
                if arg.kind == "param":
                    args.append(bufs[arg.index])
                elif arg.kind == "workspace":
                    args.append(work[arg.name])
                else:
                    args.append(np.dtype(arg.dtype).type(arg.value))
            if any(g == 0 for g in launch.grid):
                continue  # an empty grid launches nothing (TVM's runtime skips it too)
            kernel(self.queue, launch.global_size, launch.block, *args)
        results = [np.empty_like(a) for a in arrays]
        for host, buf in zip(results, bufs, strict=True):
            cl.enqueue_copy(self.queue, host, buf)
        self.queue.finish()
        return results
