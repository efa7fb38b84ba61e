"""`edgeattn calibrate`: the verb only; the training lives in :mod:`edgeattn.calibrate`.

Kept apart so that starting the CLI does not import torch (every verb and `--help` would pay for it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer


def calibrate_command(
    model: Annotated[
        str | None,
        _arg("MODEL: the built-in gemma3-270m when left out, or a local HF model directory / .gguf file."),
    ] = None,
    out: Annotated[
        Path | None,
        _opt(
            "Where to write the predictor (.safetensors; a folder gets boundary_predictor.safetensors). "
            "Put it next to the model's export so `--chunking predictor` finds it. Default: the edgeattn "
            "cache, where `edgeattn run --chunking predictor` looks for this model."
        ),
    ] = None,
    text_path: Annotated[
        Path | None,
        _opt(
            "Calibration text: a .txt file or a folder of .txt files. Default: CPython's own pydoc_data "
            "prose (~113K tokens, in every Python install, no download).",
            "--text",
        ),
    ] = None,
    seq_len: Annotated[int, _opt("Tokens per calibration sequence.")] = 1024,
    sequences_n: Annotated[
        int, _opt("How many sequences (split 70/15/15 into train/validation/test).", "--sequences")
    ] = 16,
    epochs: Annotated[int, _opt("Passes over the training sequences.")] = 15,
    seed: Annotated[int, _opt("Random seed: same seed, text and thread count give the same weights.")] = 0,
    threads: Annotated[int | None, _opt("CPU threads, as in every verb (default: all cores).")] = None,
    threshold_rule: Annotated[
        str,
        _opt(
            "How the decision threshold is picked on the validation split. 'shift': cut as many chunks as "
            "the training-free shift rule (same granularity and selection cost, the network decides where); "
            "'labels': as many as the labels give; 'f1': the F1-optimal threshold (fewer, longer chunks, "
            "less attention mass kept at a budget).",
            "--threshold",
        ),
    ] = "shift",
) -> None:
    """Train the adaptive-chunking boundary predictor for MODEL on real text (CPU, a few minutes).

    DHSA cuts the sequence into variable-length chunks where the content
    shifts. This command runs MODEL over real text, captures the keys of its
    global-attention layers, labels each position from shifts in the
    similarity of those keys (no human labels), and trains a small network
    (~40K parameters) that predicts those boundaries from a window of keys on
    each side. It prints the held-out F1 and saves the predictor with a card
    (.json) holding recipe, data and scores.

    Then use it:  edgeattn run --chunking predictor [MODEL]

    The built-in gemma3-270m already ships with a predictor trained by this
    command with its defaults; --chunking shift needs no training at all.
    """
    from edgeattn.calibrate import calibrate  # torch: imported when the verb runs, not at `edgeattn --help`

    path, card = calibrate(
        model, out, text_path, seq_len, sequences_n, epochs, seed, threads, threshold_rule=threshold_rule
    )
    f1 = card["f1"]["test"]
    print(
        f"held-out boundary F1 {f1['f1']:.3f} (precision {f1['precision']:.3f}, recall {f1['recall']:.3f}; "
        f"within 2 tokens: {card['f1']['test_within_2_tokens']['f1']:.3f})"
    )
    print(f"predictor saved to {path} (card: {path.with_suffix('.json')})")
    print(f"use it: edgeattn run --chunking predictor {model or ''}".rstrip())


def _arg(help_text: str) -> Any:
    return typer.Argument(help=help_text, show_default=False)


def _opt(help_text: str, *names: str) -> Any:
    return typer.Option(*names, help=help_text)
