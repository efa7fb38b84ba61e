"""`edgeattn run --device`: the tiny model compiled for aarch64 runs on the emulated board as on the host."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from edgeattn.cli import app
from edgeattn.devices.emulated_arm64 import setup_problem
from edgeattn.tiny import save_tiny_model

pytestmark = pytest.mark.skipif(setup_problem() is not None, reason=f"emulated aarch64 device: {setup_problem()}")

runner = CliRunner()


def _rows(args: list[str], cache) -> list[dict]:
    res = runner.invoke(app, args, env={"EDGEATTN_CACHE": str(cache)})
    assert res.exit_code == 0, res.output
    return json.loads(res.output[res.output.index("{") : res.output.rindex("}") + 1])["results"]


def test_run_on_the_emulated_board_matches_the_host(tmp_path) -> None:
    model = save_tiny_model(tmp_path / "tiny", "gemma3", tokenizer=True)
    # DHSA only (a compile per attention and target): the dense artifact's board run is tests/test_devices_remote.py's
    common = [str(model), "--synthetic-length", "64", "--budget", "48", "--chunk-size", "16", "--max-new-tokens", "3"]
    common += ["--attention", "dhsa"]
    board = _rows(["run", *common, "--device", "arm64-emulated", "--json"], tmp_path / "cache")
    host = _rows(["run", *common, "--backend", "tvm", "--no-shipped", "--json"], tmp_path / "cache")
    assert [r["attention"] for r in board] == ["dhsa"]
    for b, h in zip(board, host, strict=True):
        assert b["device"] == "arm64-emulated (emulated)"  # never reported as device performance
        assert b["token_ids"] == h["token_ids"]
        assert 0 < b["peak_rss_mib"] < 1024  # the board process's own peak (its agent's VmHWM), not the host's
        assert b["planned_peak_mib"] > 0


def test_run_on_an_unknown_device_is_one_error_line() -> None:
    res = runner.invoke(app, ["run", "--device", "pi-zero"])
    assert res.exit_code == 2
    assert res.output.startswith("error: unknown device 'pi-zero'") and "Traceback" not in res.output
