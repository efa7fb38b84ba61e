"""Kernels cross-compiled for AArch64 run on the emulated aarch64 device over TVM RPC.

Skips (with the set-up command in the reason) when the emulator is not set up:
``python -m edgeattn.devices.arm64_emulator_setup`` (~1 min, once).  Starting the
RPC server under qemu takes ~40 s (TVM is imported twice under emulation), so
one device serves the whole module.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from edgeattn.devices import emulated_arm64 as emu
from edgeattn.kernels_tvm.targets import get_profile

pytestmark = pytest.mark.skipif(not emu.is_set_up(), reason=emu.setup_problem() or "")


@pytest.fixture(scope="module")
def device() -> Iterator[emu.EmulatedArm64Device]:
    with emu.EmulatedArm64Device() as dev:
        yield dev


def test_not_set_up_names_the_command(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(emu.ENV_ROOT, str(tmp_path / "nothing-here"))
    with pytest.raises(emu.EmulatorNotSetUpError, match="arm64_emulator_setup"):
        emu.EmulatedArm64Device().start()


def test_remote_is_aarch64(device: emu.EmulatedArm64Device) -> None:
    # the remote's own idea of its CPU: LLVM's host triple of the aarch64 TVM build
    triple = device.session.get_function("target.llvm_get_system_triple")()
    assert str(triple).startswith("aarch64"), triple


# one target in CI; the other CPU profiles only change the vector width / thread count (slow sweep)
@pytest.mark.parametrize(
    "target_name",
    ["arm64", pytest.param("arm-a76", marks=pytest.mark.slow), pytest.param("arm-a78ae", marks=pytest.mark.slow)],
)
def test_small_kernel_matches_numpy(device: emu.EmulatedArm64Device, target_name: str) -> None:
    import tvm
    from tvm import te

    profile = get_profile(target_name)
    n = 1003  # odd: exercises the vector tail
    a = te.placeholder((n,), name="a")
    b = te.placeholder((n,), name="b")
    c = te.compute((n,), lambda i: a[i] * b[i] + te.exp(a[i]), name="c")
    lib = tvm.compile(tvm.IRModule({"main": te.create_prim_func([a, b, c])}), target=profile.target())
    rng = np.random.default_rng(0)
    x = rng.standard_normal(n).astype("float32")
    y = rng.standard_normal(n).astype("float32")
    out = np.full(n, np.nan, dtype="float32")
    _, _, got = emu.run_on_device(device.session, lib, profile.fcompile(), "main", [x, y, out])
    np.testing.assert_allclose(got, x * y + np.exp(x), rtol=1e-5, atol=1e-6)


# ------------------------------------------------- DHSA kernels (CPU schedules) built for AArch64


def _build_for(target_name: str, spec):
    from edgeattn.kernels_tvm import registry

    target = get_profile(target_name).target()
    return registry.compile_module(registry.builder_for(target)(spec, target), target)


def _run(device: emu.EmulatedArm64Device, target_name: str, case, op: str, **spec_changes) -> list[np.ndarray]:
    from edgeattn.kernels_tvm.abi import SYMBOL

    lib = _build_for(target_name, case.spec(op).with_(**spec_changes))
    return emu.run_on_device(device.session, lib, get_profile(target_name).fcompile(), SYMBOL[op], case.args(op))


@pytest.mark.parametrize(
    "target_name,group",
    [
        ("arm-a76", 4),
        pytest.param("arm-a78ae", 1, marks=pytest.mark.slow),
        pytest.param("arm64", 8, marks=pytest.mark.slow),
    ],
)
def test_dhsa_kernels_match_reference_on_aarch64(device: emu.EmulatedArm64Device, target_name: str, group: int) -> None:
    """Selection, sparse and dense flash attention (softcap on), odd length, over RPC on the emulated CPU."""
    from edgeattn.kernels_tvm.abi import OP_DENSE, OP_SELECT, OP_SPARSE
    from edgeattn.kernels_tvm.gpu_cases import make_case, rel_err

    case = make_case(2 * group, 2, 32, 77, chunk=8, budget=32, softcap=20.0, seed=group)
    sel = _run(device, target_name, case, OP_SELECT)
    np.testing.assert_array_equal(sel[3], case.sel)
    np.testing.assert_array_equal(sel[4], case.nsel)
    assert rel_err(_run(device, target_name, case, OP_SPARSE)[-1], case.ref_sparse) <= 1e-4
    assert rel_err(_run(device, target_name, case, OP_DENSE)[-1], case.ref_dense) <= 1e-4


def test_centred_selection_with_variable_chunks_on_aarch64(device: emu.EmulatedArm64Device) -> None:
    """Variable chunks and keys with a large common component: the centring term decides the order;
    the observation window (12 queries, spanning chunks) pins its vertical chunks."""
    from edgeattn.kernels_tvm.abi import OP_SELECT
    from edgeattn.kernels_tvm.gpu_cases import make_case

    case = make_case(4, 1, 32, 93, variable_chunks=(3, 13), budget=40, sinks=3, seed=6, key_offset=2.0, observe=12)
    assert case.vertical == 20
    sel = _run(device, "arm-a76", case, OP_SELECT)
    np.testing.assert_array_equal(sel[3], case.sel)
    np.testing.assert_array_equal(sel[4], case.nsel)


def test_dhsa_decode_and_budget_covering_everything_on_aarch64(device: emu.EmulatedArm64Device) -> None:
    from edgeattn.kernels_tvm.abi import OP_SPARSE
    from edgeattn.kernels_tvm.gpu_cases import make_case, rel_err

    decode = make_case(4, 2, 32, 83, q_len=1, chunk=8, budget=40, seed=3)
    out = _run(device, "arm-a76", decode, OP_SPARSE, decode=True)[-1]
    assert rel_err(out, decode.ref_sparse) <= 1e-4
    everything = make_case(4, 1, 32, 45, chunk=8, budget=64, seed=4)  # budget >= L: DHSA == dense
    out = _run(device, "arm64", everything, OP_SPARSE)[-1]
    assert rel_err(out, everything.ref_dense) <= 1e-4


def test_dhsa_fp16_kernels_on_aarch64(device: emu.EmulatedArm64Device) -> None:
    """Half-precision inputs/outputs (fp32 arithmetic) on the Orin CPU profile: rel err <= 1e-3."""
    from edgeattn.kernels_tvm.abi import OP_DENSE, OP_SELECT, OP_SPARSE
    from edgeattn.kernels_tvm.gpu_cases import make_case, rel_err

    case = make_case(8, 2, 32, 77, chunk=8, budget=32, dtype="float16", seed=5)
    sel = _run(device, "arm-a78ae", case, OP_SELECT)
    np.testing.assert_array_equal(sel[3], case.sel)
    out = _run(device, "arm-a78ae", case, OP_SPARSE)[-1]
    assert out.dtype == np.float16 and rel_err(out, case.ref_sparse) <= 1e-3
    assert rel_err(_run(device, "arm-a78ae", case, OP_DENSE)[-1], case.ref_dense) <= 1e-3


def test_tuner_checks_and_times_candidates_on_the_device(device: emu.EmulatedArm64Device) -> None:
    """The re-tune command's RPC path: each candidate is checked against the reference and timed on the device."""
    from edgeattn.kernels_tvm import tune
    from edgeattn.kernels_tvm.abi import OP_DENSE, KernelSpec

    profile = get_profile("arm64")
    runner = tune.Runner(profile.target(), fcompile=profile.fcompile(), session=device.session)
    spec = KernelSpec(op=OP_DENSE, heads_q=4, heads_kv=1, head_dim=64, sinks=tune.SINKS)
    result = tune.tune_op(
        spec,
        profile.target(),
        length=96,
        trials=1,
        repeats=1,
        runner=runner,
        progress=lambda _m: None,
        device={"cpu_model": "emulated aarch64", "threads": None},
    )
    record = result.record
    assert record["candidates"] == 1 and record["failed"] == 0 and record["rejected_wrong"] == 0
    assert record["choice"] in ("default", "tuned") and record["time_s"]["default"][0] > 0


# ------------------------------------------------- a kernel bundle, run with TVM's runtime alone

DEVICE_BUNDLE_SCRIPT = """
import json, platform, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import tvm
assert platform.machine() == "aarch64", platform.machine()
assert tvm._RUNTIME_ONLY and tvm.get_global_func("target.build.llvm", allow_missing=True) is None
from edgeattn.kernels_tvm.abi import ARGS, NUM_OUTPUTS
from edgeattn.kernels_tvm.prebuilt import Bundle
bundle = Bundle.load(sys.argv[2])
data = dict(np.load(sys.argv[3]))
outs = {}
for spec in bundle.specs():
    names = ARGS[spec.op]
    arrays = [data[n] if n in data else None for n in names]
    for i in range(len(names) - NUM_OUTPUTS[spec.op], len(names)):
        arrays[i] = data["poison_" + names[i]]
    tensors = [tvm.runtime.tensor(a, bundle.device()) for a in arrays]
    bundle.kernel(spec)(*tensors)
    for n, t in zip(names[-NUM_OUTPUTS[spec.op]:], tensors[-NUM_OUTPUTS[spec.op]:]):
        outs[spec.op + "." + n] = t.numpy()
np.savez(sys.argv[4], **outs)
print("ran", len(outs), "outputs on", platform.machine())
"""


# slow: the runtime-only bundle load is tested on the host in CI (tests/test_kernels_prebuilt.py), and the
# same kernels run on the emulated device over RPC above
@pytest.mark.slow
def test_bundle_runs_with_the_runtime_only_on_the_emulated_device(tmp_path) -> None:
    """Cross-compiled here, loaded on aarch64 with TVM_USE_RUNTIME_LIB=1: the deployment path of a board."""
    import os
    import shutil
    import subprocess
    from pathlib import Path

    from edgeattn.kernels_tvm.abi import OP_DENSE, OP_SELECT, OP_SPARSE
    from edgeattn.kernels_tvm.gpu_cases import make_case, rel_err
    from edgeattn.kernels_tvm.prebuilt import write_bundle

    case = make_case(4, 2, 16, 77, chunk=8, budget=32, sinks=4, seed=21, key_offset=2.0)
    bundle = write_bundle(tmp_path / "arm64", [case.spec(op) for op in (OP_SELECT, OP_SPARSE, OP_DENSE)], "arm64")
    select_args = case.args(OP_SELECT)
    np.savez(
        tmp_path / "in.npz",
        q=case.q,
        k=case.k,
        v=case.v,
        boundaries=case.boundaries,
        sel=case.sel,
        nsel=case.nsel,
        poison_out=case.args(OP_DENSE)[-1],
        poison_sel=select_args[3],
        poison_nsel=select_args[4],
    )
    # edgeattn's modules as the installed package lays them out (kernels_tvm -> edgeattn.kernels_tvm)
    repo = Path(__file__).resolve().parents[1]
    pkg = tmp_path / "pkg" / "edgeattn"
    shutil.copytree(repo / "edgeattn", pkg, ignore=shutil.ignore_patterns("data", "__pycache__"))
    shutil.copytree(repo / "kernels_tvm", pkg / "kernels_tvm", ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run(
        [
            str(emu.emulator_layout().wrapper),
            "-c",
            DEVICE_BUNDLE_SCRIPT,
            str(tmp_path / "pkg"),
            str(bundle),
            str(tmp_path / "in.npz"),
            str(tmp_path / "out.npz"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "TVM_USE_RUNTIME_LIB": "1", "TVM_NUM_THREADS": "2"},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on aarch64" in done.stdout
    out = np.load(tmp_path / "out.npz")
    np.testing.assert_array_equal(out[f"{OP_SELECT}.sel"], case.sel)
    np.testing.assert_array_equal(out[f"{OP_SELECT}.nsel"], case.nsel)
    assert rel_err(out[f"{OP_SPARSE}.out"], case.ref_sparse) <= 1e-4
    assert rel_err(out[f"{OP_DENSE}.out"], case.ref_dense) <= 1e-4
