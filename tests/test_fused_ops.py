"""The fused elementwise kernels (GELU-gated MLP, RMSNorm, RoPE) give transformers' results, and unpatch restores it."""

from __future__ import annotations

import pytest
import torch

from edgeattn import fused_ops
from edgeattn.tiny import tiny_model

pytest.importorskip("tvm")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _logits_before_and_patched(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits as it is, then with the fused ops (unpatched again afterwards)."""
    with torch.inference_mode():
        ref = model(input_ids=ids).logits
        fused_ops.patch(model)
        try:
            return ref, model(input_ids=ids).logits
        finally:
            fused_ops.unpatch(model)


@pytest.mark.parametrize("width", [37, 64])  # 37: the vector tail
def test_kernels_match_the_torch_ops(width: int) -> None:
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm, apply_rotary_pos_emb

    from edgeattn.kernels_tvm import elementwise

    target, lanes = fused_ops._target()
    torch.manual_seed(width)
    gate, up = torch.randn(13, width) * 3, torch.randn(13, width)
    out = torch.empty_like(gate)
    elementwise.kernel("gelu_mul", target, lanes, width=width)(*map(fused_ops._tvm, (gate, up, out)))
    assert _rel(out, torch.nn.functional.gelu(gate, approximate="tanh") * up) < 1e-6

    norm = Gemma3RMSNorm(width, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(13, width) * 5
    elementwise.kernel("rms_norm", target, lanes, width=width, eps=1e-6)(*map(fused_ops._tvm, (x, norm.weight, out)))
    with torch.no_grad():
        assert _rel(out, norm(x)) < 1e-6

    d = 2 * width
    q = torch.randn(2, 11, 3, d).transpose(1, 2)  # [B, H, L, D] viewing the projection's [B, L, H, D]
    k = torch.randn(2, 11, 1, d).transpose(1, 2)
    cos, sin = torch.randn(2, 11, d), torch.randn(2, 11, d)
    token = fused_ops._inside_patched.set(True)  # as inside a patched model's forward
    try:
        got = fused_ops._rope(apply_rotary_pos_emb)(q, k, cos, sin)
    finally:
        fused_ops._inside_patched.reset(token)
    for a, b in zip(got, apply_rotary_pos_emb(q, k, cos, sin), strict=True):
        assert a.is_contiguous() and _rel(a, b) < 1e-6  # written as the attention kernels read it


@pytest.mark.parametrize("family", ["gemma3", "gemma2"])
def test_patched_model_gives_the_same_logits_and_unpatch_restores_it(family: str) -> None:
    model = tiny_model(family)
    ids = torch.randint(0, 500, (1, 77), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = model(input_ids=ids).logits
        per_layer = 7 if family == "gemma3" else 5  # 4 norms, the MLP; Gemma 3 adds q/k norms
        assert fused_ops.patch(model) == per_layer * model.config.num_hidden_layers + 1  # + the final norm
        got = model(input_ids=ids).logits
        fused_ops.unpatch(model)
        back = model(input_ids=ids).logits
    assert _rel(got, ref) < 1e-5
    assert torch.equal(back, ref)
    assert not any("forward" in vars(m) for m in model.modules())


def test_other_dtypes_fall_through_to_transformers() -> None:
    model = tiny_model("gemma3").to(torch.bfloat16)
    ids = torch.randint(0, 500, (1, 19), generator=torch.Generator().manual_seed(2))
    ref, got = _logits_before_and_patched(model, ids)
    assert torch.equal(got, ref)


def test_rope_stays_transformers_own_outside_a_patched_model() -> None:
    """RoPE is one module-level function for every model: a model as shipped beside a patched one keeps it."""
    patched, shipped = tiny_model("gemma3"), tiny_model("gemma3", seed=1)
    ids = torch.randint(0, 500, (2, 23), generator=torch.Generator().manual_seed(3))  # batch 2: cos is batch 1
    with torch.inference_mode():
        ref = shipped(input_ids=ids).logits
        fused_ops.patch(patched)
        try:
            beside = shipped(input_ids=ids).logits
            got = patched(input_ids=ids).logits
        finally:
            fused_ops.unpatch(patched)
        back = patched(input_ids=ids).logits
    assert torch.equal(beside, ref)
    assert _rel(got, back) < 1e-5


def test_weights_sliced_from_one_buffer_still_take_the_fused_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loaded checkpoints hold weights as slices of one buffer, rarely 64-byte aligned: the norms must not fall back."""
    from edgeattn.kernels_tvm import elementwise

    model = tiny_model("gemma3")
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            w = module.weight.detach()
            module.weight = torch.nn.Parameter(torch.cat([torch.zeros(1), w])[1:])  # 4 bytes off alignment
    used: list[str] = []
    kernel = elementwise.kernel
    monkeypatch.setattr(elementwise, "kernel", lambda name, *a, **k: used.append(name) or kernel(name, *a, **k))
    ids = torch.randint(0, 500, (1, 21), generator=torch.Generator().manual_seed(4))
    ref, got = _logits_before_and_patched(model, ids)
    layers = model.config.num_hidden_layers
    assert used.count("rms_norm") == 6 * layers + 1 and used.count("rope") == 2 * layers
    assert _rel(got, ref) < 1e-5
