"""The command line: verbs, help, and a clear error with a non-zero exit for each bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgeattn.cli import app
from edgeattn.tiny import save_tiny_model

runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, list(args))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "gemma2", "gemma2")


def test_every_verb_has_help() -> None:
    for verb in ("info", "run", "export", "compile", "bench", "eval", "devices", "calibrate"):
        res = _run(verb, "--help")
        assert res.exit_code == 0, (verb, res.output)
    assert "--budget" in _run("run", "--help").output


def test_missing_model_path(tmp_path: Path) -> None:
    res = _run("run", str(tmp_path / "nope"))
    assert res.exit_code == 2
    assert "not found" in res.output and "gemma3-270m" in res.output


def test_directory_without_config(tmp_path: Path) -> None:
    res = _run("run", str(tmp_path))
    assert res.exit_code == 2
    assert "no config.json" in res.output


def test_unsupported_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    res = _run("run", str(tmp_path))
    assert res.exit_code == 2
    assert "'llama'" in res.output and "Gemma 2 and Gemma 3" in res.output


def test_corrupt_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    res = _run("run", str(tmp_path))
    assert res.exit_code == 2
    assert "not valid JSON" in res.output


def test_config_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma2"}))
    res = _run("run", str(tmp_path))
    assert res.exit_code == 2
    assert "no weights" in res.output


def test_corrupt_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"\x00" * 64)
    res = _run("run", str(bad))
    assert res.exit_code == 2
    assert "GGUF" in res.output and "corrupt" in res.output


def test_truncated_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 20)
    res = _run("run", str(bad))
    assert res.exit_code == 2
    assert "not a readable GGUF" in res.output


def test_gguf_of_another_architecture(tmp_path: Path) -> None:
    import gguf
    import numpy as np

    path = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    res = _run("run", str(path))
    assert res.exit_code == 2
    assert "'llama'" in res.output


def test_model_without_tokenizer(tiny_dir: Path) -> None:
    res = _run("run", str(tiny_dir), "--synthetic-length", "16")
    assert res.exit_code == 2
    assert "no tokenizer" in res.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--attention", "sparse"], "--attention takes"),
        (["--budget", "8"], "--budget >= 20"),
        (["--chunking", "magic"], "unknown chunking"),
        (["--device", "android"], "unknown device 'android'"),
        (["--prompt", "hi", "--synthetic-length", "5"], "only one of"),
    ],
)
def test_bad_run_options(args: list[str], message: str) -> None:
    res = _run("run", *args)
    assert res.exit_code in (2, 3)
    assert message in res.output


def test_missing_prompt_file(tmp_path: Path) -> None:
    res = _run("run", "--prompt-file", str(tmp_path / "absent.txt"))
    assert res.exit_code == 2
    assert "no such file" in res.output


@pytest.mark.real_model
def test_info_reports_versions_and_default_model() -> None:
    res = _run("info", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["model"]["global_layers"] == [5, 11, 17]
    assert {"torch", "onnx", "onnxruntime", "apache-tvm"} <= set(report["versions"])


@pytest.mark.real_model
def test_run_default_model_side_by_side() -> None:
    res = _run(
        "run",
        "--synthetic-length",
        "97",
        "--budget",
        "48",
        "--chunk-size",
        "16",
        "--attention",
        "dense,dhsa,block-sparse",
        "--max-new-tokens",
        "4",
        "--json",
    )
    assert res.exit_code == 0, res.output
    report = json.loads(res.output[res.output.index("{") :])
    rows = [(r["backend"], r["attention"]) for r in report["results"]]
    assert rows == [("transformers", "dense"), ("torch", "dense"), ("torch", "dhsa"), ("torch", "block-sparse")]
    for r in report["results"]:
        assert r["prompt_tokens"] == 97 and r["new_tokens"] == 4
        assert r["prefill_s"] > 0 and r["peak_rss_mib"] > 100
    assert report["results"][2]["layers"] == [5, 11, 17]
    assert report["threads"] >= 1 and report["cpu"]


def test_cli_starts_without_torch_or_tvm() -> None:
    """`edgeattn --help` and every verb's start stay fast: heavy imports wait until a verb runs."""
    import subprocess
    import sys

    probe = "import sys, edgeattn.cli; print(sorted(m for m in ('torch', 'tvm', 'transformers') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
