"""Whole-model artifacts for other targets: aarch64 (cross-compiled, run on the emulated aarch64 device
with TVM's runtime alone, matching the host artifact), OpenCL (Mali, Adreno) and CUDA (built here)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edgeattn.config import AttentionConfig
from edgeattn.devices import emulated_arm64 as emu
from edgeattn.export import exporter
from edgeattn.models import LoadedModel
from edgeattn.runtime import tvm_backend, tvm_compile
from edgeattn.tiny import tiny_model

pytest.importorskip("tvm")

STEPS = [[5, 17, 301, 44, 2, 9, 120, 77, 310, 11, 6, 400, 3], [250], [18], [99]]

DEVICE_SCRIPT = """
import json, platform, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import tvm
assert platform.machine() == "aarch64", platform.machine()
assert tvm._RUNTIME_ONLY and tvm.get_global_func("target.build.llvm", allow_missing=True) is None
from edgeattn.runtime.tvm_backend import open_session
sess = open_session(sys.argv[2])
np.save(sys.argv[4], np.stack([sess.append(ids) for ids in json.loads(sys.argv[3])]))
print("ran on", platform.machine())
"""


def _export(folder: Path) -> Path:
    cfg = AttentionConfig(kind="dhsa", budget=12, chunk_size=4, sinks=2)
    model = tiny_model("gemma2", num_hidden_layers=2)  # softcap, a sliding and a DHSA layer
    lm = LoadedModel(model=model, tokenizer=None, name="gemma2", path=Path("."))
    return exporter.export_loaded(lm, folder / "g2.onnx", cfg).onnx_path


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> Path:
    return _export(tmp_path_factory.mktemp("targets"))


# slow: tests/test_devices_remote.py and tests/test_run_device.py run an aarch64 artifact on the emulated
# board in CI; this one adds the runtime-only install of a Gemma 2 (softcap) DHSA artifact
@pytest.mark.slow
@pytest.mark.skipif(not emu.is_set_up(), reason=emu.setup_problem() or "")
def test_aarch64_artifact_runs_on_the_emulated_device_and_matches_the_host(tiny_export: Path, tmp_path: Path) -> None:
    arm = tvm_compile.compile_artifact(tiny_export, "arm64", max_context=64)
    assert arm.manifest["target"]["arch"] == "aarch64" and arm.manifest["target"]["cross_compiled"]
    assert (arm.path / "model.so").read_bytes()[18] == 0xB7  # ELF e_machine = EM_AARCH64
    with pytest.raises(tvm_backend.ArtifactError, match="is for target 'arm64'"):
        tvm_backend.open_session(arm.path)  # refused here (x86-64), before any loading
    host = tvm_backend.open_session(tvm_compile.compile_artifact(tiny_export, "x86-host", max_context=64).path)
    expected = np.stack([host.append(ids) for ids in STEPS])

    repo = Path(__file__).resolve().parents[1]
    pkg = tmp_path / "pkg" / "edgeattn"
    ignore = shutil.ignore_patterns("data", "__pycache__")
    shutil.copytree(repo / "edgeattn", pkg, ignore=ignore)
    for sub in ("runtime", "export", "kernels_tvm"):
        shutil.copytree(repo / sub, pkg / sub, ignore=ignore)
    done = subprocess.run(
        [
            str(emu.emulator_layout().wrapper),
            "-c",
            DEVICE_SCRIPT,
            str(tmp_path / "pkg"),
            str(arm.path),
            json.dumps(STEPS),
            str(tmp_path / "got.npy"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "TVM_USE_RUNTIME_LIB": "1", "TVM_NUM_THREADS": "2"},
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ran on aarch64" in done.stdout
    got = np.load(tmp_path / "got.npy")
    err = float(np.abs(got - expected).max() / np.abs(expected).max())
    assert err < 1e-4, err


@pytest.mark.parametrize("device", ["opencl-mali", "opencl-adreno", "cuda-sm87"])
def test_gpu_artifacts_are_built(tiny_export: Path, tmp_path: Path, device: str) -> None:
    from edgeattn.kernels_tvm.targets import get_profile

    profile = get_profile(device)
    try:
        profile.fcompile()
    except RuntimeError as exc:  # e.g. Adreno needs the Android NDK (TVM_NDK_CC)
        pytest.skip(str(exc))
    res = tvm_compile.compile_artifact(tiny_export, device, max_context=64, out_dir=tmp_path / device)
    man = res.manifest
    assert man["target"]["family"] == profile.family and man["target"]["arch"] == "aarch64"
    assert man["rewrites"]["gemms_packed"] == 0  # GPU: the GEMMs are DLight's, not the packed CPU kernel
    kinds = " ".join(man["kernels"])
    assert "dhsa_sparse_attention" in kinds and "dense_flash_attention" in kinds
    assert (res.path / "model.so").stat().st_size > 0
