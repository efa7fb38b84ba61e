"""A resumable grid of eval cells, kept in one JSON report that is rewritten (atomically) after every cell.

Why: a 16K NIAH grid over seven modes takes hours on a 2-core board; an interrupted run must lose
nothing.  The report holds the settings that decide what a cell means (model, task, budget, chunk,
seed, haystack, kernels ...) and the finished cells.  Running again with the same settings skips
the finished cells and adds the missing ones (so a grid can also be extended with more lengths,
depths or modes); different settings are refused instead of mixing two experiments in one file.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from edgeattn.atomic import write_text
from edgeattn.config import ConfigError


class GridReport:
    """The cells of one eval, keyed by ``key_fields``, persisted to ``path`` after each :meth:`add`."""

    def __init__(
        self,
        path: Path,
        task: str,
        settings: dict[str, Any],
        key_fields: tuple[str, ...],
        run_info: dict[str, Any],
        fresh: bool = False,
    ) -> None:
        self.path = Path(path)
        self.task = task
        self.settings = json.loads(json.dumps(settings))  # as it will read back from the file
        self.key_fields = key_fields
        self.cells: list[dict[str, Any]] = []
        self.runs: list[dict[str, Any]] = []
        self.extra: dict[str, Any] = {}
        if self.path.exists() and not fresh:
            self._resume()
        self.runs.append(
            {
                **run_info,
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "command": " ".join(["edgeattn", *sys.argv[1:]]) if sys.argv else "",
                "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
                "resumed_cells": len(self.cells),
            }
        )
        self._done = {self.key(c) for c in self.cells}

    def _resume(self) -> None:
        try:
            data = json.loads(self.path.read_text())
            ok = isinstance(data, dict) and isinstance(data.get("cells"), list)
        except (OSError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(
                f"{self.path} exists but is not an eval report; pass --fresh to overwrite it, or another --json"
            )
        if data.get("task") != self.task:
            raise ConfigError(
                f"{self.path} holds a `{data.get('task')}` report, not `{self.task}`; pass another --json (or --fresh)"
            )
        old = data.get("settings", {})
        diff = [k for k in sorted(set(old) | set(self.settings)) if old.get(k) != self.settings.get(k)]
        if diff:
            k = diff[0]
            raise ConfigError(
                f"{self.path} was made with other settings ({k}: {old.get(k)!r} there, {self.settings.get(k)!r} now); "
                "its cells would not compare: pass --fresh to start over, or another --json"
            )
        self.cells = data["cells"]
        self.runs = data.get("runs", [])

    def key(self, cell: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(cell[f] for f in self.key_fields)

    def done(self, **key: Any) -> bool:
        return tuple(key[f] for f in self.key_fields) in self._done

    def get(self, **key: Any) -> dict[str, Any] | None:
        want = tuple(key[f] for f in self.key_fields)
        return next((c for c in self.cells if self.key(c) == want), None)

    def add(self, cell: dict[str, Any]) -> None:
        """Record a finished cell and rewrite the report (temp file + rename: never half-written)."""
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        cell = {**cell, "commit": self.runs[-1].get("commit"), "finished": now}
        k = self.key(cell)
        self.cells = [c for c in self.cells if self.key(c) != k] + [cell]
        self._done.add(k)
        self.write(complete=False)

    def select(self, **where: Iterable[Any]) -> list[dict[str, Any]]:
        """Cells whose fields fall in the given value sets (e.g. ``mode=["dense"], length=[1024]``)."""
        sets = {f: set(v) for f, v in where.items()}
        return [c for c in self.cells if all(c.get(f) in s for f, s in sets.items())]

    def to_dict(self, complete: bool) -> dict[str, Any]:
        return {
            "task": self.task,
            "settings": self.settings,
            **self.extra,
            "complete": complete,
            "runs": self.runs,
            "cells": self.cells,
        }

    def write(self, complete: bool) -> Path:
        return write_text(self.path, json.dumps(self.to_dict(complete), indent=1) + "\n")
