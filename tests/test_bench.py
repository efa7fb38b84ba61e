"""`edgeattn bench`: a real sweep on a tiny model, resume, the Markdown report, and bad input.

The sweep runs real child processes (one per row, as on a real run) at tiny lengths;
llama.cpp runs when llama-cpp-python is installed (the `peers` extra) and is skipped
with the reason otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgeattn.bench import peers, report, rows, sweep
from edgeattn.cli import app
from edgeattn.config import ConfigError
from edgeattn.tiny import save_tiny_model

runner = CliRunner()
LENGTH = 40  # tokens: several DHSA chunks of 8


def _bench(*args: str):
    return runner.invoke(app, ["bench", *args])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("bench-tiny") / "gemma3", "gemma3", tokenizer=True)


def _sweep_args(tiny_dir: Path, out: Path, lengths: str = str(LENGTH)) -> list[str]:
    return (
        [str(tiny_dir), "--lengths", lengths, "--threads", "1", "--backends", "torch"]
        + ["--attention", "dhsa", "--peers", "llama.cpp", "--budget", "24", "--chunk-size", "8"]
        + ["--new-tokens", "3", "--out", str(out)]
    )


@pytest.fixture(scope="module")
def swept(tiny_dir: Path, tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("bench-out") / "run"
    res = _bench(*_sweep_args(tiny_dir, out))
    return out, res


def test_sweep_writes_rows_plots_and_the_report(swept) -> None:
    out, res = swept
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "bench.json").read_text())
    got = {r["row"]: r for r in doc["rows"]}
    assert set(got) == {"torch/dhsa"}, doc["rows"]  # one child process: each costs ~10 s of imports
    for r in got.values():
        assert r["length"] == LENGTH and r["prompt_tokens"] == LENGTH
        assert r["threads"] == 1 and r["cpu"] == doc["machine"]["cpu"] and r["weights"] == "fp32"
        assert r["repeats"] == 1 and r["prefill_s"] > 0 and r["tok_s"] == pytest.approx(LENGTH / r["prefill_s"])
        assert r["warmup"] and r["backend"] == "torch" and r["kernels"] in ("tvm", "reference")
        # the whole process's peak (runtime + model): far above the tiny model's own bytes
        assert r["peak_rss_mib"] > 100 and r["peak_rss_mib"] >= r["measured_peak_rss_mib"] * 0.99
        assert r["decode_tok_s"] > 0 and len(r["first_tokens"]) == 3
        assert set(r["stages_s"]) == {"attention_global_core", "attention_sliding_core", "projections", "mlp", "rest"}
    assert sorted(doc["plots"]) == ["decode_tok_s.png", "peak_rss.png", "prefill_latency.png", "prefill_tok_s.png"]
    for name in doc["plots"]:
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temp files left behind"
    assert "| 40 | torch/dhsa | fp32 |" in res.output  # the Markdown table is printed at the end


def test_llama_cpp_skipped_with_how_to_install_or_no_gguf(swept) -> None:
    out, _ = swept
    (skip,) = json.loads((out / "bench.json").read_text())["skipped"]
    assert skip["row"] == "llama.cpp"
    if peers.llama_cpp_missing():
        assert "pip install" in skip["reason"] and ".[peers]" in skip["reason"]
    else:  # installed: the tiny random model has no GGUF for it
        assert "--gguf" in skip["reason"]


def test_resume_skips_finished_rows(swept, tiny_dir: Path) -> None:
    out, _ = swept
    before = json.loads((out / "bench.json").read_text())

    def plan(lengths: list[int], **kw):
        req = sweep.BenchRequest(
            rows=rows.select_rows("torch", "dhsa", "none"),
            lengths=lengths,
            out=out,
            model=str(tiny_dir),
            threads=1,
            new_tokens=3,
            budget=24,
            chunk_size=8,
            gguf=None,
            **kw,
        )
        return sweep.plan_sweep(req)

    same = plan([LENGTH])
    assert same.jobs == [] and same.done == 1
    grown = plan([LENGTH, 2 * LENGTH])
    assert [(j.row.name, j.length) for j in grown.jobs] == [("torch/dhsa", 80)]
    with pytest.raises(sweep.ResumeError, match="threads 1 -> 2"):
        sweep.plan_sweep(sweep.BenchRequest(**{**same.request.__dict__, "threads": 2}))
    # the same command again runs nothing and keeps every measured row as it was
    res = _bench(*_sweep_args(tiny_dir, out))
    assert res.exit_code == 0, res.output
    assert "1 finished row(s) kept" in res.output
    after = json.loads((out / "bench.json").read_text())
    assert [r["finished"] for r in after["rows"]] == [r["finished"] for r in before["rows"]]


def test_failed_rows_are_run_again(tmp_path: Path, tiny_dir: Path) -> None:
    req = sweep.BenchRequest(
        rows=rows.select_rows("torch", "dense", "none"), lengths=[LENGTH], out=tmp_path, model=str(tiny_dir)
    )
    plan = sweep.plan_sweep(req)
    (tmp_path / "bench.json").write_text(
        json.dumps({**plan.report, "rows": [{"row": "torch/dense", "length": LENGTH, "error": "killed"}]})
    )
    assert [j.row.name for j in sweep.plan_sweep(req).jobs] == ["torch/dense"]


def test_report_renders_markdown_with_targets_and_plots(swept, tmp_path: Path) -> None:
    out, _ = swept
    res = _bench("--report", str(out / "bench.json"), str(out / "bench.json"))
    assert res.exit_code == 0, res.output
    md = res.output
    assert md.count("| length | row | weights |") == 2
    assert "| 40 | torch/dhsa | fp32 |" in md and "Targets" in md and "not measured in this run" in md
    assert "prefill_tok_s.png)" in md and "Where the prefill time goes" in md
    assert "Skipped `llama.cpp`" in md


def test_targets_say_by_how_much_they_are_missed() -> None:
    def row(name: str, attention: str, tok_s: float, rss: float) -> dict:
        return {"row": name, "length": 16384, "attention": attention, "tok_s": tok_s, "peak_rss_mib": rss}

    got = report.targets(
        [
            row("torch/dhsa", "dhsa", 200.0, 3000),
            row("llama.cpp", "dense", 100.0, 900),
            row("transformers", "dense", 50, 4000),
        ]
    )
    by = {t["target"]: t for t in got}
    llama = by["DHSA prefill tok/s vs llama.cpp at 16K >= 3.0x"]
    assert llama["ratio"] == pytest.approx(2.0) and llama["holds"] is False and "1.50x short" in llama["note"]
    assert by["DHSA prefill tok/s vs transformers at 16K >= 3.0x"]["holds"] is True
    assert (
        by["DHSA peak RSS at 16K <= llama.cpp's"]["holds"] is False
        and "2,100 MiB over" in by["DHSA peak RSS at 16K <= llama.cpp's"]["note"]
    )
    assert by["DHSA prefill tok/s vs llama.cpp at 4K >= 1.5x"]["ratio"] is None


def test_child_peak_is_its_own_not_the_parents() -> None:
    """ru_maxrss survives exec (a child spawned from a big parent reports the parent's peak); VmHWM does not."""
    import subprocess
    import sys

    ballast = bytearray(400 * 1024 * 1024)
    ballast[::4096] = b"\x01" * len(ballast[::4096])  # resident, not just reserved
    code = "from edgeattn.bench.child import peak_rss_mib; print(peak_rss_mib())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert float(out) < 200, out
    del ballast


def test_lengths_parse() -> None:
    assert rows.parse_lengths("4K, 1K,2000,4K") == [1024, 2000, 4096]
    for bad in ("1K,x", "0", "-4K", "", "1.5K"):
        with pytest.raises(ConfigError, match="--lengths"):
            rows.parse_lengths(bad)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--lengths", "1K,abc"], "--lengths"),
        (["--lengths", "8K"], "exceed the model's context of 4096"),
        (["--device", "no-such-board"], "unknown device"),
        (["--peers", "vllm"], "--peers takes"),
        (["--gguf", "/nonexistent/model.gguf"], "no such file"),
        (["--threads", "0"], "--threads"),
    ],
)
def test_bad_input_is_one_error_line_and_nothing_written(tiny_dir: Path, tmp_path: Path, args, needle) -> None:
    out = tmp_path / "out"
    res = _bench(str(tiny_dir), "--backends", "torch", "--out", str(out), *args)
    assert res.exit_code == 2, res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], res.output
    assert not out.exists()


def test_missing_gguf_model_and_report_file(tmp_path: Path) -> None:
    res = _bench(str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "out"))
    assert res.exit_code == 2 and res.output.startswith("error:") and "not found" in res.output
    res = _bench("--report", str(tmp_path / "nope.json"))
    assert res.exit_code == 2 and "no such file" in res.output
    (tmp_path / "bad.json").write_text("[1, 2]")
    res = _bench("--report", str(tmp_path / "bad.json"))
    assert res.exit_code == 2 and "not an edgeattn bench report" in res.output
    assert not (tmp_path / "out").exists()


def test_llama_cpp_row_on_the_built_in_gguf(tmp_path: Path) -> None:
    """llama.cpp on the built-in model's own GGUF, same ids as edgeattn's rows (needs the `peers` extra)."""
    why = peers.llama_cpp_missing()
    if why:
        pytest.skip(f"llama.cpp row not run: {why}")
    out = tmp_path / "llama"
    res = _bench(
        "--lengths",
        "96",
        "--threads",
        "1",
        "--backends",
        "none",
        "--peers",
        "llama.cpp",
        "--new-tokens",
        "3",
        "--out",
        str(out),
    )
    assert res.exit_code == 0, res.output
    (r,) = json.loads((out / "bench.json").read_text())["rows"]
    assert r["row"] == "llama.cpp" and r["weights"] == "Q4_K_M (GGUF)" and r["prompt_tokens"] == 96
    assert r["tok_s"] > 0 and r["decode_tok_s"] > 0 and len(r["first_tokens"]) == 3
    assert 100 < r["peak_rss_mib"] < 2000  # the 253 MB Q4 file mapped, not the 1 GB fp32 model
