"""Patching tiny random Gemma 2 (softcapping) and Gemma 3 models: same tests as the real model."""

from __future__ import annotations

import pytest
import torch

from edgeattn import dhsa, patching
from edgeattn.config import AttentionConfig, ConfigError
from edgeattn.tiny import tiny_model

FAMILIES = ["gemma2", "gemma3"]


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layers", ["global", "all"])
def test_full_budget_patch_equals_unpatched(family: str, layers: str) -> None:
    model = tiny_model(family)
    ids = torch.randint(0, model.config.vocab_size, (1, 53), generator=torch.Generator().manual_seed(1))
    ref = _logits(model, ids)
    ref_gen = model.generate(ids, max_new_tokens=6, do_sample=False)
    chosen = patching.patch(model, AttentionConfig(budget=64, chunk_size=8, sinks=2), layers)
    assert chosen == ([1, 3] if layers == "global" else [0, 1, 2, 3])
    out = _logits(model, ids)
    assert float((out - ref).norm() / ref.norm()) <= 1e-5
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), ref_gen)
    patching.unpatch(model)
    assert model.config._attn_implementation == ("eager" if family == "gemma2" else "sdpa")
    assert torch.equal(_logits(model, ids), ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_small_budget_changes_output_and_generates(family: str) -> None:
    model = tiny_model(family)
    ids = torch.randint(0, model.config.vocab_size, (1, 120), generator=torch.Generator().manual_seed(2))
    ref = _logits(model, ids)
    patching.patch(model, AttentionConfig(budget=24, chunk_size=8, sinks=2), "all")
    out = _logits(model, ids)
    assert not torch.allclose(out, ref, atol=1e-4), "a 24-token budget over 120 tokens must change something"
    gen = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert gen.shape == (1, 125)
    assert patching.layer_kinds(model) == ["dhsa"] * 4


def test_captured_gemma2_activations_carry_softcap_and_window() -> None:
    model = tiny_model("gemma2")
    ids = torch.randint(0, 512, (1, 41))
    with torch.inference_mode(), patching.capture_attention(model, "all") as calls:
        model(input_ids=ids)
    local, glob = calls[0][0], calls[1][0]
    assert local.softcap == 50.0 and local.window == 16 and glob.window is None
    for call in (local, glob):
        dense = dhsa.attention(
            call.q, call.k, call.v, AttentionConfig(kind="dense"), call.scaling, call.softcap, call.window
        )
        sparse = dhsa.attention(
            call.q, call.k, call.v, AttentionConfig(budget=41, chunk_size=8), call.scaling, call.softcap, call.window
        )
        assert float((sparse - dense).norm() / dense.norm()) <= 1e-5


def test_padded_batch_is_refused_with_a_clear_message() -> None:
    model = tiny_model("gemma3")
    patching.patch(model, AttentionConfig(budget=64, chunk_size=8), "global")
    ids = torch.randint(0, 512, (2, 30))
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :7] = 0
    with pytest.raises(NotImplementedError, match="batch size 1"):
        model(input_ids=ids, attention_mask=mask)


def test_unpadded_batch_works() -> None:
    model = tiny_model("gemma3")
    ids = torch.randint(0, 512, (2, 30))
    ref = _logits(model, ids)
    patching.patch(model, AttentionConfig(budget=64, chunk_size=8), "global")
    assert torch.allclose(_logits(model, ids), ref, atol=1e-5)


@pytest.mark.parametrize("spec", ["9", "1,x", "-1", ""])
def test_bad_layer_lists(spec: str) -> None:
    with pytest.raises(ConfigError, match="layer"):
        patching.parse_layers(spec, tiny_model("gemma3").config)
