"""The real default model (built-in Gemma 3 270M): one DHSA export shared by the module's tests."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from edgeattn import text
from edgeattn.config import AttentionConfig
from edgeattn.export import exporter, manifest, ops
from edgeattn.export.verify import OrtGemma, compare, torch_greedy, torch_reference, verify_export

pytestmark = pytest.mark.real_model

# chunks of 16 and a 64-token budget: at 101 tokens the selection really drops chunks
CFG = AttentionConfig(kind="dhsa", budget=64, chunk_size=16, sinks=4)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "gemma3-dhsa.onnx"
    result, loaded = exporter.export_model(None, out, CFG)
    return result, loaded


def test_file_checks_and_holds_the_custom_ops(exported):
    result, _ = exported
    onnx.checker.check_model(str(result.onnx_path), full_check=True)
    model = onnx.load(str(result.onnx_path), load_external_data=False)
    custom = [n for n in model.graph.node if n.domain == ops.DOMAIN]
    assert result.sparse_layers == [5, 11, 17]
    assert [n.op_type for n in custom] == [ops.OP_SELECT, ops.OP_SPARSE] * 3
    assert {f.name for f in model.functions} == {ops.OP_SELECT, ops.OP_SPARSE}
    assert manifest.check_files(result.manifest_path) == []
    assert result.manifest["model"]["model_type"] == "gemma3_text"


def test_logits_match_pytorch_on_odd_lengths(exported):
    result, loaded = exported
    model = torch_reference(loaded.model, CFG, result.sparse_layers)
    sess = OrtGemma(result.onnx_path)
    prompts = [
        np.random.default_rng(7).integers(0, model.config.vocab_size, (1, 37)),
        np.array([text.token_ids(loaded.tokenizer, 101)]),
    ]
    for ids in prompts:
        logits, _ = sess.step(ids, sess.empty_past(1))
        ref, _ = torch_greedy(model, torch.tensor(ids), 0)
        _, rel, agree = compare(logits, ref)
        assert rel <= 1e-4, (ids.shape, rel)
        assert agree == 1.0


def test_greedy_decode_matches_pytorch(exported):
    result, loaded = exported
    checks = verify_export(result.onnx_path, loaded, CFG, result.sparse_layers, prompt_tokens=101, decode_tokens=16)
    assert [c.prompt for c in checks] == ["random", "real"]
    for c in checks:
        assert c.decode_match, (c.prompt, c.onnx_tokens, c.torch_tokens)
        assert c.rel_err <= 1e-4 and c.top1_agree == 1.0
