"""Shared fixtures: the real default model is loaded once per test session."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def real_model():
    """The built-in Gemma 3 270M (converted on first use, then cached)."""
    from edgeattn import models

    torch.set_num_threads(2)
    return models.load()
