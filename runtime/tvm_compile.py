"""``edgeattn compile``: an exported ONNX file -> one artifact folder per (file, target, attention config).

Why a folder and not a Python object: the artifact is what goes to a device
(a board, a phone, a Jetson) that has TVM's runtime library, numpy and nothing
else.  It holds

* ``model.so``     the compiled Relax VM executable (host code + kernels; for
                   GPU targets the device code is inside), cross-linked for
                   aarch64 profiles;
* ``params.bin``   the weights, in the order ``main`` takes them (GEMM weights
                   already packed into panels for the CPU kernels), 64-byte aligned;
* ``manifest.json`` what it was built from and for: the export's sha256, the
                   target profile and its TVM target JSON, the TVM version, the
                   sha256 of both files (checked *before* the library is loaded:
                   a shared library is code), the I/O names, the parameter table,
                   and the memory Relax planned statically (weights; activations at
                   the max context).

The folder is assembled in a hidden sibling and renamed at the end
(``edgeattn.atomic.staged_dir``), and its name carries a key of everything that
changes the result, so compiling the same inputs again returns the existing
folder at once.  Loading lives in :mod:`.tvm_backend` (runtime-only imports).
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeattn.atomic import staged_dir
from edgeattn.errors import EdgeAttnError
from edgeattn.export.manifest import sha256_file
from edgeattn.runtime.artifact_format import ARTIFACT_FORMAT, ARTIFACT_VERSION, LIBRARY, MANIFEST, PARAMS

ALIGN = 64
DEFAULT_MAX_CONTEXT = 8192
# Bump when the import or the pipeline changes what an artifact computes (part of the cache key).
PIPELINE_VERSION = 3


class CompileError(EdgeAttnError):
    """The model cannot be compiled as asked; the message names the input and the fix."""


Progress = Callable[[str, float], None]  # (stage description, fraction done 0..1)


@dataclass
class CompileResult:
    path: Path
    cached: bool
    seconds: float
    manifest: dict[str, Any]


def _export_files(onnx_path: Path, export_manifest: dict[str, Any]) -> dict[str, str]:
    """sha256 of the export's files (the .onnx and its external data), from its manifest, verified."""
    out: dict[str, str] = {}
    for name, entry in (export_manifest.get("files") or {}).items():
        p = onnx_path.parent / name
        if not p.is_file():
            raise CompileError(f"{p} (named in the export manifest) is missing; copy the whole export or export again")
        out[name] = entry["sha256"]
    if onnx_path.name not in out:
        out[onnx_path.name] = sha256_file(onnx_path)
    return out


def artifact_key(export_hashes: dict[str, str], profile: Any, max_context: int, tvm_version: str) -> str:
    """Hash of everything that changes the artifact: the files, the target, the context bound, TVM, the pipeline."""
    payload = json.dumps(
        {
            "files": sorted(export_hashes.values()),
            "target": profile.target_dict(),
            "max_context": max_context,
            "tvm": tvm_version,
            "pipeline": PIPELINE_VERSION,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def default_out_dir(onnx_path: Path, profile_name: str, key: str) -> Path:
    return onnx_path.parent / f"{onnx_path.stem}.tvm-{profile_name}-{key}"


# --------------------------------------------------------------------------- pipeline


def relax_passes(target: Any) -> tuple[list[Any], list[Any]]:
    """(passes up to memory planning, passes after it) for ``target``.

    CPU: LegalizeOps + fusion, then :class:`edgeattn.kernels_tvm.cpu_rules.ParallelVectorize`
    on every fused PrimFunc our kernels do not already cover.  GPU: DLight's GPU
    rules (matmul, GEMV, reduction, general reduction, fallback).
    """
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline

    family = "cpu" if target.kind.name in ("llvm", "c") else "gpu"
    passes: list[Any] = [relax.transform.DecomposeOpsForInference()] + list(
        cpu_pipeline.library_dispatch_passes(target)
    )
    passes += list(cpu_pipeline.legalize_passes(target))
    if family == "cpu":
        from edgeattn.kernels_tvm.cpu_rules import ParallelVectorize

        # tanh (GELU, softcaps) and exp as polynomials: libm calls would keep those loops scalar
        passes.insert(1, relax.transform.FastMathTransform())

        passes.append(ParallelVectorize(target))
    else:
        from tvm.s_tir import dlight as dl

        passes.append(
            dl.ApplyDefaultSchedule(
                dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()
            )
        )
    passes += list(cpu_pipeline.dataflow_lower_passes(target))
    passes.append(relax.transform.StaticPlanBlockMemory())
    after = [p for p in cpu_pipeline.finalize_passes(target) if "StaticPlanBlockMemory" not in str(p.info.name)]
    _ = tvm  # the passes are tvm objects; keep the import explicit for readers
    return passes, after


def planned_bytes(mod: Any) -> int:
    """Bytes of the storage ``main`` allocates after Relax's static memory planning (upper-bounded shapes)."""
    from tvm import relax

    total = 0

    def visit(expr: Any) -> None:
        nonlocal total
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == "relax.memory.alloc_storage":
            shape = expr.args[0]
            if isinstance(shape, relax.ShapeExpr):
                size = 1
                for v in shape.values:
                    if not hasattr(v, "value"):
                        return
                    size *= int(v.value)
                total += size

    relax.analysis.post_order_visit(mod["main"], visit)
    return total


def build_executable(mod: Any, target: Any, max_context: int, progress: Progress | None = None) -> tuple[Any, int]:
    """Run the pipeline and build; returns (executable, planned activation bytes at ``max_context``)."""
    import tvm

    from edgeattn.kernels_tvm.registry import DISABLED_PASSES

    bounds = {"sequence_length": max_context, "past_sequence_length": max_context, "total_sequence_length": max_context}
    mod["main"] = mod["main"].with_attr("tir_var_upper_bound", bounds)
    before, after = relax_passes(target)
    # CompactBufferAllocation costs seconds on the hand-written CPU kernels and does nothing for them;
    # DLight's GPU schedules need it (their shared/local buffers become constant-size only through it)
    disabled = DISABLED_PASSES if target.kind.name in ("llvm", "c") else []
    with target, tvm.transform.PassContext(opt_level=3, disabled_pass=disabled):
        for i, p in enumerate(before):
            if progress:
                progress(f"Relax pass {p.info.name}", i / (len(before) + len(after) + 4))
            mod = p(mod)
        planned = planned_bytes(mod)
        for p in after:
            mod = p(mod)
        if progress:
            progress("LLVM code generation", 0.8)
        exe = tvm.compile(mod, target=target, relax_pipeline=None)
    return exe, planned


def write_params(path: Path, names: list[str], arrays: list[np.ndarray]) -> list[dict[str, Any]]:
    """Concatenate the weights into one file (each 64-byte aligned); the table says where each lies."""
    table = []
    offset = 0
    with path.open("wb") as f:
        for name, arr in zip(names, arrays, strict=True):
            arr = np.ascontiguousarray(arr)
            pad = (-offset) % ALIGN
            f.write(b"\0" * pad)
            offset += pad
            f.write(arr.tobytes())
            table.append({"name": name, "dtype": str(arr.dtype), "shape": list(arr.shape), "offset": offset})
            offset += arr.nbytes
    return table


def compile_artifact(
    onnx_path: str | Path,
    device: str = "x86-host",
    *,
    out_dir: str | Path | None = None,
    max_context: int = DEFAULT_MAX_CONTEXT,
    force: bool = False,
    progress: Progress | None = None,
) -> CompileResult:
    """Compile an edgeattn export for a target profile into an artifact folder (cached, atomic)."""
    import onnx
    import tvm

    from edgeattn.export.quantize import TVM_NOT_YET, format_of_manifest
    from edgeattn.export.tvm_import import NotAnEdgeattnExport, export_manifest_for, import_with_kernels
    from edgeattn.kernels_tvm.targets import UnknownTargetError, get_profile

    t0 = time.perf_counter()
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise CompileError(f"{onnx_path} does not exist; pass the .onnx file `edgeattn export` wrote")
    try:
        profile = get_profile(device)
    except UnknownTargetError as exc:
        raise CompileError(f"--device {device!r}: {exc}") from exc
    if max_context < 1:
        raise CompileError(f"--max-context must be >= 1, got {max_context}")
    try:
        export_manifest = export_manifest_for(onnx_path)
    except NotAnEdgeattnExport as exc:
        raise CompileError(str(exc)) from exc
    weights = format_of_manifest(export_manifest.get("onnx") or {})
    if weights.quantized:
        raise CompileError(f"{onnx_path}: " + TVM_NOT_YET.format(label=weights.label))
    hashes = _export_files(onnx_path, export_manifest)
    key = artifact_key(hashes, profile, max_context, tvm.__version__)
    out = Path(out_dir) if out_dir is not None else default_out_dir(onnx_path, profile.name, key)
    existing = out / MANIFEST
    if existing.is_file() and not force:
        try:
            man = json.loads(existing.read_text())
        except json.JSONDecodeError:
            man = {}
        if man.get("key") == key and all((out / n).is_file() for n in (LIBRARY, PARAMS)):
            return CompileResult(path=out, cached=True, seconds=time.perf_counter() - t0, manifest=man)

    fcompile = None
    if profile.is_cross:
        try:
            fcompile = profile.fcompile()
        except RuntimeError as exc:
            raise CompileError(str(exc)) from exc
    target = profile.target()
    if progress:
        progress("loading the ONNX file", 0.0)
    try:
        model = onnx.load(str(onnx_path))
    except Exception as exc:  # protobuf DecodeError, missing external data, ...
        raise CompileError(
            f"{onnx_path} cannot be read as ONNX ({type(exc).__name__}: {exc}); export it again"
        ) from exc
    if model.producer_name != "edgeattn":
        raise CompileError(
            f"{onnx_path} was written by {model.producer_name or 'an unknown producer'!r}, not edgeattn; "
            "compile files that `edgeattn export` wrote"
        )
    if progress:
        progress("importing ONNX -> Relax (attention on the kernels_tvm kernels)", 0.05)
    t_import = time.perf_counter()
    try:
        ki = import_with_kernels(model, export_manifest, target)
    except NotAnEdgeattnExport as exc:
        raise CompileError(str(exc)) from exc
    del model
    import_s = time.perf_counter() - t_import
    t_build = time.perf_counter()
    exe, planned = build_executable(
        ki.mod,
        target,
        max_context,
        progress=(lambda msg, f: progress(msg, 0.1 + 0.8 * f)) if progress else None,
    )
    build_s = time.perf_counter() - t_build
    if progress:
        progress("writing the artifact", 0.92)
    with staged_dir(out) as tmp:
        exe.export_library(str(tmp / LIBRARY), fcompile=fcompile)
        table = write_params(tmp / PARAMS, ki.param_names, ki.params)
        weight_bytes = sum(int(a.nbytes) for a in ki.params)
        manifest = {
            "format": ARTIFACT_FORMAT,
            "version": ARTIFACT_VERSION,
            "key": key,
            "tvm": tvm.__version__,
            "target": {
                "profile": profile.name,
                "family": profile.family,
                "json": profile.target_dict(),
                "arch": _arch_of(profile),
                "cross_compiled": profile.is_cross,
            },
            "export": {
                "file": onnx_path.name,
                "sha256": hashes,
                "model": export_manifest.get("model"),
                "attention": export_manifest.get("attention"),
                "layers": [
                    {k: row.get(k) for k in ("layer", "type", "attention", "window")}
                    for row in export_manifest.get("layers", [])
                ],
            },
            "entry": "main",
            "batch": 1,
            "max_context": max_context,
            "inputs": ki.input_names,
            "outputs": ki.output_names,
            "num_inputs": ki.num_inputs,
            "params": table,
            "kernels": ki.kernels,
            "rewrites": {"dense_attention_fused": ki.dense_fused, "gemms_packed": ki.gemms_packed},
            "memory": {
                "weights_bytes": weight_bytes,
                "planned_activation_bytes": planned,
                "planned_at": {"sequence_length": max_context, "total_sequence_length": max_context},
                "note": "Relax StaticPlanBlockMemory with every sequence axis bounded by max_context; "
                "the KV cache (inputs and present outputs) is allocated outside the plan",
            },
            "files": {LIBRARY: sha256_file(tmp / LIBRARY), PARAMS: sha256_file(tmp / PARAMS)},
            "timings_s": {"import": round(import_s, 2), "build": round(build_s, 2)},
            "built_on": {"machine": platform.machine(), "python": platform.python_version()},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if progress:
        progress("done", 1.0)
    return CompileResult(path=out, cached=False, seconds=time.perf_counter() - t0, manifest=manifest)


def _arch_of(profile: Any) -> str:
    """The CPU architecture that loads the library (``platform.machine()`` spelling)."""
    host = profile.host if profile.host is not None else profile.spec
    triple = str(host.get("mtriple", ""))
    if triple.startswith("aarch64"):
        return "aarch64"
    if triple.startswith("x86_64"):
        return "x86_64"
    return platform.machine()
