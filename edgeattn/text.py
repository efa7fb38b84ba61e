"""Real text that needs no download: prompts, calibration data, haystacks.

CPython ships ~465 KB of English documentation prose in ``pydoc_data.topics``
with every install, so tests, benchmarks and calibration use it by default;
``haystack_dir`` reads a folder of .txt files (e.g. Paul Graham's essays) instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pydoc_text() -> str:
    """All pydoc topics, in a fixed order, joined into one document."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def haystack_dir(path: str | Path) -> str:
    """Every .txt file of ``path``, sorted by name, joined into one document."""
    folder = Path(path)
    files = sorted(folder.glob("*.txt")) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(f"{folder} holds no .txt files; pass a folder of plain-text documents")
    return "\n\n".join(f.read_text(errors="replace") for f in files)


def token_ids(tokenizer: Any, n_tokens: int, text: str | None = None) -> list[int]:
    """The first ``n_tokens`` token ids of ``text`` (pydoc prose by default), repeated if too short.

    Starts with the tokenizer's BOS token, as the model expects.
    """
    if n_tokens < 1:
        raise ValueError(f"need at least 1 token, got {n_tokens}")
    body = tokenizer(text if text is not None else pydoc_text(), add_special_tokens=False).input_ids
    if not body:
        raise ValueError("the text tokenizes to nothing")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    need = n_tokens - len(bos)
    reps = -(-need // len(body)) if need > 0 else 0
    return (bos + body * max(reps, 1))[:n_tokens]
