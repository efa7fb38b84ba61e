"""Folders that appear whole or not at all.

Why: a converted model cache or a kernel bundle that is half written (a crash, Ctrl-C, a compile
error mid-way) would later be read as complete.  Build in a hidden sibling, rename at the end.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_dir(target: Path, prefix: str | None = None) -> Iterator[Path]:
    """Yield an empty sibling folder of ``target``; on success it replaces ``target``, on error it is removed.

    An existing ``target`` is kept until the new one is complete.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix or f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
