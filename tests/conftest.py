"""Shared fixtures: the real default model is loaded once per test session."""

from __future__ import annotations

import os

import pytest
import torch

from edgeattn.models import cache_dir as edgeattn_cache

# Many tests give `edgeattn` a fresh $EDGEATTN_CACHE (models, exports); the compiled kernels are
# keyed by their code and shapes, so every test and both workers share one kernel cache: a tiny
# model's ~8 kernels compile once per suite instead of once per test that runs them (~5 s each).
os.environ.setdefault("EDGEATTN_KERNEL_CACHE_DIR", str(edgeattn_cache() / "kernels"))


@pytest.fixture(scope="session")
def real_model():
    """The built-in Gemma 3 270M (converted on first use, then cached)."""
    from edgeattn import models

    torch.set_num_threads(2)
    return models.load()


# The suite runs on two workers, one test file per worker at a time (scripts/test.sh: pytest-xdist,
# --dist loadfile), handed out in collection order.  Files that take minutes go first so that the
# last file to finish is a short one; a scheduling hint only, every file runs either way.  From the
# suite's own --durations (AMD EPYC, 2 cores, 2026-12-02), longest first.
LONG_FILES = (
    "test_runtime.py",
    "test_tvm_compile.py",
    "test_kernels_cpu.py",
    "test_emulated_arm64.py",
    "test_quantize.py",
    "test_real_model.py",
    "test_kernels_targets.py",
    "test_run_device.py",
    "test_devices_emulated.py",
    "test_export_real.py",
    "test_selection.py",
    "test_bench.py",
    "test_devices_agent.py",
    "test_kernels_prebuilt.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable: order within a file kept
