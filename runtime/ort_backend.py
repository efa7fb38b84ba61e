"""Backend ``ort``: ONNX Runtime runs an exported file, its ``ai.edgeattn`` nodes on the TVM kernels.

    s = open_session("gemma3-dhsa.onnx", kernels="tvm", threads=2)
    logits = s.append(prompt_ids)        # prefill (or one chunk of it)
    logits = s.append([next_token])      # a decode step through the KV cache

``kernels="tvm"``: the file is cut at its ai.edgeattn nodes (``runtime/ort_ops.py`` says why
and how); DHSA selection and sparse attention, and DenseFlashAttention where the file has it
(``edgeattn export --dense-op edgeattn``), run on the TIR kernels.  ``kernels="reference"``:
ONNX Runtime runs the file unmodified, the ops as their ONNX function bodies.

Before anything runs, the file is checked against the manifest the exporter wrote beside it
(NAME.manifest.json: sha256 of every file): a file that was changed, truncated or replaced, or
one that is not ONNX at all, is refused with one clear error (exit code 2 in the CLI).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeattn.config import AttentionConfig, resolve_threads
from edgeattn.errors import CorruptModelError, ModelNotFoundError
from edgeattn.export.quantize import WeightFormat
from edgeattn.runtime import heap
from edgeattn.runtime.session import SessionInfo
from edgeattn.runtime.threads import set_threads

KERNELS = ("tvm", "reference")
# bump when the exporter's output for the same options changes in a way an old cached file lacks
CACHE_FORMAT = 2


class ManifestMismatchError(CorruptModelError):
    """The .onnx file is not the one its manifest describes (or has no manifest)."""


def _manifest_error(onnx_path: Path, what: str) -> ManifestMismatchError:
    return ManifestMismatchError(
        f"{onnx_path}: {what}; re-export it with `edgeattn export -o {onnx_path} --force` "
        "(the manifest records the sha256 of every file the exporter wrote)"
    )


def check_export(onnx_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of ``onnx_path`` after checking that it describes this very file; errors say what to do."""
    from edgeattn.export import manifest

    path = Path(onnx_path)
    if not path.is_file():
        raise ModelNotFoundError(f"ONNX file {path} does not exist; export one with `edgeattn export -o {path}`")
    mpath = manifest.manifest_path(path)
    if not mpath.is_file():
        raise _manifest_error(path, f"no manifest {mpath.name} beside it, so nothing says what the file holds")
    try:
        data = manifest.read_manifest(mpath)
    except (ValueError, OSError) as err:  # JSONDecodeError is a ValueError
        raise _manifest_error(path, f"its manifest {mpath.name} is unreadable ({err})") from err
    files = data.get("files") or {}
    if path.name not in files:
        listed = ", ".join(files) or "nothing"
        raise _manifest_error(path, f"its manifest {mpath.name} describes {listed}, not {path.name}")
    bad = manifest.check_files(mpath)
    if bad:
        raise _manifest_error(path, f"{', '.join(bad)} changed since export (sha256 differs from {mpath.name})")
    return data


def _load_onnx(path: Path) -> Any:
    import onnx

    try:
        return onnx.load(str(path))
    except Exception as err:  # protobuf DecodeError, truncated external data, ...
        raise CorruptModelError(
            f"{path} is not a readable ONNX file ({type(err).__name__}: {err}); re-export it with `edgeattn export`"
        ) from err


def _session_options(threads: int, arena: bool = True) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    # Segments each hold their own arena; an arena keeps its peak for the session's life, so
    # 19 of them would each keep one layer's activations.  Without it, memory goes back after a run.
    opts.enable_cpu_mem_arena = arena
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def _session_from_file(data: bytes, opts: Any) -> Any:
    """An InferenceSession of a serialized model, loaded from a file rather than from the bytes.

    Given bytes, ONNX Runtime keeps a copy of every initializer for the session's life: measured
    on the int4 Gemma 3 270M file, 464 MiB from bytes against 292 MiB from a path (its weights
    are 171 MiB).  The file is gone as soon as the session holds what it needs.
    """
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="edgeattn-segment-") as tmp:
        path = Path(tmp) / "segment.onnx"
        path.write_bytes(data)
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class _WholeFile:
    """The file in one InferenceSession (``--kernels reference``): the ai.edgeattn ops as function bodies."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        try:
            opts = _session_options(threads)
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as err:
            raise CorruptModelError(
                f"ONNX Runtime cannot load {path} ({str(err).splitlines()[0][:300]}); re-export it with "
                "`edgeattn export`"
            ) from err
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feed: dict[str, np.ndarray], trim: bool = False) -> dict[str, np.ndarray]:
        # one InferenceSession.run: nothing between its nodes to trim at
        return dict(zip(self.output_names, self.session.run(None, feed), strict=True))


class OrtSession:
    """One exported file in ONNX Runtime with its KV cache (the :class:`~edgeattn.runtime.session.Session` protocol)."""

    def __init__(self, onnx_path: Path, manifest: dict[str, Any], runner: Any, kernels: str) -> None:
        self.path = onnx_path
        self.manifest = manifest
        self._runner = runner
        model = manifest["model"]
        self.layers = int(model["layers"])
        self.kv_heads = int(model["kv_heads"])
        self.head_dim = int(model["head_dim"])
        self.context = int(model.get("max_position_embeddings") or 0) or None
        onnx_info = manifest.get("onnx", {})
        self.dtype = np.float16 if onnx_info.get("dtype") == "float16" else np.float32
        self.dense_op = onnx_info.get("dense_op", "onnx")
        attention = manifest.get("attention", {}).get("kind", "dense")
        label = kernels if self.dense_op != "gqa" else f"{kernels}+gqa"
        self.info = SessionInfo(backend="ort", attention=attention, kernels=label)
        self._past: dict[str, np.ndarray] = {}
        self.reset()

    @property
    def cached_tokens(self) -> int:
        return int(self._past["past_key_values.0.key"].shape[2])

    def reset(self) -> None:
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), self.dtype)
        self._past = {f"past_key_values.{i}.{kv}": empty for i in range(self.layers) for kv in ("key", "value")}

    def append(self, ids: Sequence[int]) -> np.ndarray:
        """Run ``ids`` after the cached tokens; the logits of the last one (float32 [vocab])."""
        arr = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        seq = arr.shape[1]
        if seq == 0:
            raise ValueError("append() needs at least one token")
        past = self.cached_tokens
        if self.context and past + seq > self.context:
            raise ValueError(f"{past} cached + {seq} new tokens exceed the model's context of {self.context}")
        feed = {
            "input_ids": arr,
            "attention_mask": np.ones((1, past + seq), np.int64),
            "position_ids": np.arange(past, past + seq, dtype=np.int64)[None],
            **self._past,
        }
        outs = self._runner.run(feed, trim=seq >= heap.TRIM_FROM_TOKENS)
        self._past = {n: outs[n.replace("past_key_values.", "present.")] for n in self._past}
        return np.asarray(outs["logits"][0, -1], dtype=np.float32)

    def close(self) -> None:
        self._runner = None
        self._past = {}


def open_session(
    onnx_path: str | os.PathLike[str], *, kernels: str = "tvm", threads: int | None = None, target: Any = None
) -> OrtSession:
    """Open an exported file on ONNX Runtime (``kernels`` tvm: ai.edgeattn nodes on the TIR kernels).

    ``threads`` sets ONNX Runtime's intra-op threads and TVM's pool (TVM_NUM_THREADS, read when
    the pool starts) alike; None = all cores.  Raises ManifestMismatchError / CorruptModelError
    (EdgeAttnError, exit code 2) for a file that does not match its manifest or is not ONNX.
    """
    from edgeattn.runtime.ort_ops import SegmentedModel, is_edgeattn_node

    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
    path = Path(onnx_path)
    manifest = check_export(path)
    n_threads = resolve_threads(threads)
    if kernels == "reference":
        runner = _WholeFile(path, n_threads)
        heap.release_freed_memory()
        return OrtSession(path, manifest, runner, kernels)
    set_threads(n_threads)  # TVM's pool reads it when it starts
    model = _load_onnx(path)
    if not any(is_edgeattn_node(n) for n in model.graph.node):  # nothing for the kernels: ORT runs it whole
        del model
        runner = _WholeFile(path, n_threads)
        heap.release_freed_memory()
        return OrtSession(path, manifest, runner, kernels)

    def session_factory(data: bytes) -> Any:
        return _session_from_file(data, _session_options(n_threads, arena=False))

    try:
        runner = SegmentedModel(model, session_factory, target=target)
    except Exception as err:
        raise CorruptModelError(
            f"{path} cannot be split for the TVM kernels ({type(err).__name__}: {str(err)[:300]}); "
            "is it an `edgeattn export` file?"
        ) from err
    del model
    heap.release_freed_memory()
    return OrtSession(path, manifest, runner, kernels)


# ------------------------------------------------------------------ the built-in model, exported once


def _model_identity(loaded: Any) -> dict[str, Any]:
    """What makes two loads the same model: its folder and files (or, without one, its weights)."""
    from edgeattn import models

    path = getattr(loaded, "path", None)
    ident: dict[str, Any] = {"name": str(getattr(loaded, "name", "")), "config": models.describe(loaded.model.config)}
    if path is not None and Path(path).is_dir():
        ident["dir"] = str(Path(path).resolve())
        ident["files"] = sorted(
            (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(path).iterdir() if p.is_file()
        )
    else:
        h = hashlib.sha256()
        for name, t in sorted(loaded.model.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().float().cpu().numpy().tobytes())
        ident["weights_sha256"] = h.hexdigest()
    return ident


def export_key(
    loaded: Any, cfg: AttentionConfig, layers: str, dense_op: str, dtype: str, weights: WeightFormat | None = None
) -> str:
    """Cache key of an export: the model, the attention config and the export options."""
    from edgeattn import __version__

    payload = {
        "format": CACHE_FORMAT,
        "edgeattn": __version__,
        "model": _model_identity(loaded),
        "attention": cfg.to_dict() if cfg.kind != "dense" else {"kind": "dense"},
        "layers": layers if cfg.kind != "dense" else None,
        "dense_op": dense_op,
        "dtype": dtype,
        "weights": (weights or WeightFormat()).to_dict(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cached_export(
    loaded: Any,
    cfg: AttentionConfig,
    *,
    layers: str = "global",
    dense_op: str = "onnx",
    dtype: str = "float32",
    weights: WeightFormat | None = None,
) -> Path:
    """The .onnx of ``loaded`` (a LoadedModel, or a model spec / None for the built-in) with ``cfg``.

    Exported once into ``$EDGEATTN_CACHE/onnx/<name>-<key>/model.onnx`` and reused while the
    key -- model folder and files, attention config, layers, dense op, dtype, weights, edgeattn version --
    is the same.  The folder appears whole or not at all (``edgeattn.atomic.staged_dir``).
    """
    from edgeattn import atomic, models
    from edgeattn.export import manifest
    from edgeattn.export.exporter import export_loaded

    if loaded is None or isinstance(loaded, (str, os.PathLike)):
        loaded = models.load(loaded)
    weights = weights or WeightFormat()
    key = export_key(loaded, cfg, layers, dense_op, dtype, weights)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(str(loaded.name)).name)[:40] or "model"
    tag = "" if weights.kind == "fp32" else f"-{weights.label}"
    folder = models.cache_dir() / "onnx" / f"{safe}-{cfg.kind}-{dense_op}{tag}-{key}"
    target = folder / "model.onnx"
    if target.is_file() and manifest.manifest_path(target).is_file():
        return target
    with atomic.staged_dir(folder) as tmp:
        export_loaded(loaded, tmp / "model.onnx", cfg, layers=layers, dtype=dtype, dense_op=dense_op, weights=weights)
    return target


__all__ = [
    "KERNELS",
    "ManifestMismatchError",
    "OrtSession",
    "cached_export",
    "check_export",
    "export_key",
    "open_session",
]
