"""``<name>.manifest.json``: what an exported file holds, for the runtime and for humans.

The runtime reads it to know which layers carry which custom op with which
attributes, the I/O names and dtype, and to check (by hash) that the .onnx and
its external data are the files the exporter wrote.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from pathlib import Path
from typing import Any

MANIFEST_FORMAT = "edgeattn-onnx-export"
MANIFEST_VERSION = 1


def manifest_path(onnx_path: Path) -> Path:
    """``model.onnx`` -> ``model.manifest.json`` (one manifest per file, so exports can share a folder)."""
    return onnx_path.with_name(onnx_path.stem + ".manifest.json")


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def file_entries(paths: list[Path]) -> dict[str, dict[str, Any]]:
    """{file name: {sha256, bytes}} for the files of one export (names relative to the manifest)."""
    return {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in paths}


def build_manifest(
    *,
    model_name: str,
    model_facts: dict[str, Any],
    attention: dict[str, Any],
    layers: list[dict[str, Any]],
    onnx_info: dict[str, Any],
    files: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    import onnx
    import torch
    import transformers

    from edgeattn import __version__

    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "model": {"name": model_name, **model_facts},
        "attention": attention,
        "layers": layers,
        "onnx": onnx_info,
        "files": files,
        "created": {
            "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "edgeattn": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnx": onnx.__version__,
            "python": platform.python_version(),
        },
    }


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def read_manifest(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    if data.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is not an edgeattn export manifest (format {data.get('format')!r})")
    return data


def check_files(manifest_file: Path) -> list[str]:
    """Names of the files whose hash no longer matches the manifest (empty: all good)."""
    data = read_manifest(manifest_file)
    bad = []
    for name, entry in data["files"].items():
        p = manifest_file.parent / name
        if not p.is_file() or sha256_file(p) != entry["sha256"]:
            bad.append(name)
    return bad
