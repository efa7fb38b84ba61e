"""The next step compiles the export with TVM: the dense file and the DHSA file with its functions
inlined import with TVM 0.27's Relax ONNX frontend (dynamic shapes) and give ONNX Runtime's logits."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgeattn.config import AttentionConfig
from edgeattn.export import exporter, ops, tvm_import
from edgeattn.export.verify import OrtGemma
from edgeattn.models import LoadedModel
from edgeattn.tiny import tiny_model

pytest.importorskip("tvm")

# two layers (one sliding, one global) keep TVM's compile time short
TWO_LAYERS = {
    "gemma2": dict(num_hidden_layers=2),
    "gemma3": dict(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"]),
}


@pytest.mark.parametrize(
    "family, kind",
    # gemma2: softcapping inside the op; gemma3 DHSA differs from it only outside the op (slow)
    [("gemma3", "dense"), pytest.param("gemma3", "dhsa", marks=pytest.mark.slow), ("gemma2", "dhsa")],
)
def test_tvm_import_matches_onnxruntime(tmp_path, family, kind):
    cfg = AttentionConfig(kind=kind, budget=12, chunk_size=4, sinks=2)
    lm = LoadedModel(model=tiny_model(family, **TWO_LAYERS[family]), tokenizer=None, name=family, path=Path("."))
    res = exporter.export_loaded(lm, tmp_path / "m.onnx", cfg)
    model = onnx.load(str(res.onnx_path))
    prepared = tvm_import.prepare_for_tvm(model)
    assert not prepared.functions or not any(n.domain == ops.DOMAIN for n in prepared.graph.node)
    assert not any(n.domain == ops.DOMAIN for n in prepared.graph.node)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TVM renames inputs with dots
        vm = tvm_import.compile_cpu(tvm_import.import_onnx(model))
    names = [i.name for i in model.graph.input]
    sess = OrtGemma(res.onnx_path)
    rng = np.random.default_rng(0)
    # one compiled module serves prefill (odd length, empty cache) and a decode step (dynamic shapes)
    ids = rng.integers(0, 512, (1, 37))
    past = sess.empty_past(1)
    for step_ids in (ids, ids[:, -1:]):
        plen = next(iter(past.values())).shape[2]
        n = step_ids.shape[1]
        feed = {
            "input_ids": step_ids,
            "attention_mask": np.ones((1, plen + n), np.int64),
            "position_ids": np.arange(plen, plen + n)[None],
            **past,
        }
        expected = sess.session.run(None, feed)
        got = tvm_import.run(vm, [feed[name] for name in names])
        assert len(got) == len(expected)
        err = np.abs(got[0] - expected[0]).max() / np.abs(expected[0]).max()
        assert err < 1e-5, (family, kind, plen, err)
        for g, e in zip(got[1:], expected[1:], strict=True):  # present key/values too
            np.testing.assert_allclose(g, e, atol=1e-5)
        past = {name: expected[1 + i] for i, name in enumerate(sess.past_names)}


def test_constants_as_tensors_rewrites_attribute_constants():
    model = tvm_import.prepare_for_tvm(
        ops.single_op_model(
            ops.OP_SPARSE,
            [(n, t, None) for n, t in [("q", 1), ("k", 1), ("v", 1), ("boundaries", 7), ("sel", 7), ("nsel", 7)]],
            [("out", 1, None)],
            scaling=0.5,
            softcap=0.0,
            window=0,
            sinks=3,
        )
    )
    consts = [n for n in model.graph.node if n.op_type == "Constant"]
    assert consts and all(a.name == "value" for n in consts for a in n.attribute)
