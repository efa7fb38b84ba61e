"""Small helpers shared by the benchmark scripts: CPU model, threads, tables, JSON."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edgeattn.atomic import write_text
from edgeattn.runtime.measure import cpu_model  # noqa: F401  (re-exported for the scripts)
from edgeattn.runtime.threads import set_threads  # noqa: F401  (re-exported for the scripts)


def header(title: str, threads: int) -> str:
    return f"{title}\nCPU: {cpu_model()} | threads: {threads} | logical CPUs: {os.cpu_count()}"


def time_it(fn: Callable[[], Any], repeats: int = 1, warmup: int = 0) -> list[float]:
    """Wall times (s) of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def interleaved_ratios(
    ours: Callable[[], Any], baseline: Callable[[], Any], pairs: int, times: dict[str, list[float]] | None = None
) -> list[float]:
    """baseline time / our time for ``pairs`` back-to-back pairs, alternating which runs first.

    Why: on a shared machine the load drifts over seconds; a pair sees (nearly) the same load,
    so the spread of the per-pair ratios says whether a difference is real.  ``times``, when
    given, collects each call's wall time under "ours" and "base".
    """
    ratios = []
    for i in range(pairs):
        pair = {}
        for name, fn in (("ours", ours), ("base", baseline))[:: 1 if i % 2 == 0 else -1]:
            time.sleep(0.2)
            t0 = time.perf_counter()
            fn()
            pair[name] = time.perf_counter() - t0
        ratios.append(pair["base"] / pair["ours"])
        if times is not None:
            for name, t in pair.items():
                times.setdefault(name, []).append(t)
    return ratios


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if x != x:  # NaN
            return "-"
        if abs(x) >= 1000 or (abs(x) < 10 ** (-digits) and x != 0):
            return f"{x:.{digits - 1}e}"
        return f"{x:.{digits}g}" if abs(x) < 1 else f"{x:.{max(1, digits - len(str(int(abs(x)))))}f}".rstrip(".")
    return str(x)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """Markdown table of ``rows``; ``columns`` = (key, heading) pairs."""
    cells = [[fmt(r.get(k)) for k, _ in columns] for r in rows]
    heads = [h for _, h in columns]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(heads)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    return "\n".join([line, sep, *body])


def write_json(path: str | Path, records: list[dict[str, Any]], meta: dict[str, Any] | None = None) -> None:
    """``{"meta": {...}, "records": [...]}``, written to a temp file and renamed (never half-written)."""
    doc = {"meta": {"cpu": cpu_model(), **(meta or {})}, "records": records}
    write_text(path, json.dumps(doc, indent=1))
