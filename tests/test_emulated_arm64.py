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


@pytest.mark.parametrize("target_name", ["arm64", "arm-a76", "arm-a78ae"])
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
