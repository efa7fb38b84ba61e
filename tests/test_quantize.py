"""Quantized weights (export --weights int8/int4): the quantizer, the graph, ONNX Runtime, errors.

The strong check: ONNX Runtime on an int4/int8 export must equal PyTorch on the same tiny model
whose weights were replaced by their dequantized values -- that pins the packing, the block
layout, the tied table shared by the lookup and the LM head, and the padded last block.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from edgeattn.config import AttentionConfig, ConfigError
from edgeattn.export import exporter, quantize
from edgeattn.export.verify import OrtGemma, torch_reference
from edgeattn.models import LoadedModel
from edgeattn.tiny import save_tiny_model, tiny_model

SMALL = AttentionConfig(kind="dhsa", budget=12, chunk_size=4, sinks=2)
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def loaded(family: str = "gemma3", **overrides) -> LoadedModel:
    return LoadedModel(model=tiny_model(family, **overrides), tokenizer=None, name=f"tiny-{family}", path=Path("."))


def dequantized_copy(model, fmt: quantize.WeightFormat):
    """The model with every weight the export quantizes replaced by its dequantized value."""
    twin = copy.deepcopy(model)
    state = twin.state_dict()
    with torch.no_grad():
        for key, t in state.items():
            if key == "model.embed_tokens.weight" or key.endswith(tuple(f"{n}.weight" for n in LINEAR)):
                q = quantize.quantize_rows(t.float().numpy(), fmt)
                t.copy_(torch.from_numpy(q.dequantize()))
    return twin


def logits_of(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


# ------------------------------------------------------------------ the format and the quantizer


@pytest.mark.parametrize(
    ("kind", "group", "message"),
    [
        ("int3", None, "choose one of fp32, fp16, int8, int4"),
        ("int4", 48, "power of two >= 16"),
        ("int4", 8, "power of two >= 16"),
        ("fp16", 32, "applies to int8 and int4"),
    ],
)
def test_bad_weight_formats_are_refused(kind, group, message):
    with pytest.raises(ConfigError, match=message):
        quantize.weight_format(kind, group)


def test_defaults_and_labels():
    assert quantize.weight_format("int4").label == "int4-g32"
    assert quantize.weight_format("int8").label == "int8-g32"
    assert quantize.weight_format("int4", 64).group == 64
    assert not quantize.weight_format("fp16").quantized


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantize_rows_rounds_to_the_nearest_level(kind):
    fmt = quantize.weight_format(kind, 32)
    w = np.random.default_rng(0).standard_normal((24, 80)).astype(np.float32)  # K=80: a padded last block
    q = quantize.quantize_rows(w, fmt)
    assert q.packed.dtype == np.uint8 and q.packed.shape == (24, 3, 32 * fmt.bits // 8)
    assert q.scales.shape == (24, 3)
    err = np.abs(q.dequantize() - w).reshape(24, -1)
    step = np.repeat(np.abs(q.scales), 32, axis=1)[:, :80]
    # round to nearest: within half a step of the block's scale, but for a value that rounds to
    # 2**(bits-1) (the largest magnitude of the opposite sign to the block's extreme), clamped one level lower
    assert (err <= step + 1e-6).all()
    assert (err <= step / 2 + 1e-6).mean() > 0.97
    assert np.abs(q.dequantize() - w).max() > 0  # really quantized


# ------------------------------------------------------------------ the export in ONNX Runtime


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("attention", ["dense", "dhsa"])
def test_quantized_export_equals_the_dequantized_model(tmp_path, monkeypatch, family, kind, attention):
    # in float32 (accuracy level 0): the default quantizes the activations to int8 inside each matmul
    monkeypatch.setitem(quantize.ACCURACY_LEVEL, 8, 0)
    monkeypatch.setitem(quantize.ACCURACY_LEVEL, 4, 0)
    lm = loaded(family)
    cfg = SMALL.with_(kind=attention)
    fmt = quantize.weight_format(kind)
    res = exporter.export_loaded(lm, tmp_path / "m.onnx", cfg, all_logits=True, weights=fmt)
    onnx.checker.check_model(str(res.onnx_path), full_check=True)
    sess = OrtGemma(res.onnx_path)
    ids = np.random.default_rng(1).integers(0, 512, (1, 23))
    got, past = sess.step(ids, sess.empty_past(1))
    want = logits_of(torch_reference(dequantized_copy(lm.model, fmt), cfg, res.sparse_layers), ids)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
    if attention != "dense":
        return  # a DHSA decode step selects for one query, a prefill for a query chunk: not the same row
    # a decode step through the KV cache agrees too
    nxt = np.array([[int(got[0, -1].argmax())]])
    got2, _ = sess.step(nxt, past)
    want2 = logits_of(
        torch_reference(dequantized_copy(lm.model, fmt), cfg, res.sparse_layers), np.concatenate([ids, nxt], 1)
    )
    assert np.abs(got2[0, -1] - want2[0, -1]).max() / np.abs(want2).max() < 1e-4


def test_graph_stores_every_weight_quantized_and_the_tied_table_once(tmp_path):
    lm = loaded("gemma3")
    fmt = quantize.weight_format("int4")
    res = exporter.export_loaded(lm, tmp_path / "m.onnx", SMALL, weights=fmt)
    model = onnx.load(str(res.onnx_path))
    ops = [n.op_type for n in model.graph.node if n.domain == quantize.MS_DOMAIN]
    layers = lm.model.config.num_hidden_layers
    assert ops.count("MatMulNBits") == 7 * layers + 1  # every projection and the LM head
    assert ops.count("GatherBlockQuantized") == 1
    assert not [
        n
        for n in model.graph.node
        if n.op_type in ("MatMul", "Gemm") and n.input[1] in {t.name for t in model.graph.initializer}
    ]
    table = [t for t in model.graph.initializer if t.name.startswith("model.embed_tokens")]
    assert sorted(t.name for t in table) == [  # the lookup's zero points are one byte per block, unpacked
        "model.embed_tokens.weight.block_zero_points",
        "model.embed_tokens.weight.q4",
        "model.embed_tokens.weight.scales",
        "model.embed_tokens.weight.zero_points",
    ]
    head = [n for n in model.graph.node if n.op_type == "MatMulNBits"][-1]
    gather = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    assert head.input[1] == gather.input[0] == "model.embed_tokens.weight.q4"
    big_floats = [
        t.name
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT
        and np.prod(t.dims) > lm.model.config.hidden_size
        and not t.name.endswith(".scales")
    ]
    assert big_floats == []
    info = res.manifest["onnx"]
    assert info["weights"] == {"kind": "int4", "group": 32, "bits": 4}
    assert "shared with the LM head" in info["precision"]["embedding"]
    fp32 = exporter.export_loaded(lm, tmp_path / "f.onnx", SMALL).manifest["onnx"]["weight_bytes"]
    assert info["weight_bytes"] < 0.3 * fp32


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_segmented_run_on_the_kernels_equals_the_whole_file(tmp_path, monkeypatch, kind):
    """The ort backend cuts the file at the ai.edgeattn nodes; quantized weights survive the cut.

    At accuracy level 0 (fp32 arithmetic on the dequantized weights): the shipped level 4 quantizes
    the activations to int8, where the ~1e-7 gap between the TVM kernel and the function body can
    flip a rounding and move a later layer's K/V by 0.3 % (seen with int8 on an AVX512-VNNI Xeon).
    """
    from edgeattn.runtime import ort_backend

    monkeypatch.setitem(quantize.ACCURACY_LEVEL, 8, 0)
    monkeypatch.setitem(quantize.ACCURACY_LEVEL, 4, 0)
    lm = loaded("gemma3")
    res = exporter.export_loaded(lm, tmp_path / "m.onnx", SMALL, weights=quantize.weight_format(kind))
    ids = np.random.default_rng(2).integers(0, 512, 30).tolist()
    whole = ort_backend.open_session(res.onnx_path, kernels="reference", threads=1)
    cut = ort_backend.open_session(res.onnx_path, kernels="tvm", threads=1)
    a, b = whole.append(ids), cut.append(ids)
    assert np.abs(a - b).max() / np.abs(a).max() < 1e-4
    a, b = whole.append([int(a.argmax())]), cut.append([int(b.argmax())])
    assert np.abs(a - b).max() / np.abs(a).max() < 1e-4


# ------------------------------------------------------------------ bad input


def test_quantized_weights_need_float32_activations(tmp_path):
    with pytest.raises(exporter.ExportError, match="float32 activations"):
        exporter.export_loaded(
            loaded(), tmp_path / "m.onnx", SMALL, dtype="float16", weights=quantize.weight_format("int4")
        )
    assert list(tmp_path.iterdir()) == []


def test_fp16_weights_write_a_float16_graph(tmp_path):
    res = exporter.export_loaded(loaded(), tmp_path / "m.onnx", SMALL, weights=quantize.weight_format("fp16"))
    assert res.manifest["onnx"]["dtype"] == "float16"
    assert res.manifest["onnx"]["weights"]["kind"] == "fp16"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--weights", "int2"], "choose one of fp32, fp16, int8, int4"),
        (["--weights", "int4", "--group-size", "24"], "power of two"),
        (["--weights", "fp32", "--group-size", "32"], "applies to int8 and int4"),
        (["--weights", "int8", "--dtype", "float16"], "float32 activations"),
    ],
)
def test_cli_refuses_bad_weight_options_and_writes_nothing(tmp_path, args, message):
    import typer

    from edgeattn.export.cli import export_command

    app = typer.Typer()
    app.command()(export_command)
    model_dir = save_tiny_model(tmp_path / "g3", "gemma3")
    out = tmp_path / "out"
    out.mkdir()
    r = CliRunner().invoke(app, [str(model_dir), "-o", str(out / "m.onnx"), *args])
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert list(out.iterdir()) == []


# ------------------------------------------------------------------ GGUF blocks carried over exactly


def _tiny_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, object]]) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), "gemma3")
    for name, (w, qtype) in tensors.items():
        raw = gguf.quants.quantize(w, qtype)
        writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_blocks_equal_what_gguf_dequantizes(tmp_path):
    import gguf

    from edgeattn.export import gguf_weights

    rng = np.random.default_rng(0)
    T = gguf.GGMLQuantizationType
    path = _tiny_gguf(
        tmp_path / "t.gguf",
        {
            "token_embd.weight": (rng.standard_normal((48, 64)).astype(np.float32), T.Q8_0),
            "blk.0.attn_q.weight": (rng.standard_normal((32, 64)).astype(np.float32), T.Q5_0),
            "blk.0.ffn_down.weight": (rng.standard_normal((16, 64)).astype(np.float32), T.Q4_0),
            "blk.0.attn_norm.weight": (rng.standard_normal((1, 64)).astype(np.float32), T.F32),
        },
    )
    src = gguf_weights.open_gguf(path)
    assert sorted(src.tensors) == [
        "model.embed_tokens.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.self_attn.q_proj.weight",
    ]
    for key in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"):
        t = src.tensors[key]
        q = src.block(key)
        assert (q.bits, q.group, q.zero_points) == (8, 32, None)
        ref = gguf.quants.dequantize(t.data, gguf.GGMLQuantizationType[t.type_name]).reshape(q.n, q.k)
        np.testing.assert_array_equal(q.dequantize(), ref)
    with pytest.raises(ConfigError, match=r"blk\.0\.ffn_down\.weight is Q4_0, which has no MatMulNBits mapping"):
        src.block("model.layers.0.mlp.down_proj.weight")


@pytest.mark.parametrize("content", [b"", b"GGUF\x03\x00\x00\x00" + b"\xff" * 20, b"not a gguf at all"])
def test_a_damaged_gguf_is_refused_clearly(tmp_path, content):
    from edgeattn.export import gguf_weights

    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match="is not a readable GGUF file"):
        gguf_weights.open_gguf(path)


def test_weights_gguf_needs_a_gguf_model(tmp_path):
    with pytest.raises(exporter.ExportError, match="did not come from a GGUF file"):
        exporter.export_loaded(loaded(), tmp_path / "m.onnx", SMALL, weights=quantize.weight_format("gguf"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.real_model
def test_each_block_type_of_the_built_in_gguf_converts_exactly(real_model):
    """Q4_K, Q5_0, Q6_K and Q8_0 from the built-in Q4_K_M file, against gguf-py's dequantize of the same bytes."""
    import gguf

    from edgeattn import models
    from edgeattn.export import gguf_weights

    src = gguf_weights.open_gguf(models.gguf_source(real_model.path))
    assert len(src.tensors) == 7 * real_model.model.config.num_hidden_layers + 1  # + the table
    first: dict[str, str] = {}
    for key, t in src.tensors.items():
        if key != "model.embed_tokens.weight":  # the 262K-row table is the slow one; Q8_0 appears in layers too
            first.setdefault(t.type_name, key)
    assert sorted(first) == ["Q4_K", "Q5_0", "Q6_K", "Q8_0"]
    for key in first.values():
        t = src.tensors[key]
        q = src.block(key)
        ref = gguf.quants.dequantize(t.data, gguf.GGMLQuantizationType[t.type_name]).reshape(q.n, q.k)
        assert np.abs(q.dequantize() - ref).max() <= 1e-6 * np.abs(ref).max(), key
        # and the file's values are the model's: the converted fp32 weights came from the same bytes
        np.testing.assert_allclose(q.dequantize(), real_model.model.state_dict()[key].numpy(), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def prose(real_model):
    from edgeattn.evals import weights

    ids = weights.prose_ids(real_model)
    return ids, weights.fp32_logits(real_model, ids)


@pytest.mark.real_model
@pytest.mark.parametrize(("kind", "agreement"), [("gguf", 0.95), ("int8", 0.95)])
def test_quantized_real_model_agrees_with_fp32(tmp_path, real_model, prose, kind, agreement):
    """The issue's measure: 512 positions of prose, top-1 agreement with fp32 (int4: benchmarks/quant.py)."""
    from edgeattn.evals import weights

    ids, reference = prose
    res = exporter.export_loaded(
        real_model,
        tmp_path / "m.onnx",
        AttentionConfig(kind="dense"),
        all_logits=True,
        weights=quantize.weight_format(kind),
    )
    got = weights.compare(kind, weights.export_logits(res.onnx_path, ids), reference, ids)
    assert got.positions == 512
    # gguf's weights are bit-exact; its 8-bit matmuls quantize the activations (export/QUANT.md)
    assert got.top1_agreement >= agreement, got.to_dict()
    assert abs(got.perplexity_increase) < 0.02, got.to_dict()
    if kind == "gguf":
        assert res.manifest["onnx"]["weight_bytes"] < 0.3 * 4 * real_model.model.num_parameters()


# ------------------------------------------------------------------ edgeattn run --weights


def _run_cli(args: list[str], tmp_path: Path):
    from edgeattn.cli import app

    return CliRunner().invoke(app, ["run", *args], env={"EDGEATTN_CACHE": str(tmp_path / "cache")})


def test_run_with_int8_weights_reports_weight_and_kv_bytes(tmp_path):
    """The ort rows run the int8 export: the report's weights column is its bytes, not fp32's."""
    import json

    model_dir = save_tiny_model(tmp_path / "tiny", "gemma3", tokenizer=True)
    args = [str(model_dir), "--backend", "ort", "--weights", "int8", "--group-size", "32", "--no-shipped"]
    res = _run_cli(args + ["--synthetic-length", "80", "--max-new-tokens", "3", "--budget", "32", "--json"], tmp_path)
    assert res.exit_code == 0, res.output
    report = json.loads(res.output[res.output.index("{") : res.output.rindex("}") + 1])
    assert report["weights"] == "int8-g32"
    (export,) = (tmp_path / "cache" / "onnx").glob("*dense*int8-g32*/model.onnx")
    weight_bytes = json.loads(export.with_name("model.manifest.json").read_text())["onnx"]["weight_bytes"]
    fp32_bytes = 4 * sum(p.numel() for p in tiny_model("gemma3").parameters())
    for row in report["results"]:
        assert row["backend"] == "ort" and len(row["token_ids"]) == 3
        assert row["weights_mib"] == pytest.approx(weight_bytes / 2**20)
        assert row["weights_mib"] < 0.45 * fp32_bytes / 2**20
        assert row["kv_cache_mib"] > 0 and row["resident_mib"] > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--weights", "int4"], "add --backend ort"),
        (["--weights", "int4", "--backend", "tvm"], "no dequantize+matmul kernels"),
        (["--weights", "int4", "--backend", "ort", "--group-size", "20"], "power of two"),
        (["--weights", "q4"], "choose one of fp32, fp16, int8, int4, gguf"),
    ],
)
def test_run_refuses_weights_it_cannot_honour(tmp_path, args, message):
    model_dir = save_tiny_model(tmp_path / "tiny", "gemma3", tokenizer=True)
    res = _run_cli([str(model_dir), *args, "--synthetic-length", "40"], tmp_path)
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert not (tmp_path / "cache" / "onnx").exists()  # refused before anything was exported


def test_compile_refuses_a_quantized_export(tmp_path):
    from edgeattn.runtime.tvm_compile import CompileError, compile_artifact

    res = exporter.export_loaded(loaded(), tmp_path / "m.onnx", SMALL, weights=quantize.weight_format("int4"))
    with pytest.raises(CompileError, match="run it with --backend ort"):
        compile_artifact(res.onnx_path, "x86-host", out_dir=tmp_path / "art")
    assert not (tmp_path / "art").exists()
