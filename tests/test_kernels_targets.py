"""Target profiles, and the GPU kernels (OpenCL on PoCL, CUDA through nvcc) built for them."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest

from edgeattn.kernels_tvm import gpu_cuda, gpu_kernels
from edgeattn.kernels_tvm import targets as T
from edgeattn.kernels_tvm.abi import ARGS, OP_DENSE, OP_SELECT, OP_SPARSE, SYMBOL
from edgeattn.kernels_tvm.gpu_cases import AttentionCase, make_case, rel_err
from edgeattn.kernels_tvm.gpu_opencl import opencl_problem
from edgeattn.kernels_tvm.prebuilt import gpu_arch

# ------------------------------------------------------------------ profiles

EXPECTED = {
    "x86-host": "cpu",
    "arm64": "cpu",
    "arm-a72": "cpu",
    "arm64-android": "cpu",
    "arm-a76": "cpu",
    "arm-a78ae": "cpu",
    "opencl-mali": "opencl",
    "opencl-mali-android": "opencl",
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
    for name, cpu in [
        ("arm64", None),
        ("arm-a72", "cortex-a72"),
        ("arm-a76", "cortex-a76"),
        ("arm-a78ae", "cortex-a78ae"),
    ]:
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
        T.get_profile("arm-a53")
    message = str(err.value)
    assert "arm-a53" in message
    for name in EXPECTED:
        assert name in message
    with pytest.raises(ValueError, match="cpu, opencl, cuda"):
        T.list_profiles("vulkan")


def test_list_profiles_by_family() -> None:
    assert [p.name for p in T.list_profiles("opencl")] == ["opencl-mali", "opencl-mali-android", "opencl-adreno"]
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


# ------------------------------------------------------ GPU kernels: OpenCL on PoCL


OPENCL_PROBLEM = opencl_problem()
needs_opencl = pytest.mark.skipif(OPENCL_PROBLEM is not None, reason=OPENCL_PROBLEM or "")


@cache
def _opencl_runner(target_name: str, spec):
    from edgeattn.kernels_tvm.gpu_opencl import OpenCLKernelRunner

    target = T.get_target(target_name)
    return OpenCLKernelRunner(gpu_kernels.build(spec, target), target)


def _check_opencl(case: AttentionCase, target_name: str = "opencl-mali", tol: float = 1e-4) -> None:
    """Selection equal to the reference; sparse and dense within ``tol``; every output written."""
    sel_out = _opencl_runner(target_name, case.spec(OP_SELECT))(*case.args(OP_SELECT))
    np.testing.assert_array_equal(sel_out[3], case.sel)
    np.testing.assert_array_equal(sel_out[4], case.nsel)
    sparse_out = _opencl_runner(target_name, case.spec(OP_SPARSE))(*case.args(OP_SPARSE))[-1]
    assert rel_err(sparse_out, case.ref_sparse) <= tol
    dense_out = _opencl_runner(target_name, case.spec(OP_DENSE))(*case.args(OP_DENSE))[-1]
    assert rel_err(dense_out, case.ref_dense) <= tol


def test_gpu_kernels_follow_the_abi() -> None:
    target = T.get_target("opencl-mali")
    case = make_case(4, 2, 8, 20)
    for op in (OP_SELECT, OP_SPARSE, OP_DENSE):
        mod = gpu_kernels.build(case.spec(op), target)
        (gv, func), *rest = list(mod.functions.items())
        assert not rest and gv.name_hint == SYMBOL[op]
        assert len(func.params) == len(ARGS[op])
    with pytest.raises(ValueError, match="opencl or cuda"):
        gpu_kernels.build(case.spec(OP_DENSE), T.get_target("arm64"))


def test_tiles_fit_the_target_limits() -> None:
    for name in ("opencl-mali", "opencl-adreno", "cuda-sm87"):
        target = T.get_target(name)
        for g, d in [(1, 256), (8, 256), (4, 64)]:
            spec = make_case(g, 1, 8, 9).spec(OP_SPARSE).with_(heads_q=g, head_dim=d)
            tq, tk = gpu_kernels.attention_tiles(spec, target)
            assert tq * g <= int(target.attrs["max_num_threads"])
            assert 2 * tk * d * 4 <= int(target.attrs["max_shared_memory_per_block"])


@needs_opencl
@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_opencl_matches_reference_for_every_gqa_ratio(group: int) -> None:
    _check_opencl(make_case(2 * group, 2, 16, 77, chunk=8, budget=32, sinks=4, seed=group))


@needs_opencl
def test_opencl_variable_chunks_softcap_window() -> None:
    case = make_case(4, 1, 16, 93, variable_chunks=(3, 13), budget=40, sinks=3, softcap=20.0, window=37, seed=5)
    _check_opencl(case)
    # keys with a large common component: the centring term of the chunk scores decides the order
    _check_opencl(make_case(4, 1, 16, 93, variable_chunks=(3, 13), budget=40, sinks=3, seed=6, key_offset=2.0))


@needs_opencl
def test_opencl_long_top_list_and_many_chunks() -> None:
    """A top-list of M > 200 entries (one-token chunks, budget 200), and centring sums over 290 chunks."""
    case = make_case(4, 1, 16, 301, chunk=1, budget=200, sinks=4, seed=9)
    assert case.sel.shape[-1] > 128
    _check_opencl(case)
    _check_opencl(make_case(4, 1, 16, 301, q_len=1, chunk=1, budget=200, sinks=4, seed=10))


@needs_opencl
def test_opencl_decode_one_query() -> None:
    _check_opencl(make_case(8, 2, 16, 61, q_len=1, chunk=8, budget=24, seed=7))
    _check_opencl(make_case(8, 2, 16, 61, q_len=5, chunk=8, budget=24, seed=8))  # a suffix across chunks


@needs_opencl
@pytest.mark.parametrize("extra", [{}, {"softcap": 20.0, "window": 300}, {"variable_chunks": (3, 13)}])
def test_opencl_split_key_decode_kernels(extra: dict) -> None:
    """decode=True specs get the flash-decoding kernels (keys split over 256 threads per head, combined)."""
    case = make_case(8, 2, 16, 701, q_len=1, chunk=8, budget=64, seed=2, **extra)
    for op, ref in ((OP_SPARSE, case.ref_sparse), (OP_DENSE, case.ref_dense)):
        runner = _opencl_runner("opencl-mali", case.spec(op).with_(decode=True))
        assert rel_err(runner(*case.args(op))[-1], ref) <= 1e-4
        assert len(runner.last_plan.launches) == 2  # split, then combine


@needs_opencl
def test_opencl_budget_at_least_length_equals_dense() -> None:
    case = make_case(4, 2, 16, 45, chunk=8, budget=64, seed=3)
    assert rel_err(case.ref_sparse, case.ref_dense) <= 1e-5  # the reference itself
    out = _opencl_runner("opencl-mali", case.spec(OP_SPARSE))(*case.args(OP_SPARSE))[-1]
    assert rel_err(out, case.ref_dense) <= 1e-4


@needs_opencl
def test_opencl_adreno_profile_runs() -> None:
    _check_opencl(make_case(4, 1, 32, 41, chunk=8, budget=24, seed=11), target_name="opencl-adreno")


@needs_opencl
def test_opencl_launch_plan_is_tvms() -> None:
    """The launches come from TVM's host code: 3 kernels for DHSA selection, grid from the shapes."""
    case = make_case(4, 2, 16, 77, chunk=8, budget=32)
    runner = _opencl_runner("opencl-mali", case.spec(OP_SELECT))
    plan = runner.plan(case.args(OP_SELECT))
    assert [launch.name for launch in plan.launches] == [
        "dhsa_chunk_select_kernel",
        "dhsa_chunk_select_kernel_1",
        "dhsa_chunk_select_kernel_2",
    ]
    nc = len(case.boundaries) - 1
    assert plan.launches[1].grid == (2 * nc, 1, 1)  # one work-group per (KV head, key chunk)
    assert plan.launches[2].grid == (2 * nc, 1, 1)  # one work-group per (KV head, query chunk) row
    assert plan.launches[2].block == (256, 1, 1)
    assert set(plan.workspaces) == {"kbar", "topv", "csum"}
    for launch in plan.launches:
        assert f"void {launch.name}(" in runner.source


# ------------------------------------------------------------- CUDA: nvcc, and a GPU when there is one

# fp32 for every CUDA profile; fp16 (the Jetson's natural precision) for Orin, to keep nvcc time down
CUDA_BUILDS = [(p.name, "float32") for p in T.list_profiles("cuda")] + [("cuda-sm87", "float16")]


@pytest.mark.skipif(gpu_cuda.nvcc_path() is None, reason="nvcc not installed (CUDA toolkit)")
@pytest.mark.parametrize("profile_name,dtype", CUDA_BUILDS)
def test_cuda_kernels_compile_with_nvcc_or_ship_source(profile_name: str, dtype: str, tmp_path) -> None:
    """Every op, Gemma-like shape (g=4, D=256, softcap), built for the profile's arch.

    sm_72 (and any arch the local nvcc lacks) ships the source: the test then
    checks that the source is written and names every kernel.
    """
    profile = T.get_profile(profile_name)
    case = make_case(4, 1, 8, 9)
    builds = [(op, False) for op in (OP_SELECT, OP_SPARSE, OP_DENSE)]
    if profile.name == "cuda-sm87":  # the decode kernels on the Jetson Orin arch
        builds += [(OP_SPARSE, True), (OP_DENSE, True)]
    for op, decode in builds:
        spec = case.spec(op).with_(head_dim=256, dtype=dtype, softcap=50.0, decode=decode)
        mod = gpu_kernels.build(spec, profile.target())
        path = gpu_cuda.write_cuda_artifact(mod, profile, tmp_path, f"{SYMBOL[op]}_{dtype}_{decode}")
        if profile.ship_source or not gpu_cuda.nvcc_supports(profile.nvcc_arch):
            assert path.suffix == ".cu"
            assert profile.name == "cuda-sm72" or not gpu_cuda.nvcc_supports(profile.nvcc_arch)
            assert gpu_cuda.kernel_names(path.read_text())
        else:
            assert path.suffix == ".ptx"
            ptx = path.read_text()
            assert f".target {profile.nvcc_arch}" in ptx
            for name in gpu_cuda.kernel_names(path.with_suffix(".cu").read_text()):
                assert f".entry {name}(" in ptx


def test_local_nvcc_cannot_build_sm72_and_says_so(tmp_path) -> None:
    if gpu_cuda.nvcc_path() is None or gpu_cuda.nvcc_supports("sm_72"):
        pytest.skip("only meaningful with an nvcc that lacks sm_72 (CUDA >= 13)")
    with pytest.raises(gpu_cuda.NvccError, match="ship the source"):
        gpu_cuda.nvcc_compile("__global__ void f() {}", "sm_72", tmp_path / "f.ptx")


def _cuda_device_present() -> bool:
    try:
        import tvm

        return bool(tvm.cuda(0).exist)
    except Exception:
        return False


needs_cuda_gpu = pytest.mark.skipif(not _cuda_device_present(), reason="no CUDA GPU here (tvm.cuda(0).exist is False)")


def _run_on_cuda(case: AttentionCase, op: str, decode: bool = False) -> list[np.ndarray]:
    import tvm

    dev = tvm.cuda(0)
    arch = gpu_arch(dev)
    target = tvm.target.Target({"kind": "cuda", "arch": arch, "host": {"kind": "llvm"}})
    lib = tvm.compile(gpu_kernels.build(case.spec(op).with_(decode=decode), target), target=target)
    tensors = [tvm.runtime.tensor(a, dev) for a in case.args(op)]
    lib[SYMBOL[op]](*tensors)
    dev.sync()
    return [t.numpy() for t in tensors]


@pytest.mark.gpu
@needs_cuda_gpu
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("float16", 1e-3)])
def test_cuda_gpu_matches_reference(group: int, dtype: str, tol: float) -> None:
    case = make_case(2 * group, 2, 64, 203, chunk=16, budget=96, softcap=30.0, dtype=dtype, seed=group)
    sel = _run_on_cuda(case, OP_SELECT)
    np.testing.assert_array_equal(sel[3], case.sel)
    np.testing.assert_array_equal(sel[4], case.nsel)
    assert rel_err(_run_on_cuda(case, OP_SPARSE)[-1], case.ref_sparse) <= tol
    assert rel_err(_run_on_cuda(case, OP_DENSE)[-1], case.ref_dense) <= tol
    decode = make_case(2 * group, 2, 64, 203, q_len=1, chunk=16, budget=96, dtype=dtype, seed=group)
    assert rel_err(_run_on_cuda(decode, OP_SPARSE)[-1], decode.ref_sparse) <= tol
    assert rel_err(_run_on_cuda(decode, OP_SPARSE, decode=True)[-1], decode.ref_sparse) <= tol
    assert rel_err(_run_on_cuda(decode, OP_DENSE, decode=True)[-1], decode.ref_dense) <= tol


@pytest.mark.gpu
@needs_cuda_gpu
def test_cuda_gpu_timing_against_sdpa(capsys) -> None:
    """Times the TVM kernels on the GPU (and torch SDPA when torch has CUDA); prints, asserts nothing on speed."""
    import time

    import torch
    import tvm

    case = make_case(4, 1, 256, 4096, chunk=32, budget=2048, seed=0)
    dev = tvm.cuda(0)
    arch = gpu_arch(dev)
    target = tvm.target.Target({"kind": "cuda", "arch": arch, "host": {"kind": "llvm"}})
    lines = []
    for op in (OP_SELECT, OP_SPARSE, OP_DENSE):
        lib = tvm.compile(gpu_kernels.build(case.spec(op), target), target=target)
        tensors = [tvm.runtime.tensor(a, dev) for a in case.args(op)]
        seconds = lib.mod.time_evaluator(SYMBOL[op], dev, number=3, repeat=3)(*tensors).mean
        lines.append(f"TVM {op} L=4096: {seconds * 1e3:.2f} ms")
    if torch.cuda.is_available():
        # K/V expanded (a view) rather than enable_gqa, which sends fp32 to SDPA's math kernel
        q = torch.from_numpy(case.q).cuda()[None]
        k, v = (torch.from_numpy(x).cuda()[None].expand(1, *case.q.shape) for x in (case.k, case.v))
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(3):
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.cuda.synchronize()
        lines.append(f"torch SDPA L=4096: {(time.perf_counter() - start) / 3 * 1e3:.2f} ms")
    with capsys.disabled():
        print("\n" + "\n".join(lines))


@needs_opencl
def test_registry_dispatches_opencl_targets_to_the_gpu_kernels() -> None:
    from edgeattn.kernels_tvm import registry
    from edgeattn.kernels_tvm.gpu_opencl import OpenCLKernelRunner

    case = make_case(4, 2, 16, 53, chunk=8, budget=24, seed=9)
    target = T.get_target("opencl-mali")
    kw = dict(heads_q=4, heads_kv=2, head_dim=16, budget=24, sinks=4)
    mod = registry.build_module(OP_SPARSE, target, **kw)
    out = OpenCLKernelRunner(mod, target)(*case.args(OP_SPARSE))[-1]
    assert rel_err(out, case.ref_sparse) <= 1e-4


def test_launch_plan_rejects_bad_arrays_with_clear_errors() -> None:
    from edgeattn.kernels_tvm.gpu_launch import launch_plan

    case = make_case(4, 2, 16, 21)
    target = T.get_target("opencl-mali")
    mod = gpu_kernels.build(case.spec(OP_DENSE), target)
    q, k, v, out = case.args(OP_DENSE)
    with pytest.raises(ValueError, match=r"argument 0 \(Q\) must be float32"):
        launch_plan(mod, target, [q.astype(np.float64), k, v, out])
    with pytest.raises(ValueError, match=r"argument 1 \(K\) dim 0 must be 2"):
        launch_plan(mod, target, [q, k[:1], v, out])
    with pytest.raises(ValueError, match="disagrees with Lk"):
        launch_plan(mod, target, [q, k, v[:, :5], out])
    with pytest.raises(ValueError, match="takes 4 arrays"):
        launch_plan(mod, target, [q, k, v])
    plan = launch_plan(mod, target, [q, k, v, out])
    (launch,) = plan.launches
    assert launch.block == (gpu_kernels.attention_tiles(case.spec(OP_DENSE), target)[0] * 2, 1, 1)


@needs_opencl
@pytest.mark.parametrize("k_len,q_len", [(1, 1), (3, 1), (9, 2)])
def test_opencl_tiny_lengths_shorter_than_sinks_and_chunk(k_len: int, q_len: int) -> None:
    case = make_case(4, 2, 16, k_len, q_len=q_len, chunk=8, budget=16, sinks=4, seed=k_len)
    _check_opencl(case)
    if q_len == 1:
        for op, ref in ((OP_SPARSE, case.ref_sparse), (OP_DENSE, case.ref_dense)):
            out = _opencl_runner("opencl-mali", case.spec(op).with_(decode=True))(*case.args(op))[-1]
            assert rel_err(out, ref) <= 1e-4
