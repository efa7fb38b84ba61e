"""The `edgeattn bench` verb: parses options, prints progress and the report; ``sweep`` does the work."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Any

import typer

from edgeattn.config import DEFAULT_BUDGET, DEFAULT_CHUNK_SIZE, DEFAULT_LAYERS, ConfigError, resolve_threads

DEFAULT_PEERS = "transformers,ort-onnx,ort-gqa,llama.cpp,llama.cpp-fa"


def bench_command(
    targets: Annotated[
        list[str] | None,
        typer.Argument(
            help="MODEL (a local HF directory or .gguf file; default: the built-in Gemma 3 270M), "
            "or with --report the bench JSON files to render.",
            show_default=False,
        ),
    ] = None,
    report: Annotated[
        bool, typer.Option("--report", help="Render the given bench JSON file(s) as Markdown; measure nothing.")
    ] = False,
    lengths: Annotated[str, typer.Option(help="Prompt lengths to sweep (K = 1024 tokens).")] = "1K,4K,8K,16K,32K",
    backends: Annotated[
        str, typer.Option(help="edgeattn backends for the dense and DHSA rows: comma list of torch, ort, tvm.")
    ] = "torch,ort",
    attention: Annotated[str, typer.Option(help="Our rows' attention: dense, dhsa, block-sparse.")] = "dense,dhsa",
    peers: Annotated[
        str,
        typer.Option(
            help="Peer rows: transformers (as shipped), ort-onnx (ONNX Runtime on our dense export), ort-gqa "
            "(its GroupQueryAttention export), llama.cpp (its defaults), llama.cpp-fa (flash attention on); "
            "'none' for none."
        ),
    ] = DEFAULT_PEERS,
    device: Annotated[
        str,
        typer.Option(help="host (this machine), or a device profile: tvm rows run there over RPC, peers are skipped."),
    ] = "host",
    threads: Annotated[int | None, typer.Option(help="CPU threads of every row (default: all cores).")] = None,
    repeats: Annotated[int, typer.Option(help="Timed repeats per row (median and spread are reported).")] = 1,
    new_tokens: Annotated[int, typer.Option(help="Greedy tokens decoded after each prefill (decode tok/s).")] = 16,
    budget: Annotated[int, typer.Option(help="DHSA budget N_b.")] = DEFAULT_BUDGET,
    chunk_size: Annotated[int, typer.Option(help="DHSA chunk length.")] = DEFAULT_CHUNK_SIZE,
    layers: Annotated[str, typer.Option(help="Layers with DHSA: global, all, or 5,11.")] = DEFAULT_LAYERS,
    gguf: Annotated[
        Path | None, typer.Option(help="GGUF file for llama.cpp (default: the file MODEL comes from).")
    ] = None,
    out: Annotated[Path, typer.Option(help="Folder for bench.json and the PNG plots.")] = Path("bench-out"),
    fresh: Annotated[
        bool, typer.Option("--fresh", help="Start over instead of resuming the finished rows in --out.")
    ] = False,
) -> None:
    """Sweep prompt length x attention: edgeattn dense and DHSA beside llama.cpp, ONNX Runtime and transformers.

    Every row runs in its own process on the same model, prompt, thread count and machine, and records
    warm-up, repeats, median and spread, threads, backend, weight format and CPU model; peak memory is the
    whole process's peak RSS.  Finished rows are saved at once in OUT/bench.json: run the same command
    again to resume an interrupted sweep.  The plots go next to it.

    Examples:

      edgeattn bench --lengths 1K,4K,16K --threads 2 --backends torch --out runs/today

      edgeattn bench --report runs/today/bench.json > RESULTS.md

      edgeattn bench ./my-gemma2-dir --peers transformers --lengths 2K
    """
    from edgeattn.bench import report as report_mod

    paths = list(targets or [])
    if report:
        typer.echo(report_mod.render([Path(p) for p in paths]))
        return
    if len(paths) > 1:
        raise ConfigError(f"bench takes one MODEL, got {len(paths)}: {' '.join(paths)} (use --report to render files)")
    from edgeattn.bench import rows, sweep

    request = sweep.BenchRequest(
        rows=rows.select_rows(backends, attention, peers),
        lengths=rows.parse_lengths(lengths),
        out=out,
        model=paths[0] if paths else None,
        threads=resolve_threads(threads),
        repeats=repeats,
        new_tokens=new_tokens,
        budget=budget,
        chunk_size=chunk_size,
        layers=layers,
        device=device,
        gguf=gguf,
        fresh=fresh,
        command=shlex.join(
            ["edgeattn", "bench", *paths, "--lengths", lengths, "--backends", backends, "--attention", attention]
            + ["--peers", peers, "--device", device, "--threads", str(resolve_threads(threads))]
            + ["--repeats", str(repeats), "--new-tokens", str(new_tokens), "--budget", str(budget)]
            + ["--chunk-size", str(chunk_size), "--layers", layers, "--out", str(out)]
            + (["--gguf", str(gguf)] if gguf else [])
        ),
    )
    plan = sweep.plan_sweep(request)
    for sk in plan.skipped:
        typer.echo(f"[bench] skipping {sk['row']}: {sk['reason']}", err=True)
    if plan.done:
        typer.echo(f"[bench] resuming {plan.report_path}: {plan.done} finished row(s) kept", err=True)
    _run_with_progress(plan)
    typer.echo(report_mod.render_one(plan.report, plan.report_path))


def _run_with_progress(plan: Any) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from edgeattn.bench import sweep

    console = Console(stderr=True)
    with Progress(
        TextColumn("[bold]bench[/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("", total=len(plan.jobs) + plan.done, completed=plan.done)

        def start(job: Any) -> None:
            bar.update(task, description=f"{job.row.name} @ {job.prompt_tokens} tokens")

        def done(job: Any, rec: dict[str, Any]) -> None:
            if "error" in rec:
                bar.console.log(f"{job.row.name} @ {job.length}: failed: {rec['error']}")
            else:
                bar.console.log(
                    f"{job.row.name} @ {job.length}: prefill {rec['prefill_s']:.2f} s ({rec['tok_s']:,.0f} tok/s), "
                    f"decode {rec['decode_tok_s'] or 0:.1f} tok/s, peak RSS {rec['peak_rss_mib']:,.0f} MiB"
                )
            bar.advance(task)

        sweep.run_sweep(plan, on_start=start, on_done=done)
