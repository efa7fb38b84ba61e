"""`--kv-dtype float16`: a float16 KV cache under a float32 model, read as it is by the CPU kernels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from edgeattn import patching
from edgeattn.cli import app
from edgeattn.config import AttentionConfig
from edgeattn.kernels_tvm import registry
from edgeattn.kernels_tvm.abi import OP_DENSE, KernelSpec
from edgeattn.models import LoadedModel
from edgeattn.runtime import kv_cache
from edgeattn.runtime.torch_backend import TorchSession
from edgeattn.tiny import save_tiny_model, tiny_model

runner = CliRunner()


def _qkv(lq: int, lk: int, hq: int = 4, hkv: int = 2, d: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, hq, lq, d, generator=g)
    k = (torch.randn(1, hkv, lk, d, generator=g) + torch.randn(d, generator=g)).half()
    v = torch.randn(1, hkv, lk, d, generator=g).half()
    return q, k, v


@pytest.mark.parametrize(
    ("cfg", "window", "lq"),
    [
        (AttentionConfig(kind="dense"), None, 150),  # prefill
        (AttentionConfig(kind="dense"), 16, 150),  # a sliding layer
        (AttentionConfig(kind="dense"), None, 1),  # decode
        (AttentionConfig(kind="dhsa", budget=48, chunk_size=16), None, 150),  # selection + sparse prefill
        (AttentionConfig(kind="dhsa", budget=48, chunk_size=16), None, 1),  # sparse decode
    ],
    ids=["dense", "window", "dense-decode", "dhsa", "dhsa-decode"],
)
def test_kernels_read_float16_kv_as_float32_would(cfg: AttentionConfig, window: int | None, lq: int) -> None:
    """Every value a float16 cache holds is exact in float32: the result equals the float32 kernels' on it."""
    q, k, v = _qkv(lq, 150)
    half = registry.run_layer(q, k, v, cfg, window=window)
    full = registry.run_layer(q, k.float(), v.float(), cfg, window=window)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=1e-5, atol=1e-5)


def test_the_half_kv_kernel_is_its_own_kernel() -> None:
    kw = dict(heads_q=4, heads_kv=2, head_dim=16)
    fp32 = registry.get_kernel(OP_DENSE, **kw)
    fp16 = registry.get_kernel(OP_DENSE, kv_dtype="float16", **kw)
    assert fp16 is not fp32 and fp16.spec.kv_type == "float16" and fp16.spec.dtype == "float32"
    assert KernelSpec(op=OP_DENSE, kv_dtype="float32", **kw).key() == fp32.spec.key()  # same dtype: same kernel
    with pytest.raises(ValueError, match="kv_dtype"):
        KernelSpec(op=OP_DENSE, kv_dtype="bfloat16", **kw)


def test_cache_stores_float16_in_every_layer_kind() -> None:
    model = tiny_model("gemma3")
    cache = kv_cache.new_cache(model.config, torch.float16)
    patching.patch(model, AttentionConfig(kind="dense"), [], kernels="reference")  # reads it in float32
    try:
        with torch.inference_mode():
            model(input_ids=torch.arange(4, 44)[None], cache=cache, use_cache=True)
    finally:
        patching.unpatch(model)
    kinds = {type(layer).__name__ for layer in cache.layers}
    assert kinds == {"GrowingLayer", "WindowLayer"}
    assert all(layer.keys.dtype == torch.float16 and layer.values.dtype == torch.float16 for layer in cache.layers)


@pytest.mark.parametrize("kernels", ["tvm", "reference"])
@pytest.mark.parametrize("kind", ["dense", "dhsa"])
def test_session_on_a_float16_cache_follows_the_float32_one(kernels: str, kind: str) -> None:
    """Prefill and decode (DHSA: on the chunk index, budget < context) stay within float16 rounding of float32."""
    loaded = LoadedModel(tiny_model("gemma3"), None, "tiny", Path("."))
    ids = [int(x) for x in np.random.RandomState(0).randint(4, 512, 100)]
    cfg = AttentionConfig(kind=kind, budget=48, chunk_size=16)
    rows = {}
    for kv in ("float32", "float16"):
        s = TorchSession(loaded, cfg, kernels=kernels, kv_dtype=kv)
        logits = [s.append(ids)]
        for _ in range(8):
            logits.append(s.append([int(np.argmax(logits[-1]))]))
        assert s._cache.layers[1].keys.dtype == getattr(torch, kv)
        rows[kv] = np.stack(logits)
    scale = np.abs(rows["float32"]).max()
    assert np.abs(rows["float16"] - rows["float32"]).max() <= 2e-2 * scale
    assert (rows["float16"].argmax(-1) == rows["float32"].argmax(-1)).mean() >= 0.8


def _run(args: list[str], tmp_path: Path):
    return runner.invoke(app, ["run", *args], env={"EDGEATTN_CACHE": str(tmp_path / "cache")})


def test_run_reports_half_the_kv_cache(tmp_path: Path) -> None:
    model = save_tiny_model(tmp_path / "tiny", "gemma3", tokenizer=True)
    common = [str(model), "--synthetic-length", "96", "--max-new-tokens", "3", "--attention", "dense,dhsa"]
    common += ["--budget", "48", "--chunk-size", "16", "--no-shipped", "--json"]
    reports = {}
    for kv in ("float32", "float16"):
        res = _run([*common, "--kv-dtype", kv], tmp_path)
        assert res.exit_code == 0, res.output
        reports[kv] = json.loads(res.output[res.output.index("{") : res.output.rindex("}") + 1])
    assert reports["float16"]["kv_dtype"] == "float16"
    for half, full in zip(reports["float16"]["results"], reports["float32"]["results"], strict=True):
        assert half["attention"] == full["attention"] and half["backend"] == "torch"
        assert half["kv_cache_mib"] == pytest.approx(full["kv_cache_mib"] / 2)
        assert half["new_tokens"] == 3


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--kv-dtype", "bfloat16"], "--kv-dtype takes float32 or float16"),
        (["--kv-dtype", "float16", "--backend", "ort"], "runs on --backend torch only"),
        (["--kv-dtype", "float16", "--device", "arm64-emulated"], "leave out --device"),
    ],
)
def test_run_refuses_a_kv_dtype_it_cannot_honour(extra: list[str], message: str, tmp_path: Path) -> None:
    res = _run(["--synthetic-length", "64", *extra], tmp_path)
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert not (tmp_path / "cache").exists()  # refused before anything was loaded or written
