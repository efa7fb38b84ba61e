"""The kernel benchmark's own logic: interleaved pairs, and a small end-to-end run."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import kernels  # noqa: E402


def test_interleaved_ratios_alternate_the_order_and_divide_baseline_by_ours() -> None:
    calls: list[str] = []

    def ours() -> None:
        calls.append("ours")
        time.sleep(0.01)

    def baseline() -> None:
        calls.append("base")
        time.sleep(0.03)

    ratios = kernels.interleaved_ratios(ours, baseline, 4)
    assert len(ratios) == 4 and all(r > 1.5 for r in ratios)
    assert calls == ["ours", "base", "base", "ours", "ours", "base", "base", "ours"]


def test_pairs_run_end_to_end_and_land_in_the_json(tmp_path: Path) -> None:
    out = tmp_path / "k.json"
    cmd = [sys.executable, "benchmarks/kernels.py", "--quick", "--impls", "tvm-dense,torch-sdpa", "--pairs", "2"]
    done = subprocess.run([*cmd, "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 interleaved pairs" in done.stdout
    dense = [r for r in json.loads(out.read_text())["records"] if r["impl"] == "tvm-dense"]
    assert [len(r["pair_ratios"]) for r in dense] == [2, 2]
    assert all(r["rel_err"] < 1e-5 for r in dense)


def test_pairs_and_isolate_do_not_mix() -> None:
    done = subprocess.run(
        [sys.executable, "benchmarks/kernels.py", "--isolate", "--pairs", "3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0 and "cannot be combined with --isolate" in done.stderr


def test_kernel_ab_compares_a_revision_with_the_working_tree(tmp_path: Path) -> None:
    """HEAD against the working tree: the same kernel when cpu.py is unchanged, so outputs agree."""
    out = tmp_path / "ab.json"
    cmd = [sys.executable, "benchmarks/kernel_ab.py", "--rev", "HEAD", "--lengths", "300", "--chunks", "16"]
    done = subprocess.run(
        [*cmd, "--pairs", "2", "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (rec,) = json.loads(out.read_text())["records"]
    assert rec["length"] == 300 and rec["chunk"] == 16 and len(rec["ratios"]) == 2
    assert rec["max_abs_diff"] < 1e-3  # a regression in the tree's kernel shows here first
    sel = subprocess.run(
        [*cmd, "--op", "select", "--pairs", "1", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert sel.returncode == 0, sel.stderr[-2000:]
    assert json.loads(out.read_text())["records"][0]["max_abs_diff"] == 0  # a selection is exact or wrong
    bad = subprocess.run([*cmd[:2], "--rev", "no-such-rev"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "git cannot show kernels_tvm/cpu.py" in bad.stderr
