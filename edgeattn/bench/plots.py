"""The four PNG plots of a bench report: prefill latency, prefill tok/s, decode tok/s, peak memory vs length.

matplotlib's Agg backend (no display needed).  Each file is drawn to a temp name in
the report's folder and renamed, like every other artifact.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

PLOTS = (
    ("prefill_latency.png", "prefill_s", "prefill latency (s)", "Prefill latency vs prompt length", True),
    ("prefill_tok_s.png", "tok_s", "prefill tokens/s", "Prefill throughput vs prompt length", False),
    ("decode_tok_s.png", "decode_tok_s", "decode tokens/s", "Greedy decode vs context length", False),
    ("peak_rss.png", "peak_rss_mib", "peak RSS of the process (MiB)", "Peak memory vs prompt length", False),
)


def _label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _series(rows: list[dict[str, Any]], key: str) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if "error" in r or r.get(key) is None:
            continue
        out.setdefault(r["row"], []).append((r["length"], float(r[key])))
    return {name: sorted(points) for name, points in out.items()}


def write_plots(report: dict[str, Any], out_dir: Path) -> list[str]:
    """Draw the plots of ``report`` into ``out_dir``; returns their file names (none without rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report.get("rows", [])
    machine = report.get("machine", {})
    settings = report.get("settings", {})
    subtitle = f"{settings.get('model')} | {machine.get('cpu')} | {settings.get('threads')} threads"
    written = []
    for name, key, ylabel, title, log_y in PLOTS:
        series = _series(rows, key)
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
        lengths = sorted({n for pts in series.values() for n, _ in pts})
        for row, pts in series.items():
            style = "-o" if not row.startswith(("llama", "transformers", "ort-")) else "--s"
            ax.plot([n for n, _ in pts], [v for _, v in pts], style, label=row, markersize=4)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [_label(n) for n in lengths])
        ax.minorticks_off()
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel("prompt / context length (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}\n{subtitle}", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        target = Path(out_dir) / name
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".png", dir=out_dir)
        os.close(fd)
        try:
            fig.savefig(tmp, format="png")
            os.replace(tmp, target)
        finally:
            plt.close(fig)
            Path(tmp).unlink(missing_ok=True)
        written.append(name)
    return written
