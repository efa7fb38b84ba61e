"""A compiled model artifact run on the emulated aarch64 device over RPC, against the host's run.

The tiny Gemma 3 is exported, compiled for ``arm64`` (cross-linked) and for
this machine, and the aarch64 artifact runs under qemu with TVM's runtime
library alone (the ``arm64-emulated`` device profile starts the emulator).
Its logits must match the host artifact's, in prefill and decode.  The checks
that must fail before anything is sent (budget, wrong target, corrupt file)
run without the emulator.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgeattn.devices import emulated_arm64 as emu
from edgeattn.devices import profiles as P
from edgeattn.devices.errors import DeviceError
from edgeattn.devices.remote import check_budget, open_remote_session, session_for_export
from edgeattn.errors import EdgeAttnError
from edgeattn.runtime.memory import BudgetError

GIB = 2**30


def test_budget_below_the_weights_is_refused() -> None:
    rpi4 = P.get_profile("rpi4")  # 3 GiB
    manifest = {"memory": {"weights_bytes": 4 * GIB, "planned_activation_bytes": GIB}}
    with pytest.raises(BudgetError, match=r"rpi4's memory budget 3 GiB is below the 4 GiB the weights alone need"):
        check_budget(rpi4, manifest)
    manifest["memory"]["weights_bytes"] = GIB
    assert check_budget(rpi4, manifest) == 2 * GIB  # weights + planned activations


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    """The tiny Gemma 3 (dense): its HF folder, and its export compiled for arm64 (cross-linked here)."""
    from edgeattn.config import AttentionConfig
    from edgeattn.export.exporter import export_model
    from edgeattn.runtime.tvm_compile import compile_artifact
    from edgeattn.tiny import save_tiny_model

    root = tmp_path_factory.mktemp("remote")
    onnx_path = root / "tiny.onnx"
    model_dir = save_tiny_model(root / "tiny", "gemma3")
    export_model(str(model_dir), onnx_path, AttentionConfig(kind="dense"))
    return {"model": model_dir, "onnx": onnx_path, "arm64": compile_artifact(onnx_path, "arm64", max_context=64).path}


@pytest.fixture
def user_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(P.ENV_USER_DIR, str(tmp_path / "devices"))
    return tmp_path / "devices"


def test_host_checks_fail_before_connecting(artifacts: dict[str, Path], user_dir: Path, tmp_path: Path) -> None:
    small = P.profile_from_dict(
        {**P.get_profile("arm64-emulated").to_dict(), "name": "tiny-pi", "memory_budget": "4KiB"}
    )
    with pytest.raises(BudgetError, match="budget 0 MiB is below the .* the weights alone need"):
        open_remote_session(small, artifacts["arm64"])
    other = tmp_path / "other-target"
    shutil.copytree(artifacts["arm64"], other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["target"]["profile"] = "arm-a78ae"
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DeviceError, match="compiled for target 'arm-a78ae'.*--device arm64"):
        open_remote_session("arm64-emulated", other)
    broken = tmp_path / "broken"
    shutil.copytree(artifacts["arm64"], broken)
    with open(broken / "params.bin", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(EdgeAttnError, match="sha256"):
        open_remote_session("arm64-emulated", broken)
    with pytest.raises(DeviceError, match="not a readable TVM artifact"):
        open_remote_session("arm64-emulated", tmp_path / "nothing")


@pytest.fixture(scope="module")
def remote(artifacts: dict[str, Path]) -> Iterator:
    if not emu.is_set_up():
        pytest.skip(emu.setup_problem() or "")
    # the run --device path: the export compiled for the profile's target (here: the cached artifact)
    with session_for_export("arm64-emulated", artifacts["onnx"], max_context=64) as sess:
        assert sess.art.path == artifacts["arm64"]
        yield sess


def _host_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    """Last-position logits of the tiny model computed on this machine (transformers, float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float().numpy()


def test_aarch64_artifact_on_the_emulated_device_matches_the_host(remote, artifacts: dict[str, Path]) -> None:
    """Prefill, then two decode steps (KV cache kept on the device), against the host's logits."""
    ids = [int(i) for i in np.random.default_rng(0).integers(0, 200, 12)]
    remote.reset()
    with remote.peak_meter() as mem:
        got = [remote.append(ids), remote.append([7]), remote.append([11])]
    want = [_host_logits(artifacts["model"], seq) for seq in (ids, ids + [7], ids + [7, 11])]
    for w, g in zip(want, got, strict=True):
        assert np.abs(g - w).max() <= 1e-4 * np.abs(w).max()
        assert int(g.argmax()) == int(w.argmax())
    assert remote.cached_tokens == len(ids) + 2
    assert remote.emulated and remote.info.device == "arm64-emulated (emulated)"
    assert mem.available and mem.peak >= mem.start > 0  # the device's own VmHWM over the run
    assert remote.resident_bytes() > 0 and remote.planned_bytes > 0
