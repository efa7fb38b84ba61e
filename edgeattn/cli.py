"""The `edgeattn` command line: a thin shell over the packages.

Verbs follow the product's flow (export -> compile -> run/bench/eval on a
device).  A verb whose machinery is not built yet says so and exits non-zero;
none pretends to work.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from edgeattn.config import (
    ATTENTION_KINDS,
    DEFAULT_BUDGET,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_CHUNKING,
    DEFAULT_LAYERS,
    DEFAULT_MAX_CHUNK,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MIN_CHUNK,
    DEFAULT_OBSERVE,
    DEFAULT_PROMPT_TOKENS,
    DEFAULT_SINKS,
    OBSERVE_HELP,
    AttentionConfig,
    ConfigError,
    resolve_threads,
)
from edgeattn.errors import NotBuiltYetError, friendly_errors
from edgeattn.export.quantize import GROUP_HELP

app = typer.Typer(
    name="edgeattn",
    help=(
        "Long-context Gemma models on edge devices with Dynamic Hierarchical Sparse Attention (DHSA).\n\n"
        "Typical flow: `edgeattn run` (PyTorch on this machine, dense vs DHSA side by side), "
        "`edgeattn export` (ONNX with DHSA custom ops), then compile and run on a device. "
        "MODEL is the built-in Gemma 3 270M when left out, or a local HF directory / .gguf file."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


ModelArg = Annotated[
    str | None,
    typer.Argument(help="Model: a local Hugging Face directory or .gguf file (Gemma 2 / Gemma 3). Default: built-in."),
]


# ------------------------------------------------------------------ info


@app.command()
@friendly_errors
def info(
    model: ModelArg = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
) -> None:
    """Versions of the stack (torch, onnx, onnxruntime, tvm) and the model's attention-relevant config."""
    from edgeattn import models

    versions = _versions()
    path = models.resolve(model)
    from transformers import AutoConfig

    described = models.describe(AutoConfig.from_pretrained(str(path)))
    report = {"versions": versions, "model": {"name": model or models.DEFAULT_MODEL, "path": str(path), **described}}
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    for name, ver in versions.items():
        typer.echo(f"{name:<14} {ver}")
    typer.echo("")
    for key, val in report["model"].items():
        typer.echo(f"{key:<24} {val}")


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"edgeattn": version("edgeattn"), "python": sys.version.split()[0]}
    for dist in ("torch", "onnx", "onnxruntime", "apache-tvm", "transformers", "numpy"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


# ------------------------------------------------------------------ run


def parse_kinds(spec: str) -> list[str]:
    kinds = [k.strip() for k in spec.split(",") if k.strip()]
    bad = [k for k in kinds if k not in ATTENTION_KINDS]
    if bad or not kinds:
        raise ConfigError(f"--attention takes a comma list of {', '.join(ATTENTION_KINDS)}; got {spec!r}")
    return list(dict.fromkeys(kinds))


@app.command()
@friendly_errors
def run(
    model: Annotated[
        str | None,
        typer.Argument(
            help="Model: a local HF directory, a .gguf file, an .onnx file from `edgeattn export` "
            "(run on the ort/tvm backends), or an artifact folder from `edgeattn compile` (run on tvm, as "
            "compiled). Default: built-in."
        ),
    ] = None,
    prompt: Annotated[str | None, typer.Option(help="Prompt text.")] = None,
    prompt_file: Annotated[Path | None, typer.Option(help="Read the prompt from this text file.")] = None,
    synthetic_length: Annotated[
        int | None,
        typer.Option(
            help=f"Use N tokens of real offline prose (pydoc topics, or --haystack) as the prompt "
            f"(default without a prompt option: {DEFAULT_PROMPT_TOKENS})."
        ),
    ] = None,
    haystack: Annotated[
        Path | None, typer.Option(help="Folder of .txt files used as the text for --synthetic-length.")
    ] = None,
    attention: Annotated[
        str, typer.Option(help="Comma list of dense, dhsa, block-sparse: each runs on the same prompt, side by side.")
    ] = "dense,dhsa",
    budget: Annotated[
        int, typer.Option(help="N_b: most keys a query attends to (own chunk and sinks included).")
    ] = DEFAULT_BUDGET,
    chunk_size: Annotated[int, typer.Option(help="Fixed chunk / block length in tokens.")] = DEFAULT_CHUNK_SIZE,
    sinks: Annotated[int, typer.Option(help="First tokens every query keeps (attention sinks).")] = DEFAULT_SINKS,
    observe: Annotated[int, typer.Option(min=0, help=OBSERVE_HELP)] = DEFAULT_OBSERVE,
    chunking: Annotated[
        str, typer.Option(help="Boundary source for DHSA: fixed, shift or predictor.")
    ] = DEFAULT_CHUNKING,
    min_chunk: Annotated[
        int, typer.Option(help="Shortest chunk the shift/predictor sources may cut.")
    ] = DEFAULT_MIN_CHUNK,
    max_chunk: Annotated[
        int, typer.Option(help="Longest chunk the shift/predictor sources may cut.")
    ] = DEFAULT_MAX_CHUNK,
    layers: Annotated[
        str, typer.Option(help="Layers that get sparse attention: global (full-attention layers), all, or 5,11.")
    ] = DEFAULT_LAYERS,
    max_new_tokens: Annotated[
        int, typer.Option(min=1, help="Tokens to generate greedily after the prompt.")
    ] = DEFAULT_MAX_NEW_TOKENS,
    threads: Annotated[
        int | None, typer.Option(help="CPU threads for torch, TVM and ONNX Runtime alike (default: all cores).")
    ] = None,
    device: Annotated[
        str,
        typer.Option(
            help="Where to run: host (this machine) or a device profile (`edgeattn devices list`): the model is "
            "compiled for it and run there over TVM RPC, dense and DHSA side by side."
        ),
    ] = "host",
    tracker: Annotated[
        str | None, typer.Option(help="HOST:PORT of a TVM RPC tracker (overrides the device profile's).")
    ] = None,
    key: Annotated[str | None, typer.Option(help="The device key at the tracker (overrides the profile's).")] = None,
    backend: Annotated[
        str | None,
        typer.Option(
            help="Comma list of torch (transformers + our attention kernels), ort (ONNX Runtime on the "
            "exported file, ai.edgeattn ops on our kernels), tvm (the whole model compiled with TVM). "
            "Default: torch, or ort when MODEL is an .onnx file."
        ),
    ] = None,
    kernels: Annotated[
        str | None,
        typer.Option(
            help="Attention kernels: tvm (our TIR kernels; default where TVM imports) or reference "
            "(PyTorch reference / ONNX function bodies)."
        ),
    ] = None,
    memory_budget: Annotated[
        str | None,
        typer.Option(
            help="RAM the run may use, such as 1.5GiB or 900MiB: the peak is planned first, a prompt that "
            "does not fit is prefilled in chunks, and a model whose weights do not fit is refused."
        ),
    ] = None,
    weights: Annotated[
        str,
        typer.Option(
            help="Weights of the ort backend's export: fp32, fp16, int8, int4 or gguf (export --help says how each "
            "is stored). The torch backend runs the model's own float weights."
        ),
    ] = "fp32",
    group_size: Annotated[int | None, typer.Option(help=GROUP_HELP, show_default=False)] = None,
    kv_dtype: Annotated[
        str,
        typer.Option(
            help="The torch backend's KV cache: float32 or float16 (half the cache, read as it is by the TVM "
            "kernels; the activations stay float32). The transformers row keeps the model's own cache."
        ),
    ] = "float32",
    shipped: Annotated[
        bool,
        typer.Option(
            "--shipped/--no-shipped",
            help="Also run the model as shipped (transformers SDPA) as the `transformers` row.",
        ),
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Prefill a prompt and generate, with dense and sparse attention side by side.

    Each row is one (backend, attention) pair on the same prompt in this process: prefill latency,
    tokens/s, speed-up over the model as shipped and over dense on the same backend, measured peak RSS
    beside the planned peak, and decode tokens/s.  Without a prompt option, 8192 tokens of real prose.

    Examples:

      edgeattn run                                   # built-in Gemma 3 270M: transformers, dense, DHSA

      edgeattn run --synthetic-length 16384 --memory-budget 1.8GiB     # chunked prefill to fit

      edgeattn run --attention dense,dhsa,block-sparse --budget 1024 --json

      edgeattn run --backend torch,ort --kernels tvm

      edgeattn run --backend ort --weights int4 --no-shipped   # 4-bit weights on ONNX Runtime

      edgeattn run --synthetic-length 32768 --kv-dtype float16   # half the KV cache

      edgeattn run ./my-gemma2-dir --prompt-file notes.txt

      edgeattn run model.tvm-x86-host-1a2b3c4d     # an artifact folder `edgeattn compile` wrote
    """
    from edgeattn.export.quantize import weight_format
    from edgeattn.runtime import host, memory

    configs = [
        AttentionConfig(
            kind=k,  # type: ignore[arg-type]
            budget=budget,
            chunk_size=chunk_size,
            sinks=sinks,
            chunking=chunking,  # type: ignore[arg-type]
            min_chunk=min_chunk,
            max_chunk=max_chunk,
            observe=observe,
        )
        for k in parse_kinds(attention)
    ]
    request = host.RunRequest(
        configs=configs,
        model=model,
        prompt=prompt,
        prompt_file=prompt_file,
        synthetic_length=synthetic_length,
        haystack=haystack,
        default_prompt_tokens=DEFAULT_PROMPT_TOKENS,
        layers=layers,
        max_new_tokens=max_new_tokens,
        threads=resolve_threads(threads),
        backends=[b.strip() for b in (backend or "").split(",") if b.strip()],
        kernels=kernels or host.kernels_available(),
        memory_budget=memory.parse_size(memory_budget),
        shipped_baseline=shipped,
        device=device,
        tracker=tracker,
        key=key,
        weights=weight_format(weights, group_size),
        kv_dtype=kv_dtype,
    )
    header, results = host.run_on_host(request, log=_log)
    if as_json:
        typer.echo(json.dumps({**header, "results": [r.to_dict() for r in results]}, indent=2))
    else:
        from edgeattn.runtime.runner import format_table

        typer.echo(format_table(header, results))


def _log(msg: str) -> None:
    typer.echo(f"[edgeattn] {msg}", err=True)


# ------------------------------------------------- verbs built elsewhere


def _not_built(verb: str, issue: str) -> Callable[..., None]:
    def command() -> None:
        typer.echo(f"error: `edgeattn {verb}` is not built yet: it arrives with {issue}.", err=True)
        raise typer.Exit(NotBuiltYetError.exit_code)

    command.__doc__ = f"(not built yet: {issue})"
    return command


def _register_external(verb: str, module: str, attr: str, issue: str) -> None:
    """Register a verb implemented in another package, or its 'not built yet' stand-in.

    ``attr`` names a command function, or a ``typer.Typer`` whose subcommands
    become ``edgeattn VERB SUB`` (e.g. ``edgeattn devices list``).
    """
    if importlib.util.find_spec(module) is not None:
        mod = importlib.import_module(module)
        if hasattr(mod, attr):
            impl = getattr(mod, attr)
            if isinstance(impl, typer.Typer):
                app.add_typer(impl, name=verb)
            else:
                app.command(verb)(friendly_errors(impl))
            return
    app.command(verb)(_not_built(verb, issue))


_register_external("export", "edgeattn.export.cli", "export_command", "the ONNX export issue")
_register_external("calibrate", "edgeattn.calibrate_cli", "calibrate_command", "the adaptive chunking issue")
_register_external("compile", "edgeattn.runtime.compile_cli", "compile_command", "the whole-model TVM compile issue")
_register_external(
    "devices", "edgeattn.devices.cli", "devices_app", "the devices issue (RPC, tracker, Android, Pi, Jetson)"
)
_register_external("serve", "edgeattn.devices.cli", "serve_command", "the devices issue (device agent)")
_register_external("bench", "edgeattn.bench.cli", "bench_command", "the benchmark issue (DHSA vs dense vs peers)")
_register_external("eval", "edgeattn.evals.cli", "eval_app", "the accuracy evaluation issue")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
