"""Run a Gemma model's MLP activation, RMSNorms and RoPE on fused TVM kernels (kernels_tvm/elementwise.py).

The torch backend on our kernels puts attention on TIR kernels; this puts the elementwise
chain around it there too, so that a prefill spends its time in GEMMs and attention.  It
swaps instance ``forward`` methods (and Gemma's module-level ``apply_rotary_pos_emb``) and
restores them on :func:`unpatch`: the model as shipped stays available in the same process.
Anything outside the fused kernels' contract (other dtypes, strides, activations) falls
through to the original code, so the patch never changes what is computed -- only where.
"""

from __future__ import annotations

import contextvars
import functools
import types
import weakref
from collections.abc import Callable
from typing import Any

import torch

_PATCHED_ATTR = "edgeattn_fused_ops"
_MARK = "edgeattn_fused_forward"  # set on each module whose forward this module replaced
_ROPE_HOSTS = ("transformers.models.gemma3.modeling_gemma3", "transformers.models.gemma2.modeling_gemma2")
_original_rope: dict[str, Callable[..., Any]] = {}
# RoPE is a module-level function, shared by every Gemma model in the process: the fused one
# applies only inside the forward of a patched model (the model as shipped keeps transformers')
_inside_patched = contextvars.ContextVar("edgeattn_inside_patched_model", default=False)
_patched_models: weakref.WeakSet[Any] = weakref.WeakSet()
ENV_SWITCH = "EDGEATTN_FUSED_OPS"


def enabled() -> bool:
    """Off with EDGEATTN_FUSED_OPS=0: benchmarks/prefill.py measures the gain with it."""
    import os

    return os.environ.get(ENV_SWITCH, "1") != "0"


@functools.cache
def _target() -> tuple[Any, int]:
    """This machine's target and vector width, resolved once: every fused call asks (~160 per decode
    step), and resolving takes ~0.26 ms -- 40 ms a token if done per call."""
    from edgeattn.kernels_tvm import registry
    from edgeattn.kernels_tvm.schedule import target_lanes

    target = registry.resolve_target(None)
    return target, target_lanes(target)


def _tvm(x: torch.Tensor) -> Any:
    from edgeattn.kernels_tvm.registry import as_tvm

    return as_tvm(x)


def _fits(*tensors: torch.Tensor) -> bool:
    """float32, on the CPU, contiguous and 64-byte aligned: what the kernels take without a copy."""
    from edgeattn.kernels_tvm.registry import is_aligned

    return all(t.dtype == torch.float32 and t.device.type == "cpu" and is_aligned(t) for t in tensors)


def _gelu_mul(module: Any, x: torch.Tensor) -> torch.Tensor:
    from edgeattn.kernels_tvm import elementwise

    gate, up = module.gate_proj(x), module.up_proj(x)
    if not _fits(gate, up):
        return module.down_proj(module.act_fn(gate) * up)
    target, lanes = _target()
    width = gate.shape[-1]
    out = torch.empty_like(gate)
    fn = elementwise.kernel("gelu_mul", target, lanes, width=width)
    fn(_tvm(gate.view(-1, width)), _tvm(up.view(-1, width)), _tvm(out.view(-1, width)))
    return module.down_proj(out)


def _rms_norm(module: Any, x: torch.Tensor) -> torch.Tensor:
    from edgeattn.kernels_tvm import elementwise

    width = x.shape[-1]
    # q/k arrive as [B, H, L, D] views of the projection's [B, L, H, D]: normalise that storage
    storage = x.transpose(1, 2) if x.dim() == 4 and not x.is_contiguous() else x
    weight = module.edgeattn_weight  # an aligned copy: loaded weights are slices of one buffer, rarely 64-byte aligned
    if not _fits(storage, weight) or x.requires_grad:
        return type(module).forward(module, x)
    target, lanes = _target()
    out = torch.empty_like(storage)
    fn = elementwise.kernel("rms_norm", target, lanes, width=width, eps=float(module.eps))
    fn(_tvm(storage.reshape(-1, width)), _tvm(weight), _tvm(out.view(-1, width)))
    return out.transpose(1, 2) if storage is not x else out


def _rope_in_projection_layout(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.transpose(1, 2).is_contiguous() and _fits(x.transpose(1, 2))


def _rope(original: Callable[..., Any]) -> Callable[..., Any]:
    def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *args: Any, **kw: Any):
        from edgeattn.kernels_tvm import elementwise

        usual = not args and set(kw) <= {"unsqueeze_dim"} and kw.get("unsqueeze_dim", 1) == 1
        shaped = cos.dim() == 3 and q.dim() == 4 and cos.shape[:2] == (q.shape[0], q.shape[2])
        if not (_inside_patched.get() and usual and shaped and _fits(cos, sin) and q.shape[-1] % 2 == 0):
            return original(q, k, cos, sin, *args, **kw)
        if not (_rope_in_projection_layout(q) and _rope_in_projection_layout(k)):
            return original(q, k, cos, sin, *args, **kw)
        target, lanes = _target()
        d = q.shape[-1]
        halves = (*cos.shape[:2], 2, d // 2)
        out = []
        for x in (q, k):
            b, h, n, _ = x.shape
            fn = elementwise.kernel("rope", target, lanes, heads=h, head_dim=d)
            res = torch.empty(b, h, n, d, dtype=torch.float32)
            fn(
                _tvm(x.transpose(1, 2).view(b, n, h, 2, d // 2)),
                _tvm(cos.view(halves)),
                _tvm(sin.view(halves)),
                _tvm(res.view(b, h, n, 2, d // 2)),
            )
            out.append(res)
        return out[0], out[1]

    return rope


def _inside(forward: Callable[..., Any]) -> Callable[..., Any]:
    """The bound ``forward`` with the fused RoPE switched on for its duration (same signature)."""

    @functools.wraps(forward)
    def run(*args: Any, **kw: Any) -> Any:
        token = _inside_patched.set(True)
        try:
            return forward(*args, **kw)
        finally:
            _inside_patched.reset(token)

    return run


def _is_gelu_tanh(act: Any) -> bool:
    from transformers.activations import GELUTanh, PytorchGELUTanh

    return isinstance(act, (GELUTanh, PytorchGELUTanh))


def patch(model: Any) -> int:
    """Put ``model``'s MLP activations, RMSNorms and RoPE on the fused kernels; returns modules patched."""
    import importlib

    if getattr(model, _PATCHED_ATTR, False):
        return 0
    count = 0
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("MLP") and hasattr(module, "gate_proj") and _is_gelu_tanh(module.act_fn):
            fused = _gelu_mul
        elif name.startswith("Gemma") and name.endswith("RMSNorm") and hasattr(module, "eps"):
            fused = _rms_norm
            module.edgeattn_weight = module.weight.detach().float().clone()  # torch's allocator aligns to 64
        else:
            continue
        module.forward = types.MethodType(fused, module)
        setattr(module, _MARK, True)
        count += 1
    model.forward = _inside(model.forward)
    setattr(model, _MARK, True)
    if not _patched_models:
        for host in _ROPE_HOSTS:
            mod = importlib.import_module(host)
            _original_rope.setdefault(host, mod.apply_rotary_pos_emb)
            mod.apply_rotary_pos_emb = _rope(_original_rope[host])
    _patched_models.add(model)
    setattr(model, _PATCHED_ATTR, True)
    return count


def unpatch(model: Any) -> None:
    """Back to transformers' own ops (the instance forwards and RoPE as they were)."""
    import importlib

    if not getattr(model, _PATCHED_ATTR, False):
        return
    for module in model.modules():
        if vars(module).pop(_MARK, False):
            del module.forward
            vars(module).pop("edgeattn_weight", None)
    _patched_models.discard(model)
    if not _patched_models:
        for host, original in _original_rope.items():
            importlib.import_module(host).apply_rotary_pos_emb = original
    setattr(model, _PATCHED_ATTR, False)
