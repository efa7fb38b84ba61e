"""The launch plan TVM chose for a GPU PrimFunc: kernels, their arguments, grid and block sizes.

Why: to run TVM-generated OpenCL (or CUDA) source on a runtime TVM does not
drive (PoCL through pyopencl here), the launches must be exactly TVM's own.
TVM's lowering splits a PrimFunc into a host function that calls one device
kernel after another (``call_ffi_kernel(name, args..., extents...)``) and the
device kernels themselves.  This module runs the same lowering
(``tvm.tirx.build`` steps 3-5), reads those calls in order, and evaluates
their arguments and launch extents for concrete input shapes.  Workspaces the
host allocates (global ``alloc_buffer`` in the kernel) are reported with their
sizes so the caller allocates them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tvm
from tvm.tirx.build import split_host_device_mods

_LAUNCH_AXES = ("blockIdx.x", "blockIdx.y", "blockIdx.z", "threadIdx.x", "threadIdx.y", "threadIdx.z")


@dataclass(frozen=True)
class KernelArg:
    """One argument of a device kernel: a buffer (by name) or a scalar value."""

    kind: str  # "param" (a PrimFunc parameter), "workspace" or "scalar"
    name: str
    index: int = -1  # parameter index for "param"
    value: int | float = 0  # for "scalar"
    dtype: str = "int32"


@dataclass(frozen=True)
class KernelLaunch:
    """One device-kernel launch: name in the device source, arguments, grid (blocks) and block (threads)."""

    name: str
    args: tuple[KernelArg, ...]
    grid: tuple[int, int, int]
    block: tuple[int, int, int]

    @property
    def global_size(self) -> tuple[int, int, int]:
        """OpenCL NDRange: blocks × threads per axis (blockIdx.x ↔ dim 0)."""
        return tuple(g * b for g, b in zip(self.grid, self.block, strict=True))  # type: ignore[return-value]


@dataclass
class LaunchPlan:
    """Every kernel launch of one PrimFunc call, in order, and the workspaces they use."""

    launches: list[KernelLaunch]
    workspaces: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)  # name -> (shape, dtype)
    param_names: list[str] = field(default_factory=list)


class LaunchPlanError(RuntimeError):
    """The lowered module has a construct the plan reader does not support."""


def _name(node: Any) -> str:
    for attr in ("name", "name_hint"):
        value = getattr(node, attr, None)
        if value is not None:
            return str(value)
    raise LaunchPlanError(f"cannot name {type(node).__name__} {node}")


_BINARY = {
    "Add": lambda a, b: a + b,
    "Sub": lambda a, b: a - b,
    "Mul": lambda a, b: a * b,
    "FloorDiv": lambda a, b: a // b,
    "FloorMod": lambda a, b: a % b,
    "Div": lambda a, b: int(a / b) if isinstance(a, int) and isinstance(b, int) else a / b,
    "Mod": lambda a, b: int(math.fmod(a, b)),
    "Min": min,
    "Max": max,
    "EQ": lambda a, b: a == b,
    "NE": lambda a, b: a != b,
    "LT": lambda a, b: a < b,
    "LE": lambda a, b: a <= b,
    "GT": lambda a, b: a > b,
    "GE": lambda a, b: a >= b,
    "And": lambda a, b: bool(a) and bool(b),
    "Or": lambda a, b: bool(a) or bool(b),
}


def evaluate(expr: Any, env: dict[str, int | float]) -> int | float:
    """Value of an integer/float TIR expression whose free variables are in ``env`` (by name)."""
    kind = type(expr).__name__
    if isinstance(expr, int | float):
        return expr
    if kind in ("IntImm", "FloatImm"):
        return expr.value
    if kind == "Var" or kind == "SizeVar":
        name = _name(expr)
        if name not in env:
            raise LaunchPlanError(f"unbound variable {name!r}")
        return env[name]
    if kind == "Cast":
        value = evaluate(expr.value, env)
        return float(value) if str(expr.dtype).startswith("float") else int(value)
    if kind in _BINARY:
        return _BINARY[kind](evaluate(expr.a, env), evaluate(expr.b, env))
    if kind == "Not":
        return not evaluate(expr.a, env)
    if kind == "Select":
        return evaluate(expr.true_value if evaluate(expr.condition, env) else expr.false_value, env)
    if kind == "Call" and getattr(expr.op, "name", "") == "tirx.if_then_else":
        cond, a, b = expr.args
        return evaluate(a if evaluate(cond, env) else b, env)
    raise LaunchPlanError(f"cannot evaluate {kind} {expr}")


def _flatten(stmt: Any, out: list[Any]) -> None:
    kind = type(stmt).__name__
    if kind == "SeqStmt":
        for s in stmt.seq:
            _flatten(s, out)
        return
    out.append(stmt)
    if kind in ("AttrStmt", "For", "While") and getattr(stmt, "body", None) is not None:
        _flatten(stmt.body, out)
    elif kind == "IfThenElse":  # the host side only checks arguments inside conditionals
        return
    elif getattr(stmt, "body", None) is not None and kind not in ("AssertStmt",):
        _flatten(stmt.body, out)


def device_source(mod: tvm.IRModule, target: Any, kind: str) -> str:
    """The device source (``kind`` "cuda" or "opencl") TVM generates for ``mod``; needs no GPU."""
    target = tvm.target.Target(target)
    if target.kind.name != kind:
        raise ValueError(f"{kind}_source needs a {kind} target, got {target.kind.name!r}")
    lib = tvm.compile(mod, target=target)
    sources = [m.inspect_source() for m in lib.mod.imports if m.kind == kind]
    if not sources:
        raise RuntimeError(f"tvm.compile produced no {kind} module")
    return sources[0]


def lower(mod: tvm.IRModule, target: Any) -> tuple[tvm.IRModule, dict[Any, tvm.IRModule]]:
    """TVM's own lowering of ``mod`` for ``target`` up to the host/device split (as ``tvm.compile`` does)."""
    target = tvm.target.Target(target)
    if target.host is None:
        target = target.with_host(tvm.target.Target({"kind": "llvm"}))
    mod = tvm.tirx.transform.BindTarget(target)(mod)
    # the pipeline tvm.compile uses (tir_pipeline="default"), for every target kind
    pipeline, _, _ = tvm.tirx.get_tir_pipeline("default")
    return split_host_device_mods(pipeline(mod))


def _param_buffer(func: Any, param: Any) -> Any:
    """The buffer of a PrimFunc parameter (TVM 0.27: parameters are buffers; older: buffer_map)."""
    buffer_map = getattr(func, "buffer_map", None)
    if buffer_map is not None and param in buffer_map:
        return buffer_map[param]
    if not hasattr(param, "shape"):
        raise LaunchPlanError(f"parameter {param} is not a buffer; only buffer parameters are supported")
    return param


def _param_names(func: Any) -> str:
    return ", ".join(_name(_param_buffer(func, p)) for p in func.params)


def bind_shapes(func: Any, arrays: list[np.ndarray]) -> dict[str, int]:
    """Symbolic sizes of ``func``'s buffers bound from the arrays (checks rank, static sizes, dtype)."""
    if len(arrays) != len(func.params):
        raise ValueError(f"the kernel takes {len(func.params)} arrays ({_param_names(func)}), got {len(arrays)}")
    env: dict[str, int] = {}
    for i, (param, arr) in enumerate(zip(func.params, arrays, strict=True)):
        buf = _param_buffer(func, param)
        bname = _name(buf)
        if str(buf.dtype) != str(arr.dtype):
            raise ValueError(f"argument {i} ({bname}) must be {buf.dtype}, got {arr.dtype}")
        if len(buf.shape) != arr.ndim:
            raise ValueError(f"argument {i} ({bname}) must have rank {len(buf.shape)}, got shape {arr.shape}")
        for dim, (extent, size) in enumerate(zip(buf.shape, arr.shape, strict=True)):
            if type(extent).__name__ == "IntImm":
                if int(extent) != size:
                    raise ValueError(f"argument {i} ({bname}) dim {dim} must be {int(extent)}, got {size}")
            elif type(extent).__name__ in ("Var", "SizeVar"):
                name = _name(extent)
                if env.setdefault(name, int(size)) != size:
                    raise ValueError(f"argument {i} ({bname}) dim {dim} = {size} disagrees with {name} = {env[name]}")
            else:
                raise LaunchPlanError(f"buffer {bname} has a computed extent {extent}; only vars and constants")
    return env


def launch_plan(mod: tvm.IRModule, target: Any, arrays: list[np.ndarray], lowered: Any = None) -> LaunchPlan:
    """The launches of ``mod``'s single PrimFunc for inputs shaped like ``arrays``.

    ``lowered`` (the result of :func:`lower`) may be passed to skip re-lowering.
    """
    funcs = list(mod.functions.items())
    if len(funcs) != 1:
        raise LaunchPlanError(f"expected an IRModule with one PrimFunc, got {len(funcs)}")
    func = funcs[0][1]
    env: dict[str, int | float] = dict(bind_shapes(func, arrays))
    param_index = {_name(_param_buffer(func, p)): i for i, p in enumerate(func.params)}
    host, devices = lowered if lowered is not None else lower(mod, target)
    device_funcs = {}
    for dev_mod in devices.values():
        for gv, f in dev_mod.functions.items():
            device_funcs[gv.name_hint] = f
    host_funcs = [f for _, f in host.functions.items()]
    stmts: list[Any] = []
    for f in host_funcs:
        _flatten(f.body, stmts)
    plan = LaunchPlan(launches=[], param_names=list(param_index))
    for stmt in stmts:
        kind = type(stmt).__name__
        if kind == "Bind":
            try:
                env[_name(stmt.var)] = evaluate(stmt.value, env)
            except LaunchPlanError:
                pass  # argument unpacking (struct reads): not needed, the shapes are bound above
        elif kind == "AllocBuffer":
            buf = stmt.buffer
            shape = tuple(int(evaluate(e, env)) for e in buf.shape)
            plan.workspaces[_name(buf)] = (shape, str(buf.dtype))
        elif kind == "Evaluate" and type(stmt.value).__name__ == "Call":
            call = stmt.value
            if getattr(call.op, "name", "") != "tirx.call_ffi_kernel":
                continue
            kname = str(call.args[0].value)
            dev = device_funcs.get(kname)
            if dev is None:
                raise LaunchPlanError(f"host calls kernel {kname!r}, which is not in the device module")
            nparam = len(dev.params)
            params = [str(p) for p in dev.attrs["tirx.kernel_launch_params"]]
            unknown = [p for p in params if p not in _LAUNCH_AXES]
            if unknown:
                raise LaunchPlanError(f"kernel {kname} has launch parameters {unknown} (e.g. dynamic shared memory)")
            args = []
            for arg, dparam in zip(call.args[1 : 1 + nparam], dev.params, strict=True):
                if type(arg).__name__ == "Call" and getattr(arg.op, "name", "") == "tirx.buffer_data":
                    bname = _name(arg.args[0])
                elif type(dparam.ty).__name__ == "PointerType":
                    bname = _name(arg)
                else:
                    dtype = str(dparam.ty.dtype)
                    args.append(KernelArg("scalar", _name(dparam), value=evaluate(arg, env), dtype=dtype))
                    continue
                if bname in param_index:
                    args.append(KernelArg("param", bname, index=param_index[bname]))
                elif bname in plan.workspaces:
                    args.append(KernelArg("workspace", bname))
                else:
                    raise LaunchPlanError(f"kernel {kname} argument {bname!r} is neither a parameter nor a workspace")
            extents = dict(zip(params, (int(evaluate(e, env)) for e in call.args[1 + nparam :]), strict=True))
            grid = tuple(extents.get(f"blockIdx.{a}", 1) for a in "xyz")
            block = tuple(extents.get(f"threadIdx.{a}", 1) for a in "xyz")
            plan.launches.append(KernelLaunch(kname, tuple(args), grid, block))  # type: ignore[arg-type]
    if not plan.launches:
        raise LaunchPlanError("the lowered host function launches no device kernel")
    return plan
