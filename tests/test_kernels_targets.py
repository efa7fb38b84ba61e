"""Target profiles, and the GPU kernels (OpenCL on PoCL, CUDA through nvcc) built for them."""

from __future__ import annotations

import pytest
from edgeattn.kernels_tvm import targets as T

# ------------------------------------------------------------------ profiles

EXPECTED = {
    "x86-host": "cpu",
    "arm64": "cpu",
    "arm-a76": "cpu",
    "arm-a78ae": "cpu",
    "opencl-mali": "opencl",
    "opencl-adreno": "opencl",
    "cuda-sm72": "cuda",
    "cuda-sm87": "cuda",
    "cuda-sm80": "cuda",
    "cuda-sm90": "cuda",
}


def test_every_named_profile_exists_with_its_family() -> None:
    assert set(T.PROFILE_NAMES) == set(EXPECTED)
    for name, family in EXPECTED.items():
        profile = T.get_profile(name)
        assert profile.name == name
        assert profile.family == family
        assert T.family_of(name) == family


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_profile_builds_a_tvm_target(name: str) -> None:
    profile = T.get_profile(name)
    target = profile.target()
    assert T.family_of(target) == profile.family
    if profile.family == "cpu":
        assert target.kind.name == "llvm"
    else:
        assert target.kind.name == profile.family
        assert target.host is not None and target.host.kind.name == "llvm"


def test_arm_profiles_cross_compile_for_aarch64() -> None:
    for name, cpu in [("arm64", None), ("arm-a76", "cortex-a76"), ("arm-a78ae", "cortex-a78ae")]:
        target = T.get_target(name)
        assert str(target.attrs["mtriple"]) == "aarch64-linux-gnu"
        assert "arm_cpu" in [str(k) for k in target.keys]
        if cpu:
            assert str(target.attrs["mcpu"]) == cpu
        assert T.get_profile(name).cross_compiler == "aarch64-linux-gnu-gcc"


def test_host_profile_detects_the_cpu() -> None:
    target = T.get_target("x86-host")
    assert str(target.attrs["mcpu"]) == T.detect_host_cpu()
    assert T.get_profile("x86-host").fcompile() is None  # local compiler


def test_cuda_profiles_arch_and_sm72_ships_source() -> None:
    for name, arch, host_triple in [
        ("cuda-sm72", "sm_72", "aarch64-linux-gnu"),
        ("cuda-sm87", "sm_87", "aarch64-linux-gnu"),
        ("cuda-sm80", "sm_80", "x86_64-linux-gnu"),
        ("cuda-sm90", "sm_90", "x86_64-linux-gnu"),
    ]:
        profile = T.get_profile(name)
        target = profile.target()
        assert str(target.attrs["arch"]) == arch == profile.nvcc_arch
        assert str(target.host.attrs["mtriple"]) == host_triple
        assert profile.ship_source == (arch == "sm_72")
    assert "nvcc" in T.get_profile("cuda-sm72").notes
    assert str(T.get_target("cuda-sm87").host.attrs["mcpu"]) == "cortex-a78ae"


def test_opencl_profiles_name_their_device() -> None:
    assert str(T.get_target("opencl-mali").attrs["device"]) == "mali"
    assert str(T.get_target("opencl-adreno").attrs["device"]) == "adreno"
    assert "adreno" in [str(k) for k in T.get_target("opencl-adreno").keys]


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(T.UnknownTargetError) as err:
        T.get_profile("arm-a72")
    message = str(err.value)
    assert "arm-a72" in message
    for name in EXPECTED:
        assert name in message
    with pytest.raises(ValueError, match="cpu, opencl, cuda"):
        T.list_profiles("vulkan")


def test_list_profiles_by_family() -> None:
    assert [p.name for p in T.list_profiles("opencl")] == ["opencl-mali", "opencl-adreno"]
    assert {p.name for p in T.list_profiles("cuda")} == {"cuda-sm72", "cuda-sm87", "cuda-sm80", "cuda-sm90"}


def test_target_dict_is_a_fresh_copy() -> None:
    profile = T.get_profile("opencl-mali")
    d = profile.target_dict()
    d["host"]["mtriple"] = "changed"
    assert profile.target_dict()["host"]["mtriple"] == "aarch64-linux-gnu"


def test_ndk_profile_without_ndk_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TVM_NDK_CC", raising=False)
    with pytest.raises(RuntimeError, match="TVM_NDK_CC"):
        T.get_profile("opencl-adreno").fcompile()
