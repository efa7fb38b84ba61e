"""The `edgeattn` command line: a thin shell over the packages.

Verbs follow the product's flow (export -> compile -> run/bench/eval on a
device).  A verb whose machinery is not built yet says so and exits non-zero;
none pretends to work.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from edgeattn.config import (
    ATTENTION_KINDS,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_SINKS,
    AttentionConfig,
    ConfigError,
)
from edgeattn.errors import EdgeAttnError, NotBuiltYetError

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


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn errors a user can act on into one 'error:' line and a non-zero exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except EdgeAttnError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(err.exit_code) from None
        except (ConfigError, FileNotFoundError, NotImplementedError) as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None

    return wrapper


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
    model: ModelArg = None,
    prompt: Annotated[str | None, typer.Option(help="Prompt text.")] = None,
    prompt_file: Annotated[Path | None, typer.Option(help="Read the prompt from this text file.")] = None,
    synthetic_length: Annotated[
        int | None,
        typer.Option(help="Use N tokens of real offline prose (pydoc topics, or --haystack) as the prompt."),
    ] = None,
    haystack: Annotated[
        Path | None, typer.Option(help="Folder of .txt files used as the text for --synthetic-length.")
    ] = None,
    attention: Annotated[
        str, typer.Option(help="Comma list of dense, dhsa, block-sparse: each runs on the same prompt, side by side.")
    ] = "dense,dhsa",
    budget: Annotated[
        int, typer.Option(help="N_b: most keys a query attends to (own chunk and sinks included).")
    ] = 512,
    chunk_size: Annotated[int, typer.Option(help="Fixed chunk / block length in tokens.")] = DEFAULT_CHUNK_SIZE,
    sinks: Annotated[int, typer.Option(help="First tokens every query keeps (attention sinks).")] = DEFAULT_SINKS,
    chunking: Annotated[str, typer.Option(help="Boundary source for DHSA: fixed, shift or predictor.")] = "fixed",
    min_chunk: Annotated[int, typer.Option(help="Shortest chunk the shift/predictor sources may cut.")] = 8,
    max_chunk: Annotated[int, typer.Option(help="Longest chunk the shift/predictor sources may cut.")] = 64,
    layers: Annotated[
        str, typer.Option(help="Layers that get sparse attention: global (full-attention layers), all, or 5,11.")
    ] = "global",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate greedily after the prompt.")] = 32,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: all cores).")] = None,
    device: Annotated[str, typer.Option(help="Where to run: host (this machine).")] = "host",
    backend: Annotated[
        str, typer.Option(help="torch (PyTorch reference); tvm arrives with the runtime issue.")
    ] = "torch",
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Prefill a prompt and generate, with dense and sparse attention side by side.

    Prints prefill latency, tokens/s, peak RSS and the greedy continuation for
    each attention kind.  Without a prompt option, 2048 tokens of real prose are used.

    Examples:

      edgeattn run                                   # built-in Gemma 3 270M, 2K tokens, dense vs DHSA

      edgeattn run --synthetic-length 8192 --budget 1024 --attention dense,dhsa,block-sparse

      edgeattn run ./my-gemma2-dir --prompt-file notes.txt --json
    """
    if device != "host":
        raise NotBuiltYetError(
            f"--device {device}: running on a remote device (RPC, Android, emulated arm64) is not built yet; "
            "it arrives with the device-connection issue. Use --device host."
        )
    if backend != "torch":
        raise NotBuiltYetError(f"--backend {backend}: the compiled TVM runtime is not built yet; use --backend torch.")
    kinds = parse_kinds(attention)
    configs = [
        AttentionConfig(
            kind=k,  # type: ignore[arg-type]
            budget=budget,
            chunk_size=chunk_size,
            sinks=sinks,
            chunking=chunking,  # type: ignore[arg-type]
            min_chunk=min_chunk,
            max_chunk=max_chunk,
        )
        for k in kinds
    ]
    import torch

    from edgeattn import models
    from edgeattn.runtime.torch_backend import run_one, warm_up

    torch.set_num_threads(threads or os.cpu_count() or 1)
    loaded = models.load(model)
    ids = _prompt_ids(loaded, prompt, prompt_file, synthetic_length, haystack)
    warm_up(loaded)
    results = []
    for cfg in configs:
        _log(f"{cfg.kind}: prefill of {len(ids)} tokens ...")
        boundary_fn = _boundary_fn(cfg, loaded)
        results.append(run_one(loaded, ids, cfg, layers=layers, max_new_tokens=max_new_tokens, boundary_fn=boundary_fn))
    header = {
        "model": loaded.name,
        "cpu": _cpu(),
        "threads": torch.get_num_threads(),
        "budget": budget,
        "chunk_size": chunk_size,
        "chunking": chunking,
    }
    if as_json:
        typer.echo(json.dumps({**header, "results": [r.to_dict() for r in results]}, indent=2))
    else:
        typer.echo(_run_table(header, results))


def _log(msg: str) -> None:
    typer.echo(f"[edgeattn] {msg}", err=True)


def _cpu() -> str:
    from edgeattn.runtime.measure import cpu_model

    return cpu_model()


def _boundary_fn(cfg: AttentionConfig, loaded: Any) -> Any:
    if cfg.kind != "dhsa" or cfg.chunking == "fixed":
        return None
    if importlib.util.find_spec("edgeattn.chunking") is None:
        raise NotBuiltYetError(f"--chunking {cfg.chunking} is not built yet; use --chunking fixed.")
    from edgeattn import chunking

    return chunking.boundary_fn_for(cfg, loaded)


def _prompt_ids(
    loaded: Any, prompt: str | None, prompt_file: Path | None, synthetic: int | None, haystack: Path | None
) -> list[int]:
    from edgeattn import text

    given = [x is not None for x in (prompt, prompt_file, synthetic)]
    if sum(given) > 1:
        raise ConfigError("give only one of --prompt, --prompt-file, --synthetic-length")
    tok = loaded.tokenizer
    if tok is None:
        raise ConfigError(f"{loaded.path} has no tokenizer files; add tokenizer.json (or use the built-in model)")
    if prompt_file is not None:
        if not prompt_file.is_file():
            raise FileNotFoundError(f"--prompt-file {prompt_file}: no such file")
        prompt = prompt_file.read_text(errors="replace")
    if prompt is not None:
        ids = tok(prompt).input_ids
        if not ids:
            raise ConfigError("the prompt is empty")
        return ids
    source = text.haystack_dir(haystack) if haystack is not None else None
    return text.token_ids(tok, synthetic or 2048, source)


def _run_table(header: dict[str, Any], results: list[Any]) -> str:
    lines = [
        f"model {header['model']} | CPU {header['cpu']} | {header['threads']} threads | "
        f"budget {header['budget']} | chunk {header['chunk_size']} ({header['chunking']})",
        "",
        f"{'attention':<13}{'tokens':>8}{'prefill s':>11}{'tok/s':>9}{'vs dense':>10}{'peak RSS MiB':>14}"
        f"{'decode tok/s':>14}",
    ]
    dense = next((r for r in results if r.attention == "dense"), None)
    for r in results:
        ratio = f"{dense.prefill_s / r.prefill_s:.2f}x" if dense else "-"
        decode = f"{r.decode_tok_s:.1f}" if r.decode_tok_s else "-"
        lines.append(
            f"{r.attention:<13}{r.prompt_tokens:>8}{r.prefill_s:>11.2f}{r.prefill_tok_s:>9.0f}{ratio:>10}"
            f"{r.peak_rss_mib:>14.0f}{decode:>14}"
        )
    lines.append("")
    for r in results:
        lines.append(f"[{r.attention}] {r.continuation!r}")
    return "\n".join(lines)


# ------------------------------------------------- verbs built elsewhere


def _not_built(verb: str, issue: str) -> Callable[..., None]:
    def command() -> None:
        typer.echo(f"error: `edgeattn {verb}` is not built yet: it arrives with {issue}.", err=True)
        raise typer.Exit(NotBuiltYetError.exit_code)

    command.__doc__ = f"(not built yet: {issue})"
    return command


def _register_external(verb: str, module: str, attr: str, issue: str) -> None:
    """Register a verb implemented in another package, or its 'not built yet' stand-in."""
    if importlib.util.find_spec(module) is not None:
        mod = importlib.import_module(module)
        if hasattr(mod, attr):
            app.command(verb)(friendly_errors(getattr(mod, attr)))
            return
    app.command(verb)(_not_built(verb, issue))


_register_external("export", "edgeattn.export.cli", "export_command", "the ONNX export issue")
_register_external("calibrate", "edgeattn.calibrate", "calibrate_command", "the adaptive chunking issue")
app.command("compile")(_not_built("compile", "the whole-model TVM runtime issue"))
app.command("bench")(_not_built("bench", "the benchmark issue (DHSA vs dense vs llama.cpp on a device)"))
app.command("eval")(_not_built("eval", "the accuracy evaluation issue (needle-in-a-haystack, LongBench-style)"))
app.command("devices")(_not_built("devices", "the device-connection issue (RPC, tracker, Android, emulated arm64)"))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
