"""`edgeattn eval niah | passkey | fidelity | plot`: parses options and prints; the work is in this package."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from edgeattn.config import (
    DEFAULT_BUDGET,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_MAX_CHUNK,
    DEFAULT_MIN_CHUNK,
    DEFAULT_SINKS,
    parse_token_count,
    resolve_threads,
)
from edgeattn.errors import friendly_errors
from edgeattn.evals.modes import ALL_MODES, MODE_HELP

eval_app = typer.Typer(
    help=(
        "Accuracy of sparse attention against dense, on the real model: needle-in-a-haystack and passkey "
        "grids (length x depth per attention mode, JSON + PNG heatmaps) and fidelity curves (KL, top-1, "
        "perplexity, attention error and mass vs budget and vs prefill latency).  Grids resume: run the "
        "same command again and the finished cells are kept."
    ),
    no_args_is_help=True,
)

ModelOpt = Annotated[
    str | None, typer.Option("--model", help="A local HF directory or .gguf file (Gemma 2 / 3). Default: built-in.")
]
BudgetOpt = Annotated[int, typer.Option(help="N_b: most keys a query attends to, the same for every sparse mode.")]
ChunkOpt = Annotated[int, typer.Option(help="Fixed chunk / block length (dhsa, block-sparse, the windows' step).")]
SinksOpt = Annotated[int, typer.Option(help="Attention sinks (first tokens) for dhsa, block-sparse, sinks-window.")]
MinChunkOpt = Annotated[int, typer.Option(help="Shortest chunk of dhsa-shift / dhsa-predictor.")]
MaxChunkOpt = Annotated[int, typer.Option(help="Longest chunk of dhsa-shift / dhsa-predictor.")]
KernelsOpt = Annotated[
    str, typer.Option(help="tvm (our TIR kernels, every layer; the fastest host path) or reference (PyTorch).")
]
ThreadsOpt = Annotated[int | None, typer.Option(help="CPU threads (default: all cores).")]
FreshOpt = Annotated[bool, typer.Option("--fresh", help="Ignore the cells already in --json and start over.")]
SeedOpt = Annotated[int, typer.Option(help="Seed of the hidden numbers (recorded in the report).")]
ModesOpt = Annotated[str, typer.Option(help=f"Comma list of modes: {MODE_HELP}.")]
LengthsOpt = Annotated[str, typer.Option(help="Prompt lengths in tokens, 1K = 1024: e.g. 1K,2K,4K,8K,16K.")]
DepthsOpt = Annotated[
    str, typer.Option(help="Needle depths: fractions like 0,0.25,0.5,0.75,1, or a count N (N even depths).")
]


def _log(msg: str) -> None:
    typer.echo(f"[eval] {msg}", err=True)


def _retrieval(task: str, **kw: Any) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from edgeattn.evals import inputs, retrieval

    req = retrieval.RetrievalRequest(
        task=task,
        lengths=inputs.parse_lengths(kw.pop("lengths")),
        depths=inputs.parse_depths(kw.pop("depths")),
        mode_spec=kw.pop("modes"),
        threads=resolve_threads(kw.pop("threads")),
        **kw,
    )
    chosen, _, _ = retrieval.prepare(req)  # bad input: one error line before the model loads
    total = len(req.lengths) * len(req.depths) * len(chosen)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=False, console=None) as bar:
        job = bar.add_task(f"{task} grid", total=total)

        def on_cell(cell: dict[str, Any] | None) -> None:
            if cell is not None:
                verdict = "hit " if cell["hit"] else "miss"
                bar.console.log(
                    f"{cell['mode']:<15} {cell['length']:>6} tok depth {cell['depth']:<5} {verdict} "
                    f"{cell['answer']!r} (fact {cell['fact']}, prefill {cell['prefill_s']:.1f} s)"
                )
            bar.advance(job)

        report, stats = retrieval.run(req, on_cell=on_cell, log=_log)
    lengths = sorted({c["length"] for c in report.cells})
    typer.echo(retrieval.format_summary(report.extra["summary"], lengths))
    misses = retrieval.explain_misses(report)
    if misses:
        typer.echo("\nsparse misses where dense hit (the fact's chunk in each global layer's selection):")
        typer.echo("\n".join(misses))
    typer.echo(
        f"{stats.evaluated} cells evaluated, {stats.skipped} already in {req.json_path}; "
        f"heatmaps: {req.png_path or Path(req.json_path).with_suffix('.png')}"
    )


@eval_app.command("niah")
@friendly_errors
def niah(
    lengths: LengthsOpt = "1K,2K,4K,8K,16K",
    depths: DepthsOpt = "5",
    modes: ModesOpt = ALL_MODES,
    haystack: Annotated[
        Path | None, typer.Option(help="Folder of .txt files as the haystack (default: CPython's pydoc topics).")
    ] = None,
    budget: BudgetOpt = DEFAULT_BUDGET,
    chunk_size: ChunkOpt = DEFAULT_CHUNK_SIZE,
    sinks: SinksOpt = DEFAULT_SINKS,
    min_chunk: MinChunkOpt = DEFAULT_MIN_CHUNK,
    max_chunk: MaxChunkOpt = DEFAULT_MAX_CHUNK,
    seed: SeedOpt = 0,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens decoded for an answer.")] = 12,
    json_path: Annotated[Path, typer.Option("--json", help="The report; rerunning resumes it.")] = Path("niah.json"),
    png: Annotated[Path | None, typer.Option(help="Heatmaps (default: --json with .png).")] = None,
    fresh: FreshOpt = False,
    kernels: KernelsOpt = "tvm",
    threads: ThreadsOpt = None,
    model: ModelOpt = None,
) -> None:
    """Needle in a haystack: a 5-digit fact at each depth of real prose, asked for at the end.

    One grid of length x depth per attention mode; a cell is a hit when the first number of the
    greedy answer is the fact.  Every sparse cell also records, per global layer, whether the
    selection kept the fact's chunk (and its rank by score and by dense attention mass).

    Examples:

      edgeattn eval niah --lengths 1K,2K,4K --depths 3 --modes dense,dhsa,block-sparse

      edgeattn eval niah --haystack ../shared/data/PaulGrahamEssays --json pg.json
    """
    _retrieval("niah", lengths=lengths, depths=depths, modes=modes, haystack=haystack, budget=budget,
               chunk_size=chunk_size, sinks=sinks, min_chunk=min_chunk, max_chunk=max_chunk, seed=seed,
               max_new_tokens=max_new_tokens, json_path=json_path, png_path=png, fresh=fresh, kernels=kernels,
               threads=threads, model=model)  # fmt: skip


@eval_app.command("passkey")
@friendly_errors
def passkey(
    lengths: LengthsOpt = "1K,2K,4K,8K,16K",
    depths: DepthsOpt = "5",
    modes: ModesOpt = ALL_MODES,
    budget: BudgetOpt = DEFAULT_BUDGET,
    chunk_size: ChunkOpt = DEFAULT_CHUNK_SIZE,
    sinks: SinksOpt = DEFAULT_SINKS,
    min_chunk: MinChunkOpt = DEFAULT_MIN_CHUNK,
    max_chunk: MaxChunkOpt = DEFAULT_MAX_CHUNK,
    seed: SeedOpt = 0,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens decoded for an answer.")] = 12,
    json_path: Annotated[Path, typer.Option("--json", help="The report; rerunning resumes it.")] = Path("passkey.json"),
    png: Annotated[Path | None, typer.Option(help="Heatmaps (default: --json with .png).")] = None,
    fresh: FreshOpt = False,
    kernels: KernelsOpt = "tvm",
    threads: ThreadsOpt = None,
    model: ModelOpt = None,
) -> None:
    """Passkey retrieval: a 5-digit key hidden in repeated filler sentences, asked for at the end.

    Same grid, scoring and report as `eval niah`.

    Example:

      edgeattn eval passkey --lengths 1K,4K,16K --modes dense,dhsa,window,sinks-window
    """
    _retrieval("passkey", lengths=lengths, depths=depths, modes=modes, haystack=None, budget=budget,
               chunk_size=chunk_size, sinks=sinks, min_chunk=min_chunk, max_chunk=max_chunk, seed=seed,
               max_new_tokens=max_new_tokens, json_path=json_path, png_path=png, fresh=fresh, kernels=kernels,
               threads=threads, model=model)  # fmt: skip


@eval_app.command("fidelity")
@friendly_errors
def fidelity(
    length: Annotated[int, typer.Option(help="Prompt tokens of real prose.")] = 4096,
    budgets: Annotated[str, typer.Option(help="Budgets N_b to sweep, e.g. 256,512,1024,2048.")] = "256,512,1024,2048",
    modes: ModesOpt = "dhsa,dhsa-shift,dhsa-predictor,block-sparse,window,sinks-window",
    scored: Annotated[
        int, typer.Option(help="Last positions whose next-token distributions are compared (KL, top-1, perplexity).")
    ] = 512,
    haystack: Annotated[
        Path | None, typer.Option(help="Folder of .txt files as the text (default: CPython's pydoc topics).")
    ] = None,
    chunk_size: ChunkOpt = DEFAULT_CHUNK_SIZE,
    sinks: SinksOpt = DEFAULT_SINKS,
    min_chunk: MinChunkOpt = DEFAULT_MIN_CHUNK,
    max_chunk: MaxChunkOpt = DEFAULT_MAX_CHUNK,
    json_path: Annotated[Path, typer.Option("--json", help="The report; rerunning resumes it.")] = Path(
        "fidelity.json"
    ),
    png: Annotated[Path | None, typer.Option(help="Curves (default: --json with .png).")] = None,
    fresh: FreshOpt = False,
    kernels: KernelsOpt = "tvm",
    threads: ThreadsOpt = None,
    model: ModelOpt = None,
) -> None:
    """Fidelity to dense vs budget: per-layer attention error and mass kept, end-to-end KL, top-1, perplexity.

    Per global layer on the dense model's own q/k/v: relative error of the attention output and
    the dense attention mass the selection keeps.  End to end (every global layer sparse): KL of
    the next-token distributions vs dense, top-1 agreement and perplexity over the last --scored
    positions, and the measured prefill latency.  Curves: each metric vs budget, accuracy vs latency.

    Example:

      edgeattn eval fidelity --length 4096 --budgets 256,512,1024,2048 --modes dhsa,block-sparse,window
    """
    from rich.progress import Progress

    from edgeattn.evals import fidelity as fid
    from edgeattn.evals import inputs

    req = fid.FidelityRequest(
        json_path=json_path, png_path=png, length=parse_token_count(str(length), "--length"),
        budgets=inputs.parse_budgets(budgets), mode_spec=modes, scored=scored, model=model, chunk_size=chunk_size,
        sinks=sinks, min_chunk=min_chunk, max_chunk=max_chunk, haystack=haystack, kernels=kernels,
        threads=resolve_threads(threads), fresh=fresh,
    )  # fmt: skip
    chosen, _, _ = fid.prepare(req)
    with Progress() as bar:
        job = bar.add_task("fidelity cells", total=len(chosen))

        def on_cell(cell: dict[str, Any] | None) -> None:
            if cell is not None:
                bar.console.log(
                    f"{cell['mode']:<15} budget {cell['budget']:>6}: KL {cell['kl']:.4f}, top-1 {cell['top1']:.3f}, "
                    f"ppl {cell['perplexity']:.3f}, prefill {cell['prefill_s']:.1f} s"
                )
            bar.advance(job)

        report, evaluated = fid.run(req, on_cell=on_cell, log=_log)
    typer.echo(fid.format_table(report))
    typer.echo(f"{evaluated} cells evaluated; curves: {png or Path(json_path).with_suffix('.png')}")


@eval_app.command("plot")
@friendly_errors
def plot(
    report: Annotated[Path, typer.Argument(help="A JSON report of `eval niah`, `eval passkey` or `eval fidelity`.")],
    png: Annotated[Path | None, typer.Option(help="Where to draw it (default: the report with .png).")] = None,
) -> None:
    """Redraw the PNG of a report (e.g. of an interrupted grid)."""
    from edgeattn.evals import plots

    if not report.is_file():
        raise FileNotFoundError(f"{report}: no such report; pass the --json file of an eval run")
    try:
        data = json.loads(report.read_text())
        task = data["task"]
    except (ValueError, KeyError, TypeError):
        raise FileNotFoundError(f"{report} is not an eval report; pass the --json file of an eval run") from None
    out = png or report.with_suffix(".png")
    if task == "fidelity":
        plots.fidelity_curves(data, out)
    else:
        plots.retrieval_heatmaps(data, out)
    typer.echo(f"wrote {out}")
