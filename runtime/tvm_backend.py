"""The tvm backend: a compiled artifact (``edgeattn compile``) run by the Relax VM, as a :class:`Session`.

Everything here needs only TVM's runtime library and numpy (run it with
``TVM_USE_RUNTIME_LIB=1`` on a device): the artifact is checked -- format, TVM
version, CPU architecture, sha256 of the library and the weights -- *before*
the library is loaded, because loading a shared library runs its code.
:func:`open_session` also takes an ``.onnx`` export, which it compiles for this
machine first (that part needs the full TVM).
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeattn.errors import EdgeAttnError
from edgeattn.export.manifest import sha256_file
from edgeattn.runtime.artifact_format import ARTIFACT_FORMAT, ARTIFACT_VERSION, LIBRARY, MANIFEST, PARAMS
from edgeattn.runtime.session import SessionInfo


class ArtifactError(EdgeAttnError):
    """An artifact folder that cannot be used here; the message says why and how to fix it."""


def read_manifest(folder: Path) -> dict[str, Any]:
    """The artifact's manifest, checked for format, TVM version and architecture (no hashing yet)."""
    import tvm

    mfile = folder / MANIFEST
    if not folder.is_dir() or not mfile.is_file():
        raise ArtifactError(
            f"{folder} is not a TVM artifact (no {MANIFEST}); build one with `edgeattn compile FILE.onnx`"
        )
    try:
        man = json.loads(mfile.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{mfile} is damaged ({exc}); compile the model again (edgeattn compile --force)") from exc
    if not isinstance(man, dict) or man.get("format") != ARTIFACT_FORMAT or man.get("version") != ARTIFACT_VERSION:
        raise ArtifactError(
            f"{mfile} is not an edgeattn TVM artifact of version {ARTIFACT_VERSION}; compile the model again"
        )
    if man.get("tvm") != tvm.__version__:
        raise ArtifactError(
            f"{folder} was built by TVM {man.get('tvm')}, this runtime is TVM {tvm.__version__}: an executable only "
            f"loads in the TVM that built it; compile again here or install apache-tvm=={man.get('tvm')}"
        )
    target = man.get("target") or {}
    arch = target.get("arch")
    if arch != platform.machine():
        raise ArtifactError(
            f"{folder} is for target {target.get('profile')!r} ({arch}), this machine is {platform.machine()}; "
            "run it on that device (edgeattn run --device ...) or compile for this machine (--device x86-host)"
        )
    return man


def verify_files(folder: Path, man: dict[str, Any]) -> None:
    """sha256 of every file against the manifest; ArtifactError before anything is loaded."""
    files = man.get("files") or {}
    for name in (LIBRARY, PARAMS):
        p = folder / name
        if name not in files or not p.is_file():
            raise ArtifactError(f"{folder} lacks {name}; copy the whole artifact folder or compile again")
        if sha256_file(p) != files[name]:
            raise ArtifactError(
                f"{p} does not match the sha256 in {MANIFEST} (corrupt or altered); it was not loaded. "
                "Copy the artifact again or recompile (edgeattn compile --force)"
            )


def load_params(folder: Path, man: dict[str, Any], dev: Any) -> list[Any]:
    """The weights as TVM tensors on ``dev``, in ``main``'s parameter order."""
    import tvm

    raw = np.memmap(folder / PARAMS, dtype=np.uint8, mode="r")
    out = []
    for entry in man["params"]:
        dtype = np.dtype(entry["dtype"])
        count = int(np.prod(entry["shape"])) if entry["shape"] else 1
        arr = np.frombuffer(raw, dtype=dtype, count=count, offset=int(entry["offset"])).reshape(entry["shape"])
        out.append(tvm.runtime.tensor(arr, dev))
    del raw
    return out


@dataclass
class LoadedArtifact:
    path: Path
    manifest: dict[str, Any]
    vm: Any
    params: list[Any]
    device: Any

    @property
    def layers(self) -> int:
        return int(self.manifest["export"]["model"]["layers"])

    @property
    def attention(self) -> str:
        att = self.manifest["export"].get("attention") or {}
        return str(att.get("kind", "dense"))


def load_artifact(path: str | Path, threads: int | None = None) -> LoadedArtifact:
    """Check and load an artifact folder into a Relax VM (runtime-only TVM is enough)."""
    import tvm
    from tvm.runtime.vm import VirtualMachine  # the runtime's VM: tvm.relax is the compiler

    folder = Path(path)
    man = read_manifest(folder)
    verify_files(folder, man)
    if threads:
        os.environ["TVM_NUM_THREADS"] = str(threads)
    family = man["target"]["family"]
    if family != "cpu":
        from edgeattn.kernels_tvm.prebuilt import load_runtime_backend

        load_runtime_backend(family)
    dev = tvm.cpu() if family == "cpu" else tvm.device(family, 0)
    if not dev.exist:
        raise ArtifactError(f"{folder} is for {family}, and this machine has no {family} device")
    lib = tvm.runtime.load_module(str(folder / LIBRARY))
    vm = VirtualMachine(lib, dev)
    return LoadedArtifact(path=folder, manifest=man, vm=vm, params=load_params(folder, man, dev), device=dev)


class TvmSession:
    """A :class:`edgeattn.runtime.session.Session` over a loaded artifact (batch 1, KV cache as VM tensors).

    Built from a :class:`LoadedArtifact`; the VM, weights and device may also be remote
    (TVM RPC objects behave the same), which is how a device session reuses it.
    """

    def __init__(self, art: LoadedArtifact, device_name: str = "host") -> None:
        self.art = art
        self.info = SessionInfo(backend="tvm", attention=art.attention, kernels="tvm", device=device_name)
        man = art.manifest
        self.max_context = int(man["max_context"])
        model = man["export"]["model"]
        self._kv_shape = (1, int(model["kv_heads"]), 0, int(model["head_dim"]))
        self._main = art.vm["main"]
        self.reset()

    def reset(self) -> None:
        import tvm

        empty = np.zeros(self._kv_shape, np.float32)
        self._past = [tvm.runtime.tensor(empty, self.art.device) for _ in range(2 * self.art.layers)]
        self._cached = 0

    @property
    def cached_tokens(self) -> int:
        return self._cached

    def append(self, ids: Sequence[int]) -> np.ndarray:
        import tvm

        n = len(ids)
        if n == 0:
            raise ValueError("append() needs at least one token")
        total = self._cached + n
        if total > self.max_context:
            raise ArtifactError(
                f"{total} tokens exceed the artifact's max context {self.max_context}; "
                f"compile with --max-context {total} or more"
            )
        dev = self.art.device
        ids_np = np.asarray(ids, np.int64)[None]
        feed = [
            tvm.runtime.tensor(ids_np, dev),
            tvm.runtime.tensor(np.ones((1, total), np.int64), dev),
            tvm.runtime.tensor(np.arange(self._cached, total, dtype=np.int64)[None], dev),
            *self._past,
        ]
        out = self._call_main(feed)
        logits = out[0].numpy()
        self._past = [out[i] for i in range(1, 1 + 2 * self.art.layers)]
        self._cached = total
        return logits.reshape(-1, logits.shape[-1])[-1].astype(np.float32)

    def _call_main(self, feed: list[Any]) -> Sequence[Any]:
        """``main(*feed, *params)`` -> (logits, present keys/values...); over RPC the VM's stateful form."""
        return self._main(*feed, *self.art.params)

    def close(self) -> None:
        self._past = []


# open_session's context bound for an .onnx file: Gemma 3's 32K.  The plan reserves address space for it;
# pages a shorter run never touches are never resident.
SESSION_MAX_CONTEXT = 32768


def open_session(
    onnx_or_artifact_path: str | Path,
    *,
    threads: int | None = None,
    quiet: bool = False,
    max_context: int | None = None,
) -> TvmSession:
    """A tvm Session from an artifact folder, or from an ``.onnx`` export (compiled for this machine, cached).

    ``max_context`` (for an .onnx file): the longest cache + prompt the compiled artifact serves
    (default :data:`SESSION_MAX_CONTEXT`); each value is its own cached artifact.
    """
    path = Path(onnx_or_artifact_path)
    if path.suffix == ".onnx":
        from edgeattn.runtime.tvm_compile import compile_artifact

        progress = None if quiet else _stderr_progress
        device = "x86-host" if platform.machine() == "x86_64" else "arm64"
        limit = max_context or SESSION_MAX_CONTEXT
        path = compile_artifact(path, device, max_context=limit, progress=progress).path
    return TvmSession(load_artifact(path, threads=threads))


def _stderr_progress(msg: str, frac: float) -> None:
    import sys

    print(f"[edgeattn compile] {frac * 100:3.0f}% {msg}", file=sys.stderr)


# --------------------------------------------------------------------------- time per op class

OP_CLASSES = ("gemm", "attention", "rest")


def op_class(symbol: str) -> str:
    """Which class a compiled function belongs to: our GEMM, an attention kernel, or everything else."""
    if symbol.startswith("edgeattn_gemm") or "matmul" in symbol:
        return "gemm"
    if symbol.startswith(("dense_flash_attention", "dhsa_", "edgeattn_fixed_boundaries")):
        return "attention"
    return "rest"


class OpTimer:
    """Wall time per called function, through the Relax VM's instrument hook (TVM 0.27's runtime has no
    separate profiler executable); CPU kernels run synchronously, so a call's time is its kernel's."""

    def __init__(self) -> None:
        import time

        self._clock = time.perf_counter
        self._start: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def __call__(self, func: Any, symbol: str, before: bool, ret: Any, *args: Any) -> int:
        name = str(symbol)
        if before:
            self._start[name] = self._clock()
        else:
            dt = self._clock() - self._start.pop(name, self._clock())
            self.seconds[name] = self.seconds.get(name, 0.0) + dt
            self.calls[name] = self.calls.get(name, 0) + 1
        return 0

    def by_class(self) -> dict[str, float]:
        out = dict.fromkeys(OP_CLASSES, 0.0)
        for name, s in self.seconds.items():
            if name.startswith("vm.builtin.") or name in ("main",):
                out["rest"] += s
            else:
                out[op_class(name)] += s
        return out

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def attach_timer(session: TvmSession) -> OpTimer:
    """Instrument a session's VM: every call afterwards is timed into the returned OpTimer."""
    timer = OpTimer()
    session.art.vm.set_instrument(timer)
    return timer
