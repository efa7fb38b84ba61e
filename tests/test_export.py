"""edgeattn export on tiny random Gemma 2 (softcapping) / Gemma 3 models: graph, numerics, files, errors, CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import typer
from typer.testing import CliRunner

from edgeattn import patching
from edgeattn.config import AttentionConfig
from edgeattn.errors import UnsupportedModelError
from edgeattn.export import exporter, graph, manifest, ops
from edgeattn.export.cli import export_command
from edgeattn.export.verify import OrtGemma, compare, torch_reference, verify_export
from edgeattn.models import LoadedModel
from edgeattn.tiny import save_tiny_model, tiny_model

SMALL = AttentionConfig(kind="dhsa", budget=12, chunk_size=4, sinks=2)


def loaded(family: str, **overrides) -> LoadedModel:
    return LoadedModel(model=tiny_model(family, **overrides), tokenizer=None, name=f"tiny-{family}", path=Path("."))


def export_tiny(tmp_path: Path, family: str, cfg: AttentionConfig, name: str = "m.onnx", **kw):
    lm = loaded(family)
    res = exporter.export_loaded(lm, tmp_path / name, cfg, **kw)
    return lm, res


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
@pytest.mark.parametrize("kind", ["dense", "dhsa", "block-sparse"])
def test_tiny_export_matches_pytorch(tmp_path, family, kind):
    cfg = SMALL.with_(kind=kind)
    lm, res = export_tiny(tmp_path, family, cfg, all_logits=True)
    onnx.checker.check_model(str(res.onnx_path), full_check=True)
    model = onnx.load(str(res.onnx_path))
    custom = [n for n in model.graph.node if n.domain == ops.DOMAIN]
    expected_layers = [] if kind == "dense" else patching.parse_layers("global", lm.model.config)
    assert res.sparse_layers == expected_layers
    assert [n.op_type for n in custom] == [ops.OP_SELECT, ops.OP_SPARSE] * len(expected_layers)
    if custom:
        assert {f.name for f in model.functions} == {ops.OP_SELECT, ops.OP_SPARSE}
        assert all(len(f.node) > 20 for f in model.functions)  # real bodies
    ref_model = torch_reference(lm.model, cfg, expected_layers)
    sess = OrtGemma(res.onnx_path)
    for length in (37, 61):  # odd lengths, longer than the sliding window (16) and many chunks
        ids = np.random.default_rng(length).integers(0, 512, (1, length))
        logits, _ = sess.step(ids, sess.empty_past(1))
        _, rel, agree = compare(logits, torch_logits(ref_model, ids))
        assert rel <= 1e-4, (family, kind, length, rel)
        assert agree == 1.0


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_greedy_decode_with_kv_cache_matches_pytorch(tmp_path, family):
    lm, res = export_tiny(tmp_path, family, SMALL)
    checks = verify_export(res.onnx_path, lm, SMALL, res.sparse_layers, prompt_tokens=41, decode_tokens=16)
    (check,) = checks  # no tokenizer: random prompt only
    assert check.decode_match, (check.onnx_tokens, check.torch_tokens)
    assert len(check.onnx_tokens) == 16
    assert check.rel_err <= 1e-4


def test_dynamic_batch_and_padding_in_dense_layers(tmp_path):
    lm, res = export_tiny(tmp_path, "gemma3", AttentionConfig(kind="dense"), all_logits=True)
    sess = OrtGemma(res.onnx_path)
    ids = np.random.default_rng(0).integers(0, 512, (3, 23))
    mask = np.ones((3, 23), np.int64)
    mask[1, :5] = 0  # left padding of the second sequence
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **sess.empty_past(3)}
    logits = sess.session.run(["logits"], feed)[0]
    with torch.no_grad():
        ref = lm.model(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)
        ).logits.numpy()
    real = mask.astype(bool)
    rel = np.abs(logits - ref)[real].max() / np.abs(ref[real]).max()
    assert rel <= 1e-4


def test_last_position_logits_and_cache_shapes(tmp_path):
    lm, res = export_tiny(tmp_path, "gemma2", SMALL)
    sess = OrtGemma(res.onnx_path)
    ids = np.random.default_rng(1).integers(0, 512, (2, 19))
    logits, past = sess.step(ids, sess.empty_past(2))
    assert logits.shape == (2, 1, 512)
    assert past["past_key_values.0.key"].shape == (2, 2, 19, 16)
    logits2, past2 = sess.step(ids[:, :1], past)  # a decode step on top of the cache
    assert logits2.shape == (2, 1, 512) and past2["past_key_values.3.value"].shape == (2, 2, 20, 16)


def test_boundaries_as_graph_input(tmp_path):
    """The DHSA layers can take boundaries from a graph input (the seam for adaptive chunking)."""
    lm = loaded("gemma3")
    layers = patching.parse_layers("global", lm.model.config)
    proto = graph.build_onnx(lm.model, graph.GraphSpec(cfg=SMALL, sparse_layers=layers, boundaries_input=True))
    onnx.checker.check_model(proto, full_check=True)
    path = tmp_path / "b.onnx"
    onnx.save_model(proto, path)
    sess = OrtGemma(path)
    ids = np.random.default_rng(2).integers(0, 512, (1, 29))
    feed = {
        "input_ids": ids,
        "attention_mask": np.ones((1, 29), np.int64),
        "position_ids": np.arange(29)[None],
        "dhsa_boundaries": np.array([0, 4, 8, 12, 16, 20, 24, 28, 29]),  # = fixed chunks of 4
        **sess.empty_past(1),
    }
    logits = sess.session.run(["logits"], feed)[0]
    ref = torch_logits(torch_reference(lm.model, SMALL, layers), ids)[:, -1:]
    assert np.abs(logits - ref).max() / np.abs(ref).max() <= 1e-4


def test_layers_all_and_list(tmp_path):
    _, res = export_tiny(tmp_path, "gemma3", SMALL, layers="all")
    assert res.sparse_layers == [0, 1, 2, 3]
    kinds = [row["attention"] for row in res.manifest["layers"]]
    assert kinds == ["dhsa"] * 4
    assert res.manifest["layers"][0]["window"] == 16  # sliding layers keep their window inside the op
    _, res = export_tiny(tmp_path, "gemma3", SMALL, name="l.onnx", layers="3")
    assert res.sparse_layers == [3]
    with pytest.raises(exporter.ExportError, match="out of range"):
        export_tiny(tmp_path, "gemma3", SMALL, name="x.onnx", layers="9")
    assert not (tmp_path / "x.onnx").exists()


def test_sliding_layers_as_dhsa_match_pytorch_in_prefill(tmp_path):
    """--layers all: the sliding layers run the ops with their window (prefill; see OPS.md for decode)."""
    lm, res = export_tiny(tmp_path, "gemma2", SMALL, layers="all", all_logits=True)
    sess = OrtGemma(res.onnx_path)
    ids = np.random.default_rng(5).integers(0, 512, (1, 45))
    logits, _ = sess.step(ids, sess.empty_past(1))
    _, rel, _ = compare(logits, torch_logits(torch_reference(lm.model, SMALL, res.sparse_layers), ids))
    assert rel <= 1e-4


def test_manifest_records_config_layers_and_hashes(tmp_path):
    _, res = export_tiny(tmp_path, "gemma2", SMALL)
    data = manifest.read_manifest(res.manifest_path)
    assert res.manifest_path.name == "m.manifest.json"
    assert data["model"]["model_type"] == "gemma2"
    assert data["attention"]["budget"] == 12 and data["attention"]["chunk_size"] == 4
    assert data["onnx"]["opset"] == 18 and data["onnx"]["custom_domain"] == "ai.edgeattn"
    assert [r["attention"] for r in data["layers"]] == ["dense", "dhsa", "dense", "dhsa"]
    assert data["files"]["m.onnx"]["sha256"] == manifest.sha256_file(res.onnx_path)
    assert manifest.check_files(res.manifest_path) == []
    res.onnx_path.write_bytes(res.onnx_path.read_bytes() + b"x")
    assert manifest.check_files(res.manifest_path) == ["m.onnx"]


def test_external_data(tmp_path):
    lm, res = export_tiny(tmp_path, "gemma3", AttentionConfig(kind="dense"), external_data=True)
    assert res.data_path == tmp_path / "m.onnx.data" and res.data_path.stat().st_size > 500_000
    assert res.onnx_path.stat().st_size < 200_000
    assert set(res.manifest["files"]) == {"m.onnx", "m.onnx.data"}
    onnx.checker.check_model(str(res.onnx_path), full_check=True)
    sess = OrtGemma(res.onnx_path)
    ids = np.random.default_rng(3).integers(0, 512, (1, 9))
    logits, _ = sess.step(ids, sess.empty_past(1))
    ref = torch_logits(lm.model, ids)[:, -1:]
    assert np.abs(logits - ref).max() / np.abs(ref).max() <= 1e-4


def test_float16_export_runs(tmp_path):
    lm, res = export_tiny(tmp_path, "gemma3", SMALL, dtype="float16")
    model = onnx.load(str(res.onnx_path))
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    sess = OrtGemma(res.onnx_path)
    ids = np.random.default_rng(4).integers(0, 512, (1, 21))
    logits, _ = sess.step(ids, sess.empty_past(1))
    ref = torch_logits(torch_reference(lm.model, SMALL, res.sparse_layers), ids)[:, -1:]
    assert np.abs(logits.astype(np.float32) - ref).max() / np.abs(ref).max() < 2e-2


# ------------------------------------------------------------------ bad input


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "m.onnx"
    out.write_text("old")
    with pytest.raises(exporter.OutputExistsError, match="--force"):
        export_tiny(tmp_path, "gemma3", SMALL)
    assert out.read_text() == "old" and _leftovers(tmp_path) == ["m.onnx"]
    _, res = export_tiny(tmp_path, "gemma3", SMALL, force=True)
    onnx.checker.check_model(str(res.onnx_path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_output(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(exporter.OutputNotWritableError, match="not writable"):
            export_tiny(ro, "gemma3", SMALL)
    finally:
        ro.chmod(0o700)


def test_output_folder_that_refuses_files():
    with pytest.raises(exporter.OutputNotWritableError, match="cannot create files|not writable"):
        exporter.check_output(Path("/proc/edgeattn-test.onnx"), force=False)


def test_missing_output_folder_and_bad_suffix(tmp_path):
    with pytest.raises(exporter.OutputNotWritableError, match="does not exist"):
        exporter.check_output(tmp_path / "nope" / "m.onnx", force=False)
    with pytest.raises(exporter.ExportError, match=r"\.onnx"):
        exporter.check_output(tmp_path / "m.bin", force=False)


def test_unsupported_architecture(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    lm = LoadedModel(model=LlamaForCausalLM(cfg), tokenizer=None, name="tiny-llama", path=Path("."))
    with pytest.raises(UnsupportedModelError, match="Gemma 2 and Gemma 3"):
        exporter.export_loaded(lm, tmp_path / "m.onnx", SMALL)
    assert _leftovers(tmp_path) == []


def test_model_that_fails_to_write_leaves_nothing(tmp_path, monkeypatch):
    lm = loaded("gemma3")
    lm.model.model.layers[1].self_attn.q_proj.weight.data = torch.zeros(3, 3)  # a broken checkpoint
    with pytest.raises(exporter.ExportError):
        exporter.export_loaded(lm, tmp_path / "m.onnx", SMALL)
    assert _leftovers(tmp_path) == []


def test_failure_while_saving_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save_model", boom)
    with pytest.raises(OSError, match="disk full"):
        export_tiny(tmp_path, "gemma3", SMALL)
    assert _leftovers(tmp_path) == []


def test_adaptive_chunking_is_refused_clearly(tmp_path):
    cfg = SMALL.with_(chunking="shift", min_chunk=2, max_chunk=8, budget=16)
    with pytest.raises(exporter.ExportError, match="--chunking fixed"):
        export_tiny(tmp_path, "gemma3", cfg)
    assert _leftovers(tmp_path) == []


# ------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    app = typer.Typer()
    app.command("export")(export_command)

    @app.command("other")
    def other() -> None:  # a second command keeps typer from collapsing the app into one command
        pass

    return app


def test_cli_help_teaches(app):
    result = CliRunner().invoke(app, ["export", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for word in ("ai.edgeattn", "DHSAChunkSelect", "--budget", "--chunking", "--verify", "--force", "manifest"):
        assert word in result.output


def test_cli_exports_and_verifies(app, tmp_path):
    model_dir = save_tiny_model(tmp_path / "g2", "gemma2")
    out = tmp_path / "out.onnx"
    args = ["export", str(model_dir), "-o", str(out), "--budget", "12", "--chunk-size", "4", "--sinks", "2"]
    result = CliRunner().invoke(app, args + ["--verify", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout[result.stdout.index("{") :])
    assert payload["sparse_layers"] == [1, 3]
    (check,) = payload["verify"]
    assert check["decode_match"] and check["rel_err"] <= 1e-4
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "--force" in again.output


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--attention", "sparse"], "choose one of dense, dhsa, block-sparse"),
        (["--chunking", "magic"], "choose one of fixed, shift, predictor"),
        (["--budget", "3"], "--budget"),
        (["--dtype", "int8"], "float32, float16"),
        (["--chunking", "predictor"], "--chunking fixed"),
    ],
)
def test_cli_bad_options(app, tmp_path, extra, message):
    model_dir = save_tiny_model(tmp_path / "g3", "gemma3")
    result = CliRunner().invoke(app, ["export", str(model_dir), "-o", str(tmp_path / "m.onnx"), *extra])
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "m.onnx").exists()


def test_cli_missing_model(app, tmp_path):
    result = CliRunner().invoke(app, ["export", str(tmp_path / "nowhere"), "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2 and "not found" in result.output
