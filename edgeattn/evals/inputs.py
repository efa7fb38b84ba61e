"""Everything an eval checks before it loads the model or writes a byte.

Bad input is one ``ConfigError`` (the CLI prints one ``error:`` line and exits 2): lengths that do
not parse or exceed the model's context, depths outside [0, 1], a haystack folder without text.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeattn.config import ConfigError, parse_token_counts

PYDOC_OFFSET = 50_000  # tokens of pydoc prose skipped: the boundary predictor was calibrated on the first ~16K
MIN_LENGTH = 128


def parse_lengths(spec: str, option: str = "--lengths") -> list[int]:
    """``"1K,2K,16K"`` -> [1024, 2048, 16384], sorted, duplicates dropped; none shorter than a prompt needs."""
    lengths = parse_token_counts(spec, option)
    if lengths[0] < MIN_LENGTH:
        raise ConfigError(f"{option}: {lengths[0]} tokens is too short for a prompt; use >= {MIN_LENGTH}")
    return lengths


def parse_depths(spec: str) -> list[float]:
    """``"0,0.25,0.5"`` -> fractions of the haystack before the needle; a bare integer N means N even depths."""
    s = spec.strip()
    if s.isdigit() and "," not in s:
        n = int(s)
        if n < 1:
            raise ConfigError(f"--depths {spec!r}: give at least one depth")
        return [0.5] if n == 1 else [round(i / (n - 1), 4) for i in range(n)]
    try:
        depths = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--depths {spec!r}: use fractions in [0, 1] like 0,0.5,1 or a count like 5") from None
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise ConfigError(f"--depths {spec!r}: every depth must be a fraction in [0, 1] (0 = start, 1 = end)")
    return sorted(set(depths))


def parse_budgets(spec: str) -> list[int]:
    return parse_lengths(spec, "--budgets") if spec else []


def model_context(model: str | None) -> tuple[Path, int]:
    """The model's folder and context length, read from its config (nothing loaded)."""
    from transformers import AutoConfig

    from edgeattn import models
    from edgeattn.runtime import memory

    path = models.resolve(model)
    models.check_hf_dir(path)
    fp = memory.footprint_of(AutoConfig.from_pretrained(str(path)))
    return path, fp.context


def check_lengths(lengths: list[int], context: int, new_tokens: int) -> None:
    for n in lengths:
        if context and n + new_tokens > context:
            raise ConfigError(
                f"--lengths {n}: {n} prompt tokens + {new_tokens} answer tokens exceed the model's context of "
                f"{context} tokens; use lengths <= {context - new_tokens}"
            )


@dataclass(frozen=True)
class Haystack:
    """The prose the prompts are cut from, as token ids, and where it came from (for the report)."""

    name: str
    offset: int
    ids: list[int]

    def describe(self) -> dict[str, Any]:
        return {"haystack": self.name, "haystack_offset": self.offset, "haystack_tokens": len(self.ids)}


def check_haystack_dir(path: Path | None) -> None:
    if path is None:
        return
    if not path.is_dir():
        raise ConfigError(f"--haystack {path}: no such folder; pass a folder of .txt files (or leave it out for pydoc)")
    if not any(path.glob("*.txt")):
        raise ConfigError(f"--haystack {path}: the folder holds no .txt files; pass a folder of plain-text documents")


def load_haystack(tokenizer: Any, path: Path | None, need: int) -> Haystack:
    """Token ids of the haystack (pydoc topics past :data:`PYDOC_OFFSET`, or every .txt of ``path``)."""
    from edgeattn import text

    check_haystack_dir(path)
    src = text.haystack_dir(path) if path is not None else text.pydoc_text()
    offset = 0 if path is not None else PYDOC_OFFSET
    ids = tokenizer(src, add_special_tokens=False).input_ids[offset:]
    name = str(path) if path is not None else "pydoc_data.topics"
    if len(ids) < need:
        raise ConfigError(
            f"the haystack {name} has {len(ids)} tokens, fewer than the {need} the longest prompt needs; "
            "pass a larger --haystack folder or shorter --lengths"
        )
    return Haystack(name, offset, ids)


def git_commit() -> str:
    """The commit of the code that ran (``+dirty`` when the checkout has uncommitted changes)."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")
