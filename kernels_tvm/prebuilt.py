"""Kernel bundles: compile on a host, ship a folder, run on a device that has only the TVM runtime.

Why: an edge device (a Jetson, a phone, a board) should not carry TVM's 260 MB
compiler, and neither does a lent GPU machine here: the deployment model is the
one TVM itself recommends, cross-compile on the host and load a shared library
with ``libtvm_runtime`` on the device.  A bundle is a folder with one exported
library per kernel spec and ``manifest.json`` saying which spec each file holds,
for which target, built by which TVM.  The device side (:class:`Bundle`) imports
nothing of the compiler: run it with ``TVM_USE_RUNTIME_LIB=1``.

    write_bundle("out/kernels-sm90", specs, "cuda-sm90")        # host: compiler + nvcc
    b = Bundle.load("out/kernels-sm90")                          # device: runtime only
    b.kernel(spec)(q, k, v, out)                                 # tvm Tensors on b.device()
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeattn.atomic import staged_dir

from .abi import SYMBOL, KernelSpec

MANIFEST = "manifest.json"
FORMAT = 1


class BundleError(RuntimeError):
    """A bundle folder is missing, damaged, or lacks the kernel asked for; the message says how to fix it."""


def spec_id(spec: KernelSpec) -> str:
    """A stable text key of the code-changing part of a spec (what the manifest indexes by)."""
    return json.dumps(list(spec.key()))


def write_bundle(
    out_dir: str | Path,
    specs: Iterable[KernelSpec],
    target: str,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Compile every distinct spec for ``target`` (a profile name from :mod:`.targets`) into ``out_dir``.

    The folder is assembled in a temporary sibling and renamed at the end, so a
    failed build leaves no half-written bundle; an existing ``out_dir`` is replaced.
    """
    import tvm

    from . import registry
    from .targets import get_profile

    profile = get_profile(target)
    tgt = profile.target()
    out_dir = Path(out_dir)
    with staged_dir(out_dir) as tmp:
        entries: dict[str, dict[str, Any]] = {}
        for spec in specs:
            sid = spec_id(spec)
            if sid in entries:
                continue
            name = f"k{len(entries):03d}.so"
            if progress:
                progress(f"compiling {spec.op} ({name}) for {target}")
            lib = registry.compile_module(registry.builder_for(tgt)(spec, tgt), tgt)
            lib.export_library(str(tmp / name), fcompile=profile.fcompile())
            entries[sid] = {"file": name, "symbol": SYMBOL[spec.op], "spec": spec.to_dict()}
            if profile.family == "cuda":
                entries[sid]["device_code"] = _prebuild_cuda(lib, profile, tmp, name)
        manifest = {
            "format": FORMAT,
            "target": target,
            "target_json": str(tgt),
            "family": profile.family,
            "tvm": tvm.__version__,
            "kernels": entries,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out_dir


def _prebuild_cuda(lib: Any, profile: Any, folder: Path, name: str) -> dict[str, str] | None:
    """Compile the library's CUDA source with nvcc for the profile's architecture, beside the library.

    None where nvcc cannot build that architecture (``ship_source`` profiles such as
    sm_72): the device then compiles the source itself when the library loads.
    """
    from .gpu_cuda import NvccError, nvcc_compile

    source = lib.mod.imports[0].inspect_source()
    try:
        path = nvcc_compile(source, profile.nvcc_arch, folder / f"{Path(name).stem}.cubin", fmt="cubin")
    except NvccError:
        if profile.ship_source:
            return None
        raise
    path.with_suffix(".cu").unlink(missing_ok=True)
    return {"file": path.name, "arch": profile.nvcc_arch, "sha256": _sha256(source)}


def load_runtime_backend(family: str) -> None:
    """Register a GPU runtime (CUDA, OpenCL) in a runtime-only TVM, where ``import tvm`` skips it.

    Full TVM loads its backends on import; ``TVM_USE_RUNTIME_LIB=1`` does not, so
    the sidecar library (``libtvm_runtime_cuda.so``) is loaded here by hand.
    """
    if family not in ("cuda", "opencl"):
        return
    import tvm
    from tvm.base import _LOADED_LIBS
    from tvm_ffi.libinfo import load_lib_ctypes

    name = f"tvm_runtime_{family}"
    if family == "cuda":
        _register_cuda_compile_hook()
    if name in _LOADED_LIBS or tvm.get_global_func(f"device_api.{family}", allow_missing=True) is not None:
        return
    runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    try:
        _LOADED_LIBS[name] = load_lib_ctypes(
            package="tvm", target_name=name, extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL"
        )
    except (OSError, FileNotFoundError, RuntimeError) as exc:
        raise BundleError(
            f"cannot load TVM's {family} runtime (lib{name}.so from {runtime_dir}): {exc}; "
            "install an apache-tvm build with that backend and make its driver libraries findable"
        ) from exc


# sha256 of a CUDA source -> device code for this GPU, from loaded bundles (see _register_cuda_compile_hook).
_PREBUILT_CUDA: dict[str, bytes] = {}
# How the hook answered in this process: "prebuilt" (bundle cubin) or "compiled" (on the device).
CUDA_LOADS = {"prebuilt": 0, "compiled": 0}
_HOOK_INSTALLED = False


def _sha256(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def gpu_arch(dev: Any) -> str:
    """``sm_XX`` of a TVM CUDA device (what nvcc's ``-arch`` and the bundle manifest say)."""
    return "sm_" + dev.compute_version.replace(".", "")


def _nvcc_for_this_gpu(code: str) -> bytes:
    import tvm

    from .gpu_cuda import NvccError, nvcc_compile

    with tempfile.TemporaryDirectory(prefix="edgeattn-cuda-") as tmp:
        try:
            return nvcc_compile(code, gpu_arch(tvm.cuda(0)), Path(tmp, "k.cubin"), fmt="cubin").read_bytes()
        except NvccError as exc:
            raise BundleError(f"these CUDA kernels must be compiled on load, and that failed: {exc}") from exc


def _register_cuda_compile_hook() -> None:
    """Install the hook TVM calls to turn a library's CUDA source into device code when it loads.

    TVM 0.27 stores CUDA kernels as source in an exported library and compiles
    them at load time through ``tvm_callback_cuda_compile``.  This hook answers
    from the device code a bundle carries for this GPU's architecture (built by
    :func:`write_bundle` with nvcc, matched by the source's sha256), so a device
    compiles nothing; on a miss it uses TVM's own hook, or (runtime-only TVM,
    whose own hook needs the compiler's Target API) the device's nvcc.
    """
    import tvm
    import tvm_ffi

    global _HOOK_INSTALLED
    if _HOOK_INSTALLED:
        return
    previous = tvm.get_global_func("tvm_callback_cuda_compile", allow_missing=True)
    runtime_only = bool(getattr(tvm, "_RUNTIME_ONLY", False))

    def compile_cuda(code: str, *rest: Any) -> bytes:
        hit = _PREBUILT_CUDA.get(_sha256(code))
        if hit is not None:
            CUDA_LOADS["prebuilt"] += 1
            return hit
        CUDA_LOADS["compiled"] += 1
        if previous is not None and not runtime_only:
            return previous(code, *rest)
        return _nvcc_for_this_gpu(code)

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_cuda, override=True)
    _HOOK_INSTALLED = True


@dataclass
class Bundle:
    """A loaded bundle: kernels by spec, loaded on first use."""

    path: Path
    manifest: dict[str, Any]
    _modules: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, path: str | Path) -> Bundle:
        path = Path(path)
        mfile = path / MANIFEST
        if not mfile.is_file():
            raise BundleError(f"{path} is not a kernel bundle (no {MANIFEST}); build one with write_bundle()")
        try:
            manifest = json.loads(mfile.read_text())
        except json.JSONDecodeError as exc:
            raise BundleError(f"{mfile} is damaged ({exc}); rebuild the bundle") from exc
        if manifest.get("format") != FORMAT or "kernels" not in manifest:
            raise BundleError(f"{mfile} has format {manifest.get('format')!r}, expected {FORMAT}; rebuild the bundle")
        missing = [e["file"] for e in manifest["kernels"].values() if not (path / e["file"]).is_file()]
        if missing:
            raise BundleError(f"{path} lacks {', '.join(missing)} named in {MANIFEST}; copy the whole folder")
        load_runtime_backend(manifest["family"])
        bundle = cls(path=path, manifest=manifest)
        if manifest["family"] == "cuda":
            bundle._use_prebuilt_cuda()
        return bundle

    def _use_prebuilt_cuda(self) -> None:
        """Offer the bundle's cubins to the load hook when they are for this GPU's architecture."""
        dev = self.device()
        if not dev.exist:
            return
        arch = gpu_arch(dev)
        for entry in self.manifest["kernels"].values():
            code = entry.get("device_code")
            if code and code["arch"] == arch and (self.path / code["file"]).is_file():
                _PREBUILT_CUDA[code["sha256"]] = (self.path / code["file"]).read_bytes()

    @property
    def target(self) -> str:
        return self.manifest["target"]

    def device(self, index: int = 0) -> Any:
        """The TVM device the bundle's kernels run on."""
        import tvm

        family = self.manifest["family"]
        return tvm.cpu(index) if family == "cpu" else tvm.device(family, index)

    def specs(self) -> list[KernelSpec]:
        return [KernelSpec(**e["spec"]) for e in self.manifest["kernels"].values()]

    def kernel(self, spec: KernelSpec) -> Any:
        """The packed function of ``spec``'s kernel (arguments in ABI order, see :mod:`.abi`)."""
        entry = self._entry(spec)
        return self._module(entry)[entry["symbol"]]

    def time_evaluator(self, spec: KernelSpec, **kw: Any) -> Any:
        """TVM's device-synchronised timer for ``spec``'s kernel (``number``, ``repeat``, ...)."""
        entry = self._entry(spec)
        return self._module(entry).time_evaluator(entry["symbol"], self.device(), **kw)

    def _entry(self, spec: KernelSpec) -> dict[str, Any]:
        entry = self.manifest["kernels"].get(spec_id(spec))
        if entry is None:
            raise BundleError(
                f"bundle {self.path} ({self.target}) has no {spec.op} kernel for {spec}; "
                "rebuild it with that spec included"
            )
        return entry

    def _module(self, entry: dict[str, Any]) -> Any:
        """The entry's library, loaded once."""
        import tvm

        mod = self._modules.get(entry["file"])
        if mod is None:
            mod = self._modules[entry["file"]] = tvm.runtime.load_module(str(self.path / entry["file"]))
        return mod
