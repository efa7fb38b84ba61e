"""``edgeattn export``: the Typer command (registered by ``edgeattn/cli.py``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from edgeattn.config import (
    ATTENTION_KINDS,
    CHUNKING_KINDS,
    DEFAULT_BUDGET,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_OBSERVE,
    DEFAULT_SINKS,
    OBSERVE_HELP,
    AttentionConfig,
    ConfigError,
)
from edgeattn.errors import EdgeAttnError
from edgeattn.export.quantize import GROUP_HELP, WEIGHTS_HELP

HELP = """Export a Gemma 2 / Gemma 3 model to ONNX with DHSA as custom ops.

The file runs unmodified in any ONNX runtime: each DHSA layer is two nodes of the
`ai.edgeattn` domain -- DHSAChunkSelect (chunk pooling, chunk scores, budgeted
selection) and DHSASparseAttention (exact softmax over the kept keys) -- and each is
an ONNX *function* whose body is plain ONNX, so ONNX Runtime computes the PyTorch
reference (edgeattn.dhsa) and a runtime that knows the op (edgeattn's TVM path) swaps
in a fused kernel. export/OPS.md documents the ops.

The graph serves prefill and decode: inputs input_ids, attention_mask, position_ids and
past_key_values.N.key/value; outputs logits (last position; --all-logits for every
position) and present.N.key/value. Batch and sequence axes are dynamic. A
NAME.manifest.json beside the file records the model, the DHSA configuration, each
layer's attention, the opset and the files' hashes. Models over 2 GB get their weights
in NAME.onnx.data.

Examples:

  edgeattn export -o gemma3-dhsa.onnx                 # built-in Gemma 3 270M, DHSA on global layers

  edgeattn export -o dense.onnx --attention dense     # the dense baseline

  edgeattn export -o dhsa-flash.onnx --dense-op edgeattn   # sliding/dense layers as DenseFlashAttention

  edgeattn export -o dense-gqa.onnx --attention dense --dense-op gqa   # ONNX Runtime's own GQA kernel

  edgeattn export -o dhsa-int4.onnx --weights int4     # 4-bit weights (group 32): 0.17x the bytes

  edgeattn export -o dhsa-gguf.onnx --weights gguf     # the built-in Q4_K_M's own blocks, bit for bit

  edgeattn export ./gemma-2-2b -o g2.onnx --budget 1024 --layers all --verify
"""


def export_command(
    model: Annotated[
        str | None,
        typer.Argument(
            help="Model: a local Hugging Face directory or .gguf file (Gemma 2 / Gemma 3). Default: built-in."
        ),
    ] = None,
    output: Annotated[
        Path, typer.Option("-o", "--output", help="The .onnx file to write (NAME.manifest.json goes beside it).")
    ] = Path("model.onnx"),
    attention: Annotated[
        str,
        typer.Option(
            help="dense (plain ONNX attention), dhsa (the custom ops), or block-sparse (the same ops, plain-mean "
            "chunk pooling and fixed blocks: the baseline DHSA is compared against).",
        ),
    ] = "dhsa",
    budget: Annotated[
        int, typer.Option(help="N_b: the most keys one query attends to (own chunk and sinks included).")
    ] = DEFAULT_BUDGET,
    chunk_size: Annotated[int, typer.Option(help="Fixed chunk (block) length in tokens.")] = DEFAULT_CHUNK_SIZE,
    sinks: Annotated[
        int, typer.Option(help="Attention sinks: the first tokens, kept for every query.")
    ] = DEFAULT_SINKS,
    observe: Annotated[int, typer.Option(min=0, help=OBSERVE_HELP)] = DEFAULT_OBSERVE,
    chunking: Annotated[
        str,
        typer.Option(
            help="Where chunks are cut: fixed (computed in the graph). shift and predictor depend on each layer's "
            "keys through a sequential rule and are not exportable yet (a clear error says so)."
        ),
    ] = "fixed",
    layers: Annotated[
        str,
        typer.Option(
            help="Layers that get sparse attention: global (the full-attention layers), all, or a list like 5,11. "
            "Sliding-window layers keep their window inside the op."
        ),
    ] = "global",
    dense_op: Annotated[
        str,
        typer.Option(
            help="How dense and sliding-window layers are written. onnx: plain ONNX attention with an explicit "
            "[B,1,1,S,T] mask (any runtime; O(S*T) memory per layer, runs out of memory at 16K). edgeattn: one "
            "ai.edgeattn DenseFlashAttention node per layer, whose function body is that same attention, so any "
            "runtime still runs it; `edgeattn run --backend ort` runs it on the TVM dense flash kernel. gqa: ONNX "
            "Runtime's com.microsoft GroupQueryAttention (window and softcap as attributes; ONNX Runtime only): "
            "its best dense baseline.",
        ),
    ] = "onnx",
    dtype: Annotated[str, typer.Option(help="Weights and activations: float32 or float16.")] = "float32",
    weights: Annotated[str, typer.Option(help=WEIGHTS_HELP)] = "fp32",
    group_size: Annotated[int | None, typer.Option(help=GROUP_HELP, show_default=False)] = None,
    all_logits: Annotated[
        bool, typer.Option("--all-logits", help="Output logits of every position, not only the last.")
    ] = False,
    external_data: Annotated[
        bool | None,
        typer.Option(
            "--external-data/--no-external-data",
            help="Weights in NAME.onnx.data. Default: only when they exceed ~1.8 GB (protobuf's 2 GB limit).",
            show_default=False,
        ),
    ] = None,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Run the file in ONNX Runtime on a random and a real prompt and print the max logit error and "
            "top-1 agreement against PyTorch, and whether 16 greedy tokens through the KV cache match.",
        ),
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing output files.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Export a Gemma 2 / Gemma 3 model to ONNX with DHSA as ai.edgeattn custom ops."""
    from edgeattn.export.exporter import export_model
    from edgeattn.export.quantize import weight_format

    try:
        if attention not in ATTENTION_KINDS:
            raise ConfigError(f"--attention {attention!r} is unknown; choose one of {', '.join(ATTENTION_KINDS)}")
        if chunking not in CHUNKING_KINDS:
            raise ConfigError(f"--chunking {chunking!r} is unknown; choose one of {', '.join(CHUNKING_KINDS)}")
        cfg = AttentionConfig(
            kind=attention, budget=budget, chunk_size=chunk_size, sinks=sinks, chunking=chunking, observe=observe
        )
        fmt = weight_format(weights, group_size)
        result, loaded = export_model(
            model, output, cfg, layers, dtype, all_logits, force, external_data, dense_op, weights=fmt
        )
        checks = []
        if verify:
            from edgeattn.export.exporter import log
            from edgeattn.export.verify import verify_export

            log("verifying against PyTorch (ONNX Runtime, CPU)")
            checks = verify_export(result.onnx_path, loaded, cfg, result.sparse_layers)
    except (EdgeAttnError, ConfigError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(getattr(err, "exit_code", 2)) from None
    if as_json:
        payload = {
            "onnx": str(result.onnx_path),
            "manifest": str(result.manifest_path),
            "external_data": str(result.data_path) if result.data_path else None,
            "sparse_layers": result.sparse_layers,
            "seconds": round(result.seconds, 2),
            "weights": result.manifest["onnx"]["weights"],
            "weight_bytes": result.manifest["onnx"]["weight_bytes"],
            "verify": [c.to_dict() for c in checks],
        }
        typer.echo(json.dumps(payload, indent=2))
        return
    typer.echo(
        f"wrote {result.onnx_path} ({cfg.kind if result.sparse_layers else 'dense'}, weights {fmt.label}: "
        f"{result.manifest['onnx']['weight_bytes'] / 2**20:.1f} MiB; manifest {result.manifest_path})"
    )
    for c in checks:
        typer.echo(c.line())


export_command.__doc__ = HELP
