"""Kernel registry: "kernel X for target T and these shapes" -> a compiled, cached callable.

    from edgeattn.kernels_tvm import registry
    k = registry.get_kernel("DHSASparseAttention", "llvm", heads_q=4, heads_kv=1, head_dim=256)
    k(q, k_, v, boundaries, sel, nsel, out)        # tvm Tensors, numpy arrays or torch tensors
    k.mod                                          # the IRModule (Relax call_tir, cross-compilation)

Targets: a ``tvm.target.Target``, a JSON dict, ``"llvm"`` / ``None`` / ``"host"`` (this CPU, with
its ``mcpu``), or a kind name.  Dispatch by target kind: ``llvm`` -> :mod:`.cpu` (x86-64 and
AArch64 schedules); ``opencl`` / ``cuda`` -> ``kernels_tvm/gpu_kernels.py`` (imported lazily).
Sequence lengths are symbolic: one compiled kernel serves every length; the cache key is
(op, static shapes, attributes, target, CPU schedule): a tuned schedule (``kernels_tvm/tuning``,
see ``tune.py``) is a different kernel from the default one.

:func:`run_layer` runs one attention layer on the host (batch loop, selection, overflow
check) for tests, benchmarks and the runtime's host path.
"""

from __future__ import annotations

import importlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tvm

from . import diskcache
from . import targets as _targets
from .abi import ARGS, NUM_OUTPUTS, OP_DENSE, OP_SELECT, OP_SPARSE, OPS, SYMBOL, KernelSpec, max_selected

# Passes that do nothing for hand-written loop nests but cost seconds on them.
DISABLED_PASSES = ["s_tir.CompactBufferAllocation"]

_lock = threading.Lock()
_cache: dict[tuple, CompiledKernel] = {}


@dataclass
class CompiledKernel:
    """A kernel and its compiled library; the IRModule is built only when asked for (``mod``).

    Building the IR means parsing TVMScript (~1 s a kernel), and a library loaded from the
    disk cache does not need it.
    """

    spec: KernelSpec
    target: tvm.target.Target
    build: Callable[[], tvm.IRModule] | None = field(default=None, repr=False)
    lib: Any = None
    compile_s: float = 0.0
    schedule: Any = None  # cpu.CpuSchedule the CPU attention kernels were built with (None: other kernels)
    schedule_source: str = ""  # "default" or "tuned (<record file>)"
    _mod: tvm.IRModule | None = field(default=None, repr=False)
    _func: Any = field(default=None, repr=False)

    @property
    def mod(self) -> tvm.IRModule:
        """The kernel's IRModule (Relax call_tir, cross-compilation, inspection)."""
        if self._mod is None:
            if self.build is None:
                raise ValueError(f"this {self.spec.op} kernel was made from a library alone: it has no IRModule")
            self._mod = self.build()
        return self._mod

    @property
    def symbol(self) -> str:
        return SYMBOL[self.spec.op]

    @property
    def args(self) -> tuple[str, ...]:
        return ARGS[self.spec.op]

    @property
    def func(self):
        if self._func is None:
            self._func = self.lib[self.symbol]
        return self._func

    def __call__(self, *arrays) -> None:
        if len(arrays) != len(self.args):
            raise TypeError(f"{self.spec.op} takes {len(self.args)} arrays ({', '.join(self.args)}), got {len(arrays)}")
        self.func(*[as_tvm(a) for a in arrays])


# ------------------------------------------------------------------ targets


# Target resolution lives in targets.py (one place for every caller); re-exported here.
host_target = _targets.host_target
resolve_target = _targets.resolve_target


def target_family(target: tvm.target.Target) -> str:
    kind = target.kind.name
    if kind in ("llvm", "c"):
        return "cpu"
    if kind in ("opencl", "cuda"):
        return kind
    raise NotImplementedError(f"no DHSA kernels for target kind {kind!r}; use llvm, opencl or cuda")


def builder_for(target: tvm.target.Target):
    """The ``build(spec, target) -> IRModule`` function of the target's family."""
    family = target_family(target)
    if family == "cpu":
        from . import cpu

        return cpu.build
    try:
        gpu = importlib.import_module(f"{__package__}.gpu_kernels")
    except ModuleNotFoundError as err:
        if err.name and err.name.endswith("gpu_kernels"):
            raise NotImplementedError(
                f"{family} kernels live in kernels_tvm/gpu_kernels.py (build(spec, target) -> IRModule, "
                "see KERNELS.md), which is not in this checkout yet"
            ) from err
        raise
    if not hasattr(gpu, "build"):
        raise NotImplementedError("kernels_tvm/gpu_kernels.py has no build(spec, target) function (see KERNELS.md)")
    return gpu.build


# ------------------------------------------------------------------ kernels


def make_spec(op: str, *, heads_q: int, heads_kv: int, head_dim: int, **attrs: Any) -> KernelSpec:
    if op not in OPS:
        raise ValueError(f"unknown kernel op {op!r}; choose one of {', '.join(OPS)}")
    return KernelSpec(op=op, heads_q=heads_q, heads_kv=heads_kv, head_dim=head_dim, **attrs)


def build_module(op: str, target: Any = None, **kw: Any) -> tvm.IRModule:
    """The IRModule (one PrimFunc, uncompiled) for cross-compilation or Relax."""
    tgt = resolve_target(target)
    return builder_for(tgt)(make_spec(op, **kw), tgt)


def compile_module(mod: tvm.IRModule, target: tvm.target.Target):
    with tvm.transform.PassContext(opt_level=3, disabled_pass=DISABLED_PASSES):
        return tvm.compile(mod, target=target)


def get_kernel(op: str, target: Any = None, *, compile: bool = True, **kw: Any) -> CompiledKernel:
    """Compiled kernel for ``op`` on ``target`` (cached in-process; lengths are symbolic).

    ``kw``: heads_q, heads_kv, head_dim (required) and any :class:`KernelSpec` attribute
    (dtype, scaling, softcap, window, sinks, budget, normalize, decode).  ``compile=False``
    returns the IRModule only (``lib`` None), e.g. for an aarch64 cross build.
    """
    tgt = resolve_target(target)
    spec = make_spec(op, **kw)
    schedule, source = None, ""
    if target_family(tgt) == "cpu" and spec.op != OP_SELECT:
        from . import cpu

        schedule, source = cpu.schedule_and_source(spec, tgt)
    key = (spec.key(), str(tgt), compile, schedule)
    with _lock:
        hit = _cache.get(key)
    if hit is not None:
        return hit

    def build() -> tvm.IRModule:
        return cpu.build(spec, tgt, schedule) if schedule is not None else builder_for(tgt)(spec, tgt)

    kern = CompiledKernel(spec=spec, target=tgt, build=build, schedule=schedule, schedule_source=source)
    if compile:
        t0 = time.perf_counter()
        kern.lib = diskcache.compile_cached((spec.key(), schedule), tgt, lambda: compile_module(kern.mod, tgt))
        kern.compile_s = time.perf_counter() - t0
    with _lock:
        return _cache.setdefault(key, kern)


_layer_kernels: dict[tuple, CompiledKernel] = {}


def layer_kernel(op: str, target: Any = None, **kw: Any) -> CompiledKernel:
    """:func:`get_kernel` memoised on its arguments, for the per-layer, per-token hot path.

    get_kernel resolves the target, the schedule and the tuning records on every call
    (~15 ms); a decode step calls it once per layer and kernel, so :func:`run_layer`
    asks here.  Tuning records written after the first call are picked up after
    :func:`clear_cache`.
    """
    key = (op, str(target) if target is not None else None, tuple(sorted(kw.items())))
    hit = _layer_kernels.get(key)
    if hit is None:
        hit = _layer_kernels.setdefault(key, get_kernel(op, target, **kw))
    return hit


def clear_cache() -> None:
    with _lock:
        _cache.clear()
        _layer_kernels.clear()


# ------------------------------------------------------------------ arrays


def as_tvm(x: Any) -> tvm.runtime.Tensor:
    """numpy / torch (CPU) / tvm Tensor -> tvm Tensor, zero-copy when 64-byte aligned and contiguous.

    TVM needs 64-byte aligned data; an unaligned or strided array is copied, so an *output*
    must be passed aligned (use :func:`empty`) or its result is lost.
    """
    if isinstance(x, tvm.runtime.Tensor):
        return x
    if type(x).__module__.startswith("torch"):
        if x.is_contiguous() and x.data_ptr() % 64 == 0:
            return tvm.runtime.from_dlpack(x)
        return tvm.runtime.tensor(x.contiguous().numpy())
    arr = np.asarray(x)
    if arr.flags.c_contiguous and arr.flags.writeable and arr.ctypes.data % 64 == 0:
        return tvm.runtime.from_dlpack(arr)
    return tvm.runtime.tensor(np.ascontiguousarray(arr))


def empty(shape, dtype: str = "float32"):
    """A 64-byte aligned torch tensor (torch's CPU allocator aligns to 64), for kernel outputs."""
    import torch

    return torch.empty(tuple(shape), dtype=getattr(torch, dtype))


def is_aligned(x) -> bool:
    return x.is_contiguous() and x.data_ptr() % 64 == 0


# ------------------------------------------------------------------ one layer on the host


def kv_dtype_of(k: Any, v: Any) -> str | None:
    """``"float16"`` when K and V are float16 torch tensors (a float16 KV cache: the kernels read it as
    it is), else None (the kernels take the queries' dtype)."""
    import torch

    half = torch.float16
    return "float16" if isinstance(k, torch.Tensor) and k.dtype == half and v.dtype == half else None


@dataclass
class LayerTimes:
    select_s: float = 0.0
    attention_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.select_s + self.attention_s


def selection_width(boundaries: np.ndarray, budget: int, sinks: int) -> int:
    lens = np.diff(boundaries)
    return max_selected(budget, sinks, int(lens.min()), len(lens))


def query_tile_for(boundaries: np.ndarray) -> int:
    """The sparse kernel's query tile for these chunks (8, 16 or 32 queries per head): the
    median chunk length rounded up, so a tile is not mostly padding rows (a schedule hint)."""
    med = float(np.median(np.diff(boundaries)))
    return next((t for t in (8, 16) if med <= t), 32)


def run_layer(
    q,
    k,
    v,
    cfg,
    boundaries=None,
    scaling: float | None = None,
    softcap: float | None = None,
    window: int | None = None,
    target: Any = None,
    out=None,
    times: LayerTimes | None = None,
    return_selection: bool = False,
):
    """Attention of q [B,Hq,Lq,D] (or [Hq,Lq,D]) over k, v as ``cfg`` (an AttentionConfig) says.

    Same contract as :func:`edgeattn.dhsa.attention` (boundaries partition the keys, default
    fixed chunks of ``cfg.chunk_size``; block-sparse always uses fixed blocks), run by the
    TVM kernels.  Accepts and returns torch tensors or numpy arrays (the type of ``q``).
    Queries and the output are float32; float16 torch K and V (a float16 KV cache) are read
    as they are, by kernels built for float16 K/V, never copied to float32.
    ``times`` (a LayerTimes) accumulates selection and attention wall time.
    With ``return_selection`` also returns (sel, nsel) numpy arrays per batch item.
    """
    import torch

    is_torch = isinstance(q, torch.Tensor)
    half_kv = kv_dtype_of(k, v) == "float16"
    qn = q.detach().float().contiguous() if is_torch else torch.from_numpy(np.ascontiguousarray(q, np.float32))
    if half_kv:
        kn, vn = k.detach().contiguous(), v.detach().contiguous()
    elif is_torch:
        kn, vn = k.detach().float().contiguous(), v.detach().float().contiguous()
    else:
        kn = torch.from_numpy(np.ascontiguousarray(k, np.float32))
        vn = torch.from_numpy(np.ascontiguousarray(v, np.float32))
    squeeze = qn.dim() == 3
    if squeeze:
        qn, kn, vn = qn[None], kn[None], vn[None]
    bsz, hq, lq, d = qn.shape
    hkv, lk = kn.shape[1], kn.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if lq > lk:
        raise ValueError(f"more queries ({lq}) than keys ({lk})")
    res = torch.empty(bsz, hq, lq, d, dtype=torch.float32) if out is None else out
    # per-batch views must be 64-byte aligned to be passed zero-copy
    qb = [x if is_aligned(x) else x.clone() for x in qn]
    kb = [x if is_aligned(x) else x.clone() for x in kn]
    vb = [x if is_aligned(x) else x.clone() for x in vn]
    ob = [x if is_aligned(x) else empty(x.shape) for x in res]
    decode = lq == 1
    common = dict(heads_q=hq, heads_kv=hkv, head_dim=d, scaling=scaling, softcap=softcap, window=window)
    if half_kv:
        common["kv_dtype"] = "float16"
    selections = []
    if cfg.kind == "dense":
        kern = layer_kernel(OP_DENSE, target, decode=decode, **common)
        for b in range(bsz):
            t0 = time.perf_counter()
            kern(qb[b], kb[b], vb[b], ob[b])
            if times is not None:
                times.attention_s += time.perf_counter() - t0
    else:
        if boundaries is None or cfg.kind == "block-sparse":
            bnd = np.concatenate([np.arange(0, lk, cfg.chunk_size), [lk]]).astype(np.int32)
        else:
            bnd = np.asarray(boundaries.cpu() if hasattr(boundaries, "cpu") else boundaries).astype(np.int32)
        if bnd.ndim != 1 or bnd[0] != 0 or bnd[-1] != lk or not (np.diff(bnd) > 0).all():
            raise ValueError(f"boundaries must rise strictly from 0 to {lk}, got {bnd[:4]}...{bnd[-2:]}")
        nc = len(bnd) - 1
        nq = int((bnd[1:] > lk - lq).sum())
        m = selection_width(bnd, cfg.budget, cfg.sinks)
        sk = layer_kernel(
            OP_SELECT,
            target,
            heads_q=hq,
            heads_kv=hkv,
            head_dim=d,
            budget=cfg.budget,
            sinks=cfg.sinks,
            normalize=cfg.kind == "dhsa",
            kv_dtype=common.get("kv_dtype"),
            local=getattr(cfg, "local", 0),
            observe=getattr(cfg, "observe", 0),
            vertical=getattr(cfg, "vertical_tokens", 0),
        )
        tile = {} if decode else {"query_tile": query_tile_for(bnd)}
        ak = layer_kernel(OP_SPARSE, target, decode=decode, sinks=cfg.sinks, **tile, **common)
        bt = as_tvm(empty(bnd.shape, "int32").copy_(torch.from_numpy(bnd)))
        for b in range(bsz):
            sel_t, nsel_t = empty((hkv, nq, m), "int32"), empty((hkv, nq), "int32")
            sel, nsel = sel_t.numpy(), nsel_t.numpy()
            t0 = time.perf_counter()
            sk(qb[b], kb[b], bt, sel_t, nsel_t)
            t1 = time.perf_counter()
            if (nsel < 0).any():
                raise RuntimeError(
                    f"chunk selection overflowed its width M={m} (budget {cfg.budget}, {nc} chunks); "
                    "this is a bug in max_selected"
                )
            ak(qb[b], kb[b], vb[b], bt, sel_t, nsel_t, ob[b])
            t2 = time.perf_counter()
            if times is not None:
                times.select_s += t1 - t0
                times.attention_s += t2 - t1
            selections.append((sel, nsel))
    for b in range(bsz):
        if ob[b].data_ptr() != res[b].data_ptr():
            res[b].copy_(ob[b])
    if squeeze:
        res = res[0]
    result = res if is_torch else res.numpy()
    return (result, selections) if return_selection else result


__all__ = [
    "CompiledKernel",
    "LayerTimes",
    "NUM_OUTPUTS",
    "build_module",
    "clear_cache",
    "compile_module",
    "get_kernel",
    "host_target",
    "resolve_target",
    "run_layer",
    "query_tile_for",
    "selection_width",
    "target_family",
]
