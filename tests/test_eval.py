"""`edgeattn eval`: the scorer, the modes, the resumable grid and the reports, on the real model.

Kept short for CI: 1K-token prompts, two depths, dense and DHSA at a budget below the length (so
DHSA really is sparse), the PyTorch reference kernels; the real grids are in the README.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from edgeattn import dhsa
from edgeattn.cli import app
from edgeattn.config import ConfigError
from edgeattn.evals import inputs, prompts
from edgeattn.evals.modes import make_mode, parse_modes


def _run(*args: str):
    return CliRunner().invoke(app, list(args))


# ------------------------------------------------------------------ no model


def test_scorer_is_exact_match_of_the_first_number() -> None:
    assert prompts.score(" 73519.", "73519")
    assert not prompts.score(" 735190.", "73519")  # a longer number is not the fact
    assert not prompts.score(" a 7351", "73519")  # cut short
    assert not prompts.score(" 12345, then 73519", "73519")  # the first number counts
    assert prompts.answer_complete(" 73519.") and not prompts.answer_complete(" 7351")
    assert prompts.fact_for(0, "niah", 1024, 0.5) == prompts.fact_for(0, "niah", 1024, 0.5)
    assert prompts.fact_for(0, "niah", 1024, 0.5) != prompts.fact_for(1, "niah", 1024, 0.5)


def test_lengths_and_depths_parse_or_say_why() -> None:
    assert inputs.parse_lengths("2K,1K,2048") == [1024, 2048]
    assert inputs.parse_depths("3") == [0.0, 0.5, 1.0]
    for bad in ("1K,abc", "", "-1K", "0"):
        with pytest.raises(ConfigError):
            inputs.parse_lengths(bad)
    with pytest.raises(ConfigError, match="fraction"):
        inputs.parse_depths("0,1.5")


@pytest.mark.parametrize("name,sinks", [("window", 0), ("sinks-window", 4)])
def test_window_modes_keep_exactly_sinks_and_a_recent_band(name: str, sinks: int) -> None:
    """The window baselines are block-sparse selections whose band fills the budget: no key chosen by score."""
    length, budget, chunk = 512, 96, 16
    mode = make_mode(name, budget, chunk=chunk, sinks=4)
    assert mode.cfg.budget <= budget and mode.cfg.sinks == sinks
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, length, 32, generator=gen), torch.randn(1, 1, length, 32, generator=gen)
    bnd = dhsa.fixed_boundaries(length, chunk)
    _, keep = dhsa.select_for(q, k, mode.cfg, bnd)
    mask = dhsa.kept_token_mask(keep, bnd, length, mode.cfg.sinks)[0, 0]
    qpos = torch.arange(length)[:, None]
    kpos = torch.arange(length)[None, :]
    own_start = qpos // chunk * chunk
    expect = (kpos <= qpos) & ((kpos >= own_start - mode.cfg.local) | (kpos < sinks))
    assert torch.equal(mask, expect)
    assert int(mask.sum(-1).max()) <= budget


def test_needle_in_the_last_query_chunk_is_kept_with_rank_zero() -> None:
    from edgeattn import needle

    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 200, 32, generator=gen), torch.randn(1, 1, 200, 32, generator=gen)
    bnd = torch.tensor([0, 40, 90, 140, 200])
    r = needle.needle_in_selection(q, k, 0.2, bnd, make_mode("dhsa-shift", 124, min_chunk=8).cfg, (150, 155))
    assert (r["needle_chunk"], r["rank_score"], r["rank_mass"], r["kept"]) == (3, 0, 0, True)
    r = needle.needle_in_selection(q, k, 0.2, bnd, make_mode("dhsa-shift", 124, min_chunk=8).cfg, (50, 55))
    assert r["needle_chunk"] == 1 and r["rank_score"] >= 1 and r["rank_mass"] >= 1


def test_modes_refuse_unknown_names() -> None:
    assert [m.name for m in parse_modes("dense,dhsa,dhsa-shift,block-sparse,window", 2048)] == [
        "dense", "dhsa", "dhsa-shift", "block-sparse", "window",
    ]  # fmt: skip
    with pytest.raises(ConfigError, match="unknown mode"):
        parse_modes("dense,sparse", 2048)


# ------------------------------------------------------------------ real model


def _one_error_line(res) -> str:
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    return lines[0]


@pytest.mark.real_model
def test_bad_input_is_one_error_line_and_writes_nothing(real_model, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    assert "--haystack" in _one_error_line(
        _run("eval", "niah", "--haystack", str(tmp_path / "nope"), "--json", str(out))
    )
    assert "'abc'" in _one_error_line(_run("eval", "niah", "--lengths", "1K,abc", "--json", str(out)))
    assert "context" in _one_error_line(_run("eval", "passkey", "--lengths", "1K,64K", "--json", str(out)))
    assert "unknown mode" in _one_error_line(_run("eval", "niah", "--modes", "dense,oops", "--json", str(out)))
    out.write_text('{"task": "passkey", "settings": {}, "cells": []}')
    assert "passkey" in _one_error_line(_run("eval", "niah", "--lengths", "1K", "--json", str(out)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # refused, untouched, nothing else written
    assert json.loads(out.read_text())["task"] == "passkey"


@pytest.mark.real_model
def test_tiny_niah_grid_finds_the_needle_writes_reports_and_resumes(real_model, tmp_path: Path) -> None:
    from edgeattn.evals import retrieval

    req = retrieval.RetrievalRequest(
        task="niah", lengths=[1024], depths=[0.25, 0.75], mode_spec="dense,dhsa", json_path=tmp_path / "niah.json",
        budget=512, kernels="reference", threads=2,
    )  # fmt: skip
    seen = []
    report, stats = retrieval.run(req, loaded=real_model, on_cell=seen.append)
    assert (stats.evaluated, stats.skipped) == (4, 0)
    data = json.loads((tmp_path / "niah.json").read_text())
    assert data["complete"] and len(data["cells"]) == 4
    s = data["settings"]
    assert (s["model"], s["budget"], s["kernels"], s["backend"], s["seed"]) == (
        "gemma3-270m",
        512,
        "reference",
        "torch",
        0,
    )
    assert data["modes"]["dhsa"]["chunking"] == "fixed" and data["lengths"] == [1024]
    assert data["runs"][0]["commit"] and data["runs"][0]["cpu"]
    dense = [c for c in data["cells"] if c["mode"] == "dense"]
    assert all(c["hit"] for c in dense), [c["answer"] for c in dense]  # dense finds the needle at 1K
    for c in data["cells"]:
        assert c["fact"] == prompts.fact_for(0, "niah", 1024, c["depth"])
        assert c["shared_prefix"] == 512  # both modes continue from one dense prefill of the budget
    for c in (c for c in data["cells"] if c["mode"] == "dhsa"):
        assert [x["layer"] for x in c["needle"]] == [5, 11, 17] and all(x["rank_mass"] >= 1 for x in c["needle"])
    assert (tmp_path / "niah.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the same command again: every cell is already there, nothing is evaluated
    seen.clear()
    report, stats = retrieval.run(req, loaded=real_model, on_cell=seen.append)
    assert (stats.evaluated, stats.skipped) == (0, 4) and seen == [None] * 4
    again = json.loads((tmp_path / "niah.json").read_text())
    assert again["cells"] == data["cells"] and len(again["runs"]) == 2

    # other settings are refused rather than mixed into the same report
    with pytest.raises(ConfigError, match="budget"):
        retrieval.run(retrieval.RetrievalRequest(**{**req.__dict__, "budget": 256}), loaded=real_model)


@pytest.mark.real_model
def test_shared_dense_prefix_equals_a_whole_prefill(real_model) -> None:
    """The grid continues fixed-chunk modes from one dense prefill of the budget: same logits as prefilling whole."""
    from edgeattn.evals import retrieval
    from edgeattn.runtime.torch_backend import TorchSession

    mode = make_mode("dhsa", 128)
    ids = [real_model.tokenizer.bos_token_id, *inputs.load_haystack(real_model.tokenizer, None, 400).ids[:399]]
    cut = retrieval.shared_prefix([make_mode("dense", 0), mode, make_mode("sinks-window", 128)], len(ids))
    assert cut == 112  # the sinks-window band (96) and its own chunk: every mode is dense up to there
    whole = TorchSession(real_model, mode.cfg, kernels="reference")
    expect = whole.append(ids)
    prefix = TorchSession(real_model, make_mode("dense", 0).cfg, kernels="reference")
    prefix.append(ids[:cut])
    retrieval._continue_from(whole, prefix._cache, cut)
    got = whole.append(ids[cut:])
    assert float(abs(got - expect).max()) < 1e-3
    assert int(got.argmax()) == int(expect.argmax())


@pytest.mark.real_model
def test_fidelity_is_exact_at_full_budget_and_writes_curves(real_model, tmp_path: Path) -> None:
    from edgeattn.evals import fidelity

    req = fidelity.FidelityRequest(
        json_path=tmp_path / "fid.json", length=256, budgets=[64, 256], mode_spec="dhsa", scored=32,
        kernels="reference", threads=2,
    )  # fmt: skip
    report, evaluated = fidelity.run(req, loaded=real_model)
    assert evaluated == 2
    cells = {(c["mode"], c["budget"]): c for c in report.cells}
    full = cells[("dhsa", 256)]  # N_b >= L: DHSA is dense attention, end to end
    assert full["rel_error"] < 1e-4 and full["top1"] == 1.0 and full["kl"] < 1e-6
    assert abs(full["mass"] - 1.0) < 1e-5 and abs(full["perplexity"] - cells[("dense", 0)]["perplexity"]) < 1e-3
    sparse = cells[("dhsa", 64)]
    assert 0 < sparse["rel_error"] < 1 and 0 < sparse["mass"] < 1 and sparse["kl"] > 0 and 0 <= sparse["top1"] <= 1
    assert [x["layer"] for x in sparse["layers"]] == [5, 11, 17] and sparse["prefill_s"] > 0
    assert (tmp_path / "fid.png").read_bytes()[:4] == b"\x89PNG"
    _, evaluated = fidelity.run(req, loaded=real_model)
    assert evaluated == 0
