"""The host runtime: the torch backend on our TVM kernels, chunked prefill, memory budgets, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from edgeattn.cli import app
from edgeattn.config import AttentionConfig, ConfigError
from edgeattn.runtime import memory
from edgeattn.runtime.runner import greedy, prefill
from edgeattn.runtime.torch_backend import TorchSession
from edgeattn.tiny import tiny_model

runner = CliRunner()


class _Loaded:
    """The slice of models.LoadedModel a TorchSession reads, around a tiny random model."""

    def __init__(self, model) -> None:
        self.model = model
        self.config = model.config
        self.tokenizer = None
        self.name = "tiny-" + model.config.model_type


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _steps(session, ids: list[int], chunk: int, n: int) -> tuple[list[np.ndarray], list[int]]:
    """Prefill (in steps of ``chunk``) then ``n`` greedy decode steps; all logits and tokens."""
    logits, _ = prefill(session, ids, chunk)
    seen = [logits]
    tokens = [int(np.argmax(logits))]
    for _ in range(n - 1):
        seen.append(session.append([tokens[-1]]))
        tokens.append(int(np.argmax(seen[-1])))
    session.reset()
    return seen, tokens


# ------------------------------------------------------------------ tiny models


@pytest.mark.parametrize("family", ["gemma3", "gemma2"])
def test_tvm_kernels_with_full_budget_equal_the_shipped_model(family: str) -> None:
    """Budget >= L: DHSA on the TVM kernels (and every other layer on the dense flash kernel) is the model."""
    loaded = _Loaded(tiny_model(family))
    ids = torch.randint(0, 512, (203,), generator=torch.Generator().manual_seed(1)).tolist()
    ref_logits, ref_tokens = _steps(TorchSession(loaded, AttentionConfig(kind="dense"), as_shipped=True), ids, 203, 16)
    cfg = AttentionConfig(kind="dhsa", budget=4096, chunk_size=16)
    got_logits, got_tokens = _steps(TorchSession(loaded, cfg, kernels="tvm"), ids, 203, 16)
    assert got_tokens == ref_tokens
    for a, b in zip(got_logits, ref_logits, strict=True):
        assert _rel(a, b) < 1e-4


@pytest.mark.parametrize("family", ["gemma3", "gemma2"])
@pytest.mark.parametrize("kind", ["dhsa", "block-sparse"])
def test_tvm_kernels_at_small_budget_equal_the_reference(family: str, kind: str) -> None:
    loaded = _Loaded(tiny_model(family))
    ids = torch.randint(0, 512, (300,), generator=torch.Generator().manual_seed(2)).tolist()
    cfg = AttentionConfig(kind=kind, budget=64, chunk_size=16, sinks=4)
    ref, ref_tokens = _steps(TorchSession(loaded, cfg, kernels="reference", layers="all"), ids, 300, 6)
    got, got_tokens = _steps(TorchSession(loaded, cfg, kernels="tvm", layers="all"), ids, 300, 6)
    assert got_tokens == ref_tokens
    for a, b in zip(got, ref, strict=True):
        assert _rel(a, b) < 1e-4


@pytest.mark.parametrize("kernels", ["tvm", "reference"])
def test_chunked_prefill_equals_one_shot(kernels: str) -> None:
    """Prefill chunks that are multiples of the DHSA chunk select what one-shot prefill selects: exactly
    so for the paper's selection (observe=0); the observation window is each call's last queries."""
    loaded = _Loaded(tiny_model("gemma3"))
    ids = torch.randint(0, 512, (317,), generator=torch.Generator().manual_seed(3)).tolist()
    cfg = AttentionConfig(kind="dhsa", budget=64, chunk_size=16, observe=0)
    one, one_tokens = _steps(TorchSession(loaded, cfg, kernels=kernels), ids, 317, 4)
    many, many_tokens = _steps(TorchSession(loaded, cfg, kernels=kernels), ids, 64, 4)
    assert many_tokens == one_tokens
    for a, b in zip(many, one, strict=True):
        assert _rel(a, b) < 1e-4


def test_greedy_stops_at_eos() -> None:
    class Fixed:
        def append(self, ids):
            out = np.zeros(8, np.float32)
            out[5] = 1.0
            return out

    first = np.zeros(8, np.float32)
    first[2] = 1.0
    assert greedy(Fixed(), first, 10, eos=5) == [2, 5]
    assert greedy(Fixed(), first, 3, eos=None) == [2, 5, 5]


# ------------------------------------------------------------------ memory planning


@pytest.mark.parametrize(
    ("text", "nbytes"),
    [("1.5GiB", 3 << 29), ("800MiB", 800 << 20), ("2G", 2 << 30), ("512m", 512 << 20), ("1GB", 10**9), ("4096", 4096)],
)
def test_parse_size(text: str, nbytes: int) -> None:
    assert memory.parse_size(text) == nbytes


@pytest.mark.parametrize("text", ["lots", "1.5 parsecs", "-3GiB", ""])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="1.5GiB"):
        memory.parse_size(text)
    with pytest.raises(ConfigError, match="positive"):
        memory.parse_size("0MiB")


def test_weights_count_matches_the_loaded_model() -> None:
    model = tiny_model("gemma2")
    fp = memory.footprint_of(model.config)
    assert fp.weights == 4 * sum(p.numel() for p in model.parameters())


def test_plan_chunks_to_fit_and_refuses_what_cannot() -> None:
    model = tiny_model("gemma3")
    fp = memory.footprint_of(model.config)
    resident = 100 << 20
    one_shot = memory.plan_run(fp, 4000, 16, resident, None, granularity=16)
    assert one_shot.prefill_chunk == 4000 and not one_shot.chunked
    budget = resident + one_shot.kv_cache + fp.step_bytes(1000, 4000) + memory.HEADROOM
    fitted = memory.plan_run(fp, 4000, 16, resident, budget, granularity=16)
    assert fitted.chunked and fitted.prefill_chunk % 16 == 0 and fitted.peak <= budget
    assert fitted.prefill_chunk >= 960  # the longest chunk that fits, not merely one that does
    with pytest.raises(memory.BudgetError, match="--memory-budget >="):
        memory.plan_run(fp, 4000, 16, resident, resident + 1024, granularity=16)
    with pytest.raises(memory.BudgetError, match="weights"):
        memory.check_weights_fit(fp, resident, resident + fp.weights // 2)


# ------------------------------------------------------------------ CLI: bad input, nothing written


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--memory-budget", "lots"], "cannot read the memory size"),
        (["--synthetic-length", "-5"], "--synthetic-length must be >= 1"),
        (["--synthetic-length", "0"], "--synthetic-length must be >= 1"),
        (["--backend", "onnx"], "--backend takes"),
        (["--kernels", "cuda"], "--kernels must be one of"),
        (["--threads", "0"], "--threads must be >= 1"),
    ],
)
def test_run_rejects_bad_options(args: list[str], message: str, tmp_path) -> None:
    res = runner.invoke(app, ["run", *args], env={"EDGEATTN_CACHE": str(tmp_path / "cache")})
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert "Traceback" not in res.output


@pytest.mark.real_model
def test_run_refuses_a_context_beyond_the_model_before_allocating(real_model) -> None:
    res = runner.invoke(app, ["run", "--synthetic-length", "10000000"])
    assert res.exit_code == 2, res.output
    assert "exceed the model's context of 32768" in res.output


@pytest.mark.real_model
def test_run_refuses_a_budget_below_the_weights(real_model) -> None:
    res = runner.invoke(app, ["run", "--memory-budget", "512MiB", "--synthetic-length", "64"])
    assert res.exit_code == 2, res.output
    assert "is below the" in res.output and "weights" in res.output and "--memory-budget >=" in res.output


# ------------------------------------------------------------------ the default model


@pytest.mark.real_model
def test_default_model_full_budget_on_tvm_kernels_is_the_shipped_model(real_model) -> None:
    """At an odd length, DHSA with budget >= L on the TVM kernels gives the shipped model's logits and tokens."""
    from edgeattn import text

    ids = text.token_ids(real_model.tokenizer, 1531)
    ref, ref_tokens = _steps(TorchSession(real_model, AttentionConfig(kind="dense"), as_shipped=True), ids, 1531, 16)
    cfg = AttentionConfig(kind="dhsa", budget=2048, chunk_size=32)
    got, got_tokens = _steps(TorchSession(real_model, cfg, kernels="tvm"), ids, 1531, 16)
    assert got_tokens == ref_tokens
    for a, b in zip(got, ref, strict=True):
        assert _rel(a, b) < 1e-4


@pytest.mark.real_model
def test_default_model_small_budget_tvm_equals_reference_and_chunked_prefill(real_model) -> None:
    from edgeattn import text

    ids = text.token_ids(real_model.tokenizer, 1531)
    cfg = AttentionConfig(kind="dhsa", budget=256, chunk_size=32)  # with the observation window (default)
    ref, ref_tokens = _steps(TorchSession(real_model, cfg, kernels="reference"), ids, 1531, 4)
    got, got_tokens = _steps(TorchSession(real_model, cfg, kernels="tvm"), ids, 1531, 4)
    assert got_tokens == ref_tokens
    for a, b in zip(got, ref, strict=True):
        assert _rel(a, b) < 1e-4
    # a split prefill equals one-shot exactly for the paper's selection (the window is per call)
    paper = cfg.with_(observe=0)
    one, one_tokens = _steps(TorchSession(real_model, paper, kernels="tvm"), ids, 1531, 4)
    chunked, chunked_tokens = _steps(TorchSession(real_model, paper, kernels="tvm"), ids, 512, 4)
    assert chunked_tokens == one_tokens
    for a, c in zip(one, chunked, strict=True):
        assert _rel(c, a) < 1e-4


# Run in a fresh process, as `edgeattn run` is: a test process that has run hundreds of tests holds a
# fragmented heap whose growth no plan of this run can account for (CI overshot by 53 MiB that way).
_BUDGET_PROBE = """
import json, torch
from edgeattn import models
from edgeattn.config import AttentionConfig
from edgeattn.runtime import memory
from edgeattn.runtime.host import RunRequest, run_on_host
from edgeattn.runtime.measure import rss_bytes
m = models.load()
fp = memory.footprint_of(m.config)
cfg = AttentionConfig(kind="dhsa", budget=512, chunk_size=32)
# a short run first loads (or, on a cold disk cache, compiles) the kernels and the libraries they pull in:
# the resident size is what the process holds after that, as the run's own plan measures it after warm-up
warm = RunRequest(configs=[cfg], synthetic_length=64, max_new_tokens=1, threads=2, shipped_baseline=False)
run_on_host(warm, loaded=m)
resident = rss_bytes() + (32 << 20)
one_shot = memory.plan_run(fp, LENGTH, 4, resident, None)
budget = one_shot.peak - (one_shot.activations * 2) // 3  # one-shot prefill would not fit
req = RunRequest(configs=[cfg], synthetic_length=LENGTH,
                 max_new_tokens=4, threads=2, memory_budget=budget, shipped_baseline=False)
_, (row,) = run_on_host(req, loaded=m)
print(json.dumps(dict(budget=budget, steps=row.prefill_steps, chunk=row.prefill_chunk,
                      planned=row.planned_peak_mib, peak=row.peak_rss_mib)))
"""


@pytest.mark.real_model
def test_budget_that_one_shot_would_exceed_is_met_by_chunked_prefill(real_model) -> None:
    """The plan picks prefill chunks; the measured peak RSS of the process stays within the budget."""
    import json
    import subprocess
    import sys

    script = _BUDGET_PROBE.replace("LENGTH", "4096")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["steps"] > 1 and got["chunk"] % 32 == 0
    assert got["planned"] * memory.MIB <= got["budget"]
    assert got["peak"] * memory.MIB <= got["budget"], (got, got["budget"] / memory.MIB)


# ------------------------------------------------------------------ run MODEL.onnx: refused before loading


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    from edgeattn.export.exporter import export_loaded

    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    export_loaded(_Loaded(tiny_model("gemma3")), out, AttentionConfig(kind="dhsa", budget=64, chunk_size=16))
    return out


def _listing(folder) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in folder.iterdir()}


@pytest.mark.parametrize("damage", ["corrupt", "edited", "no-manifest"])
def test_run_refuses_an_onnx_file_that_is_not_its_export(damage: str, tiny_export, tmp_path) -> None:
    import shutil

    folder = tmp_path / damage
    shutil.copytree(tiny_export.parent, folder)
    path = folder / tiny_export.name
    if damage == "corrupt":
        path.write_bytes(b"not an onnx file at all")
    elif damage == "edited":
        path.write_bytes(path.read_bytes() + b"\0")
    else:
        path.with_name(path.stem + ".manifest.json").unlink()
    before = _listing(folder)
    res = runner.invoke(app, ["run", str(path), "--synthetic-length", "32"])
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error:") and "re-export" in res.output and "Traceback" not in res.output
    assert _listing(folder) == before  # nothing written beside the file


def test_run_cli_backends_side_by_side_agree(tmp_path) -> None:
    """`edgeattn run` end to end on a tiny model with a tokenizer: every row continues the prompt alike."""
    import json

    from edgeattn.tiny import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "tiny", "gemma3", tokenizer=True)
    args = ["run", str(model_dir), "--backend", "torch,ort", "--synthetic-length", "150", "--budget", "256"]
    args += ["--chunk-size", "16", "--max-new-tokens", "4", "--json"]
    res = runner.invoke(app, args, env={"EDGEATTN_CACHE": str(tmp_path / "cache")})
    assert res.exit_code == 0, res.output
    report = json.loads(res.output[res.output.index("{") :])
    rows = {(r["backend"], r["attention"]): r for r in report["results"]}
    assert set(rows) == {
        ("transformers", "dense"),
        ("torch", "dense"),
        ("torch", "dhsa"),
        ("ort", "dense"),
        ("ort", "dhsa"),
    }
    assert len({tuple(r["token_ids"]) for r in rows.values()}) == 1  # budget >= L: DHSA is dense, on every backend
    for r in rows.values():
        assert r["prompt_tokens"] == 150 and r["new_tokens"] == 4 and r["prefill_steps"] == 1
        assert r["planned_peak_mib"] > 0 and r["peak_rss_mib"] > 0 and r["prefill_cpu_s"] > 0
    assert report["threads"] >= 1 and report["cpu"]


# ------------------------------------------------------------------ run ARTIFACT_DIR (a compiled model)


def test_run_a_compiled_artifact_folder_as_it_is(tmp_path) -> None:
    """`edgeattn run ARTIFACT_DIR` runs what `edgeattn compile` wrote, with the export's tokens; misuse is one line."""
    import json

    from edgeattn.export.exporter import export_model
    from edgeattn.runtime.tvm_compile import compile_artifact
    from edgeattn.tiny import save_tiny_model

    env = {"EDGEATTN_CACHE": str(tmp_path / "cache")}
    model_dir = save_tiny_model(tmp_path / "tiny", "gemma3", tokenizer=True)
    onnx_path = tmp_path / "tiny.onnx"
    export_model(str(model_dir), onnx_path, AttentionConfig(kind="dhsa", budget=48, chunk_size=16))
    artifact = compile_artifact(onnx_path, "x86-host", max_context=96).path
    common = ["--synthetic-length", "64", "--max-new-tokens", "3", "--json"]

    def rows(target: str) -> list[dict]:
        res = runner.invoke(app, ["run", target, *common], env=env)
        assert res.exit_code == 0, res.output
        return json.loads(res.output[res.output.index("{") : res.output.rindex("}") + 1])["results"]

    (got,) = rows(str(artifact))
    (ort,) = rows(str(onnx_path))
    assert (got["backend"], got["attention"]) == ("tvm", "dhsa") and ort["backend"] == "ort"
    assert got["token_ids"] == ort["token_ids"] and got["prompt_tokens"] == 64

    before = _listing(artifact)
    for args, message in [
        (["--backend", "ort"], "runs on --backend tvm only"),
        (["--synthetic-length", "94"], "compiled for at most 96 tokens"),
        (["--device", "arm64-emulated"], "is an artifact for this machine"),
    ]:
        res = runner.invoke(app, ["run", str(artifact), "--synthetic-length", "64", *args], env=env)
        assert res.exit_code == 2 and res.output.startswith("error:") and message in res.output, res.output
    (artifact / "params.bin").write_bytes(b"damaged")
    res = runner.invoke(app, ["run", str(artifact), "--synthetic-length", "64"], env=env)
    assert res.exit_code == 2 and "sha256" in res.output, res.output
    assert set(_listing(artifact)) == set(before)  # nothing written beside the artifact
