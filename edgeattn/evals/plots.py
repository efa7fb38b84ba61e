"""PNG figures of eval reports (matplotlib, headless): retrieval heatmaps and fidelity curves.

Drawn from the JSON report alone, so `edgeattn eval plot REPORT.json` redraws an interrupted or
resumed run.  Files are written beside a temporary name and renamed, like every other artifact.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any


def _figure_module() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100)  # no bbox_inches="tight": its extra layout pass costs seconds per figure
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        _figure_module().close(fig)
    return path


def _k(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def retrieval_heatmaps(report: dict[str, Any], path: Path) -> Path:
    """One length x depth heatmap per mode, side by side (green: exact answer, red: miss, grey: not run)."""
    import numpy as np

    plt = _figure_module()
    cells = report["cells"]
    modes = list(dict.fromkeys([*report.get("modes", {}), *(c["mode"] for c in cells)]))
    modes = [m for m in modes if any(c["mode"] == m for c in cells)]
    lengths = sorted({c["length"] for c in cells})
    depths = sorted({c["depth"] for c in cells})
    height = 0.45 * len(lengths) + 2.6
    fig, axes = plt.subplots(
        1, max(1, len(modes)), figsize=(2.2 * max(1, len(modes)) + 1, height), squeeze=False, sharey=True
    )
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad="#d0d0d0")
    for ax, mode in zip(axes[0], modes, strict=False):
        grid = np.full((len(lengths), len(depths)), np.nan)
        for c in cells:
            if c["mode"] == mode:
                grid[lengths.index(c["length"]), depths.index(c["depth"])] = 1.0 if c["hit"] else 0.0
        ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=1, aspect="auto", origin="lower")
        done = ~np.isnan(grid)
        acc = 100 * np.nansum(grid) / done.sum() if done.any() else float("nan")
        ax.set_title(f"{mode}\n{acc:.0f} %", fontsize=9)
        ax.set_xticks(range(len(depths)), [f"{100 * d:.0f}" for d in depths], fontsize=7)
        ax.set_yticks(range(len(lengths)), [_k(n) for n in lengths], fontsize=7)
        ax.set_xlabel("depth %", fontsize=8)
    axes[0][0].set_ylabel("prompt tokens", fontsize=8)
    s = report.get("settings", {})
    fig.suptitle(
        f"{report.get('task', '')}: {s.get('model', '')}, budget {s.get('budget')}, chunk {s.get('chunk_size')}, "
        f"kernels {s.get('kernels')}, seed {s.get('seed')}",
        fontsize=9,
    )
    fig.subplots_adjust(top=1 - 1.0 / height, bottom=0.8 / height, wspace=0.15)
    return _save(fig, path)


FIDELITY_PANELS = (
    ("kl", "KL(dense || mode), nats/token", False),
    ("top1", "top-1 agreement with dense", False),
    ("perplexity", "perplexity", False),
    ("rel_error", "attention output rel. error (mean of layers)", False),
    ("mass", "dense attention mass kept (mean of layers)", False),
)


def fidelity_curves(report: dict[str, Any], path: Path) -> Path:
    """Each metric against the budget, and top-1 agreement / KL against the measured prefill latency."""
    plt = _figure_module()
    cells = [c for c in report["cells"] if c["mode"] != "dense"]
    dense = next((c for c in report["cells"] if c["mode"] == "dense"), None)
    modes = list(dict.fromkeys(c["mode"] for c in cells))
    fig, axes = plt.subplots(2, 4, figsize=(17, 7.5))
    flat = list(axes.flat)
    for ax, (key, label, _) in zip(flat[:5], FIDELITY_PANELS, strict=False):
        for m in modes:
            pts = sorted((c["budget"], c[key]) for c in cells if c["mode"] == m and c.get(key) is not None)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=m)
        if key == "perplexity" and dense is not None:
            ax.axhline(dense["perplexity"], color="black", ls="--", lw=1, label="dense")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("budget N_b (tokens)")
        ax.set_title(label, fontsize=9)
    for ax, key in ((flat[5], "top1"), (flat[6], "kl")):
        for m in modes:
            pts = sorted((c["prefill_s"], c[key]) for c in cells if c["mode"] == m and c.get("prefill_s"))
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=m)
        if dense is not None and dense.get("prefill_s"):
            ax.axvline(dense["prefill_s"], color="black", ls="--", lw=1, label="dense prefill")
        ax.set_xlabel("measured prefill latency (s)")
        ax.set_title(f"{'top-1 agreement' if key == 'top1' else 'KL vs dense'} vs prefill latency", fontsize=9)
    flat[7].axis("off")
    handles, labels = flat[0].get_legend_handles_labels()
    flat[7].legend(handles, labels, loc="center")
    s = report.get("settings", {})
    fig.suptitle(
        f"fidelity: {s.get('model', '')}, {s.get('length')} tokens of {s.get('haystack')}, "
        f"chunk {s.get('chunk_size')}, kernels {s.get('kernels')}",
        fontsize=10,
    )
    fig.subplots_adjust(hspace=0.35, wspace=0.3)
    return _save(fig, path)
