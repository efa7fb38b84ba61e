"""``export_model``: a Gemma model -> model.onnx (+ external data) + manifest, atomically.

Everything is written into a temporary folder beside the output, checked with
``onnx.checker`` (full check), hashed into the manifest, and only then renamed
into place; on any failure the temporary folder is removed, so no half-written
file is ever left at the output path.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeattn.config import AttentionConfig, ConfigError
from edgeattn.errors import EdgeAttnError
from edgeattn.export.quantize import WeightFormat

# Protobuf cannot serialize a message over 2 GiB; stay clear of it.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
DTYPES = ("float32", "float16")


class ExportError(EdgeAttnError):
    """The export cannot run or failed; nothing was written at the output path."""


class OutputExistsError(ExportError):
    pass


class OutputNotWritableError(ExportError):
    pass


@dataclass
class ExportResult:
    onnx_path: Path
    manifest_path: Path
    data_path: Path | None
    sparse_layers: list[int]
    seconds: float
    manifest: dict[str, Any] = field(default_factory=dict)


def log(msg: str) -> None:
    print(f"[edgeattn export] {msg}", file=sys.stderr, flush=True)


def check_output(output: Path, force: bool) -> None:
    """Fail early (before the slow model load) on an output we may not or cannot write."""
    from edgeattn.export.manifest import manifest_path

    if output.suffix != ".onnx":
        raise ExportError(f"output {output} must end in .onnx; pass -o NAME.onnx")
    if output.is_dir():
        raise OutputExistsError(f"output {output} is a directory; pass a file path such as -o {output / 'model.onnx'}")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise OutputNotWritableError(f"output folder {parent} does not exist; create it or pick another -o path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputNotWritableError(f"output folder {parent} is not writable; pick another -o path")
    try:  # permissions are not the whole story (read-only mounts, /proc, quotas): really try
        with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{output.name}.probe."):
            pass
    except OSError as err:
        raise OutputNotWritableError(
            f"cannot create files in output folder {parent} ({err.strerror}); pick another -o path"
        ) from err
    if not force:
        existing = [p for p in (output, output.with_name(output.name + ".data"), manifest_path(output)) if p.exists()]
        if existing:
            names = ", ".join(str(p) for p in existing)
            raise OutputExistsError(f"{names} already exists; pass --force to overwrite or choose another -o path")


def check_dense_op(dense_op: str) -> None:
    from edgeattn.export.graph import DENSE_OPS

    if dense_op not in DENSE_OPS:
        raise ExportError(f"--dense-op {dense_op!r} is unknown; choose one of {', '.join(DENSE_OPS)}")


def check_chunking(cfg: AttentionConfig) -> None:
    """Adaptive boundaries cannot be computed inside the exported graph (yet): say so clearly."""
    if cfg.kind != "dhsa" or cfg.chunking == "fixed":
        return
    raise ExportError(
        f"--chunking {cfg.chunking} cannot be exported yet: its boundaries are computed from each layer's keys "
        "by a sequential walk (edgeattn.chunking.boundaries_from_scores), which needs ONNX Loop and TVM's ONNX "
        "frontend has no Loop. The exported ops take the boundaries as an input tensor (export/OPS.md), so a "
        "boundary op can feed them later; for now export with --chunking fixed."
    )


def layer_table(facts: Any, cfg: AttentionConfig, sparse: list[int], dense_op: str = "onnx") -> list[dict[str, Any]]:
    """Per-layer attention kind for the manifest."""
    dense_ops = {"onnx": [], "edgeattn": ["DenseFlashAttention"], "gqa": ["com.microsoft.GroupQueryAttention"]}
    rows = []
    for i, lt in enumerate(facts.layer_types):
        window = facts.sliding_window if lt == "sliding_attention" else None
        rows.append(
            {
                "layer": i,
                "type": lt,
                "attention": cfg.kind if i in sparse else "dense",
                "window": window,
                "ops": ["DHSAChunkSelect", "DHSASparseAttention"] if i in sparse else dense_ops[dense_op],
            }
        )
    return rows


def resolve_dtype(dtype: str, weights: WeightFormat) -> str:
    """The graph's float type for ``weights``: fp16 weights compute in float16, int8/int4 in float32."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    if weights.kind == "fp16":
        return "float16"
    if weights.quantized and dtype != "float32":
        raise ExportError(
            f"--weights {weights.kind} takes float32 activations (ONNX Runtime's MatMulNBits with fp32 scales); "
            "leave out --dtype float16, or use --weights fp16"
        )
    return dtype


def precision_table(per_tensor: dict[str, str], dtype: str, tied: bool) -> dict[str, Any]:
    """What precision each tensor ends up in (the manifest's answer to "what did I get?")."""
    from edgeattn.export.graph import EMBEDDING_KEY, LM_HEAD_KEY

    return {
        "matrices": dict(
            Counter(per_tensor.values())
        ),  # description -> how many of the linear / embedding / LM-head matrices
        "embedding": per_tensor[EMBEDDING_KEY] + (" -- stored once, shared with the LM head" if tied else ""),
        "lm_head": "the embedding table (tied)" if tied else per_tensor[LM_HEAD_KEY],
        "norms": "float32",
        "activations": dtype,
        "kv_cache": dtype,
        "tensors": dict(sorted(per_tensor.items())),
    }


def gguf_for(loaded: Any, weights: WeightFormat) -> Any:
    """The GGUF behind ``loaded`` when its blocks can be used (None otherwise); --weights gguf needs one."""
    from edgeattn import models
    from edgeattn.export import gguf_weights

    if not weights.quantized:
        return None
    source = models.gguf_source(getattr(loaded, "path", None))
    if source is None:
        if weights.kind == "gguf":
            raise ExportError(
                f"--weights gguf keeps a GGUF model's own blocks, and {loaded.name} did not come from a GGUF file "
                "(or that file has moved); pass a .gguf model or the built-in one, or use --weights int8/int4"
            )
        return None
    return gguf_weights.open_gguf(source)


def export_loaded(
    loaded: Any,
    output: Path,
    cfg: AttentionConfig,
    layers: str = "global",
    dtype: str = "float32",
    all_logits: bool = False,
    force: bool = False,
    external_data: bool | None = None,
    dense_op: str = "onnx",
    weights: WeightFormat | None = None,
) -> ExportResult:
    """Export an already loaded model (``edgeattn.models.LoadedModel`` or anything with .model/.name)."""
    import onnx

    from edgeattn import models, patching
    from edgeattn.export import graph, manifest, ops

    t0 = time.perf_counter()
    output = Path(output)
    check_output(output, force)
    check_chunking(cfg)
    weights = weights or (WeightFormat("fp16") if dtype == "float16" else WeightFormat())
    dtype = resolve_dtype(dtype, weights)
    check_dense_op(dense_op)
    model = loaded.model
    facts = graph.model_facts(model)  # UnsupportedModelError for other architectures
    if cfg.kind == "dense":
        sparse: list[int] = []
    else:
        try:
            sparse = patching.parse_layers(layers, model.config)
        except ValueError as err:
            raise ExportError(str(err)) from err

    log(
        f"writing the graph: {facts.family}, {facts.layers} layers, {cfg.kind} on layers {sparse or 'none'}, "
        f"weights {weights.label}" + (" (quantizing)" if weights.quantized else "")
    )
    spec = graph.GraphSpec(
        cfg=cfg,
        sparse_layers=sparse,
        dtype=dtype,
        all_logits=all_logits,
        dense_op=dense_op,
        weights=weights,
        gguf=gguf_for(loaded, weights),
    )
    per_tensor: dict[str, str] = {}
    try:
        proto = graph.build_onnx(model, spec, per_tensor)
    except (EdgeAttnError, ConfigError):  # their messages already say what to do
        raise
    except Exception as err:  # a model whose weights/architecture the writer cannot express
        raise ExportError(
            f"could not write {loaded.name} as ONNX ({type(err).__name__}: {err}); the exporter supports "
            "Gemma 2 / Gemma 3 text models as transformers defines them"
        ) from err

    weight_bytes = sum(len(t.raw_data) for t in proto.graph.initializer)
    tied = graph.LM_HEAD_KEY not in per_tensor  # the writer asked for the table's key when it tied the head
    use_external = external_data if external_data is not None else weight_bytes > EXTERNAL_DATA_THRESHOLD
    parent = output.parent if str(output.parent) else Path(".")
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=parent))
    renamed: list[Path] = []
    moves: list[tuple[Path, Path]] = []
    try:
        tmp_onnx = tmp / output.name
        data_name = output.name + ".data"
        log(
            f"saving {weight_bytes / 2**20:.0f} MiB of weights"
            + (f" as external data ({data_name})" if use_external else "")
        )
        if use_external:
            onnx.save_model(
                proto, tmp_onnx, save_as_external_data=True, all_tensors_to_one_file=True, location=data_name
            )
        else:
            onnx.save_model(proto, tmp_onnx)
        del proto
        log("checking the file (onnx.checker, full check)")
        try:
            onnx.checker.check_model(str(tmp_onnx), full_check=True)
        except Exception as err:
            raise ExportError(f"the written graph fails onnx.checker ({err}); this is an exporter bug") from err
        written = [tmp_onnx] + ([tmp / data_name] if use_external else [])
        info = {
            "opset": graph.OPSET,
            "ir_version": 10,
            "dtype": dtype,
            "weights": weights.to_dict(),
            "weight_bytes": weight_bytes,
            "precision": precision_table(per_tensor, dtype, tied),
            "custom_domain": ops.DOMAIN if sparse or dense_op == "edgeattn" else None,
            "custom_ops": ([ops.OP_SELECT, ops.OP_SPARSE] if sparse else [])
            + ([ops.OP_DENSE] if dense_op == "edgeattn" else []),
            "dense_op": dense_op,
            "functions_inline_for_tvm": "onnx.inliner.inline_local_functions (see export/OPS.md)",
            "boundaries": "fixed chunks computed in-graph from the total sequence length" if sparse else None,
            "logits": "all positions [B,S,V]" if all_logits else "last position [B,1,V]",
            "inputs": ["input_ids", "attention_mask", "position_ids"]
            + [f"past_key_values.{i}.{kv}" for i in range(facts.layers) for kv in ("key", "value")],
            "outputs": ["logits"] + [f"present.{i}.{kv}" for i in range(facts.layers) for kv in ("key", "value")],
            "padding": "dense layers honour attention_mask; DHSA layers assume unpadded sequences",
            "external_data": data_name if use_external else None,
        }
        man = manifest.build_manifest(
            model_name=str(loaded.name),
            model_facts=models.describe(model.config),
            attention=cfg.to_dict() if sparse else {"kind": "dense"},
            layers=layer_table(facts, cfg, sparse, dense_op),
            onnx_info=info,
            files=manifest.file_entries(written),
        )
        man_tmp = tmp / manifest.manifest_path(output).name
        manifest.write_manifest(man_tmp, man)
        # rename into place: data first, the manifest, the .onnx last (its presence means "complete")
        final_data = output.with_name(data_name)
        moves = [(tmp / data_name, final_data)] if use_external else []
        moves += [(man_tmp, manifest.manifest_path(output)), (tmp_onnx, output)]
        if not use_external and final_data.exists():
            final_data.unlink()  # a stale external-data file of an earlier export (--force)
        for src, dst in moves:
            os.replace(src, dst)
            renamed.append(dst)
    except BaseException:
        if len(renamed) < len(moves):  # failed between renames: remove what this run put in place
            for p in renamed:
                p.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - t0
    log(f"wrote {output} in {seconds:.1f} s")
    return ExportResult(
        onnx_path=output,
        manifest_path=manifest.manifest_path(output),
        data_path=output.with_name(output.name + ".data") if use_external else None,
        sparse_layers=sparse,
        seconds=seconds,
        manifest=man,
    )


def export_model(
    model: str | None,
    output: Path,
    cfg: AttentionConfig,
    layers: str = "global",
    dtype: str = "float32",
    all_logits: bool = False,
    force: bool = False,
    external_data: bool | None = None,
    dense_op: str = "onnx",
    weights: WeightFormat | None = None,
) -> tuple[ExportResult, Any]:
    """Load ``model`` (default: the built-in Gemma 3 270M) and export it; returns (result, loaded model)."""
    from edgeattn import models

    check_output(Path(output), force)
    check_chunking(cfg)
    check_dense_op(dense_op)
    resolve_dtype(dtype, weights or WeightFormat())
    log(f"loading {model or models.DEFAULT_MODEL}")
    loaded = models.load(model)
    result = export_loaded(
        loaded, Path(output), cfg, layers, dtype, all_logits, force, external_data, dense_op, weights=weights
    )
    return result, loaded


__all__ = [
    "ConfigError",
    "ExportError",
    "ExportResult",
    "OutputExistsError",
    "OutputNotWritableError",
    "export_loaded",
    "export_model",
]
