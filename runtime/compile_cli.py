"""``edgeattn compile``: the Typer command (registered by ``edgeattn/cli.py``); the work is in :mod:`.tvm_compile`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from edgeattn.errors import EdgeAttnError

HELP = """Compile an exported model (edgeattn export) with TVM into an artifact folder for one device.

Every attention layer runs on edgeattn's TIR kernels: DHSA layers (the ai.edgeattn
nodes) on the chunk selection + sparse flash attention kernels, dense and sliding
layers on the dense flash kernel (no L x L score tensor). On CPUs the projections and
the MLP run as packed-weight, register-tiled GEMMs and the other ops get parallel,
vectorized schedules; GPU profiles use TVM's DLight rules. The sequence axis stays
dynamic: one artifact serves prefill of any length up to --max-context, and decode.

The folder (model.so, params.bin, manifest.json with sha256 of every file, the TVM
version, the target, and the memory Relax planned statically) is written atomically
and named by a key of its inputs: compiling the same file for the same device again
returns it at once. It runs with TVM's runtime library alone
(TVM_USE_RUNTIME_LIB=1): `edgeattn run --backend tvm --artifact FOLDER`.

Devices (kernels_tvm/targets.py): x86-host (this CPU), arm64, arm-a76 (Pi 5),
arm-a78ae (Orin CPU), opencl-mali, opencl-adreno, cuda-sm72/80/87/90. aarch64
libraries are cross-linked with aarch64-linux-gnu-gcc.

Examples:

  edgeattn export -o g3-dhsa.onnx && edgeattn compile g3-dhsa.onnx

  edgeattn compile g3-dhsa.onnx --device arm-a76 --max-context 4096 -o pi5-artifact
"""


def compile_command(
    onnx_file: Annotated[Path, typer.Argument(help="The .onnx file `edgeattn export` wrote (its manifest beside it).")],
    device: Annotated[
        str, typer.Option("--device", "-d", help="Target profile (see above), e.g. x86-host, arm64, opencl-mali.")
    ] = "x86-host",
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="Artifact folder. Default: NAME.tvm-DEVICE-KEY beside the .onnx file."),
    ] = None,
    max_context: Annotated[
        int,
        typer.Option(help="Longest cache + prompt the artifact serves; Relax plans activation memory for it."),
    ] = 8192,
    force: Annotated[
        bool, typer.Option("--force", help="Compile again even when an up-to-date folder exists.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the artifact's manifest summary as JSON.")] = False,
) -> None:
    """Compile an edgeattn ONNX export with TVM into an artifact folder for one device."""
    from edgeattn.runtime.tvm_compile import compile_artifact

    try:
        if quiet:
            result = compile_artifact(onnx_file, device, out_dir=output, max_context=max_context, force=force)
        else:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            with Progress(
                TextColumn("[bold]compile[/bold]"),
                BarColumn(),
                TextColumn("{task.percentage:>3.0f}%"),
                TimeElapsedColumn(),
                TextColumn("{task.description}"),
                transient=True,
            ) as bar:
                task = bar.add_task("starting", total=1.0)

                def progress(msg: str, frac: float) -> None:
                    bar.update(task, completed=frac, description=msg)

                result = compile_artifact(
                    onnx_file, device, out_dir=output, max_context=max_context, force=force, progress=progress
                )
    except EdgeAttnError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(getattr(err, "exit_code", 2)) from None
    man = result.manifest
    mem = man["memory"]
    summary = {
        "artifact": str(result.path),
        "cached": result.cached,
        "seconds": round(result.seconds, 2),
        "device": man["target"]["profile"],
        "tvm": man["tvm"],
        "weights_mib": round(mem["weights_bytes"] / 2**20, 1),
        "planned_activations_mib": round(mem["planned_activation_bytes"] / 2**20, 1),
        "max_context": man["max_context"],
    }
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    state = "up to date" if result.cached else f"compiled in {result.seconds:.1f} s"
    typer.echo(
        f"{result.path}: {state} for {summary['device']} (TVM {summary['tvm']}); weights "
        f"{summary['weights_mib']} MiB, activations planned {summary['planned_activations_mib']} MiB "
        f"at {summary['max_context']} tokens"
    )


compile_command.__doc__ = HELP
