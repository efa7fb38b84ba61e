"""Kernel bundles: built with TVM's compiler, run by a process that has only the TVM runtime."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgeattn.kernels_tvm import gpu_cuda, prebuilt
from edgeattn.kernels_tvm.abi import OP_DENSE, OP_SELECT, OP_SPARSE, KernelSpec
from edgeattn.kernels_tvm.gpu_cases import make_case
from edgeattn.kernels_tvm.prebuilt import Bundle, BundleError, write_bundle

SMALL = dict(heads_q=4, heads_kv=2, head_dim=16, k_len=77, chunk=8, budget=32, sinks=4, seed=3)

RUNTIME_ONLY_SCRIPT = """
import json, sys
import numpy as np
import tvm
assert tvm._RUNTIME_ONLY, "TVM_USE_RUNTIME_LIB=1 was not honoured"
assert tvm.get_global_func("target.build.llvm", allow_missing=True) is None, "the compiler is loaded"
from edgeattn.kernels_tvm.gpu_cases import make_case, rel_err
from edgeattn.kernels_tvm.prebuilt import Bundle
bundle = Bundle.load(sys.argv[1])
case = make_case(**json.loads(sys.argv[2]))
dev = bundle.device()
errs = {}
for op in ("DHSAChunkSelect", "DHSASparseAttention", "DenseFlashAttention"):
    tensors = [tvm.runtime.tensor(a, dev) for a in case.args(op)]
    bundle.kernel(case.spec(op))(*tensors)
    got = [t.numpy() for t in tensors]
    if op == "DHSAChunkSelect":
        errs[op] = float(not (np.array_equal(got[3], case.sel) and np.array_equal(got[4], case.nsel)))
    else:
        errs[op] = rel_err(got[-1], case.ref_sparse if op == "DHSASparseAttention" else case.ref_dense)
print(json.dumps(errs))
"""


@pytest.fixture(scope="module")
def cpu_bundle(tmp_path_factory) -> Path:
    case = make_case(**SMALL)
    out = tmp_path_factory.mktemp("bundle") / "x86"
    return write_bundle(out, [case.spec(op) for op in (OP_SELECT, OP_SPARSE, OP_DENSE)], "x86-host")


def test_bundle_runs_in_a_runtime_only_process(cpu_bundle: Path) -> None:
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1", "TVM_NUM_THREADS": "2"}
    done = subprocess.run(
        [sys.executable, "-c", RUNTIME_ONLY_SCRIPT, str(cpu_bundle), json.dumps(SMALL)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    errs = json.loads(done.stdout.strip().splitlines()[-1])
    assert errs["DHSAChunkSelect"] == 0.0
    assert errs["DHSASparseAttention"] <= 1e-4
    assert errs["DenseFlashAttention"] <= 1e-4


def test_manifest_names_every_kernel_and_its_target(cpu_bundle: Path) -> None:
    manifest = json.loads((cpu_bundle / "manifest.json").read_text())
    assert manifest["target"] == "x86-host" and manifest["family"] == "cpu"
    assert sorted(e["symbol"] for e in manifest["kernels"].values()) == sorted(
        ["dhsa_chunk_select", "dhsa_sparse_attention", "dense_flash_attention"]
    )
    assert len(Bundle.load(cpu_bundle).specs()) == 3


def test_missing_spec_says_rebuild(cpu_bundle: Path) -> None:
    other = KernelSpec(op=OP_DENSE, heads_q=8, heads_kv=1, head_dim=16)
    with pytest.raises(BundleError, match="has no DenseFlashAttention kernel.*rebuild"):
        Bundle.load(cpu_bundle).kernel(other)


def test_bad_bundle_folders_give_clear_errors(tmp_path: Path, cpu_bundle: Path) -> None:
    with pytest.raises(BundleError, match="not a kernel bundle"):
        Bundle.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="damaged"):
        Bundle.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 99, "kernels": {}}))
    with pytest.raises(BundleError, match="format 99"):
        Bundle.load(tmp_path)
    manifest = json.loads((cpu_bundle / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="lacks k000.so"):
        Bundle.load(tmp_path)


def test_failed_build_leaves_the_old_bundle_and_no_temp_files(tmp_path: Path) -> None:
    good = [KernelSpec(op=OP_SELECT, heads_q=2, heads_kv=1, head_dim=8, budget=16)]
    out = write_bundle(tmp_path / "b", good, "x86-host")
    before = sorted(p.name for p in out.iterdir())

    def specs_then_fail():
        yield KernelSpec(op=OP_DENSE, heads_q=2, heads_kv=1, head_dim=8)
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        write_bundle(tmp_path / "b", specs_then_fail(), "x86-host")
    assert sorted(p.name for p in out.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


needs_nvcc = pytest.mark.skipif(gpu_cuda.nvcc_path() is None, reason="nvcc not installed (CUDA toolkit)")


@needs_nvcc
def test_cuda_bundle_carries_cubins_matched_by_source_hash(tmp_path: Path) -> None:
    spec = KernelSpec(op=OP_SELECT, heads_q=2, heads_kv=1, head_dim=8, budget=16)
    out = write_bundle(tmp_path / "sm90", [spec], "cuda-sm90")
    (entry,) = json.loads((out / "manifest.json").read_text())["kernels"].values()
    code = entry["device_code"]
    assert code["arch"] == "sm_90" and (out / code["file"]).read_bytes()[:4] == b"\x7fELF"
    # the library stores the CUDA source (compiled again here: codegen is deterministic); the cubin is keyed by its hash
    from edgeattn.kernels_tvm import registry
    from edgeattn.kernels_tvm.targets import get_profile

    target = get_profile("cuda-sm90").target()
    lib = registry.compile_module(registry.builder_for(target)(spec, target), target)
    source = lib.mod.imports[0].inspect_source()
    assert prebuilt._sha256(source) == code["sha256"]
    # sm_72: nvcc 13 cannot build it, so the bundle ships the source only
    if not gpu_cuda.nvcc_supports("sm_72"):
        (entry72,) = json.loads((write_bundle(tmp_path / "sm72", [spec], "cuda-sm72") / "manifest.json").read_text())[
            "kernels"
        ].values()
        assert entry72["device_code"] is None


def test_cuda_load_hook_answers_from_the_bundle_first() -> None:
    import tvm

    prebuilt._register_cuda_compile_hook()
    hook = tvm.get_global_func("tvm_callback_cuda_compile")
    source = 'extern "C" __global__ void probe() {}  // edgeattn test'
    prebuilt._PREBUILT_CUDA[prebuilt._sha256(source)] = b"device code"
    try:
        before = dict(prebuilt.CUDA_LOADS)
        assert bytes(hook(source)) == b"device code"
        assert prebuilt.CUDA_LOADS["prebuilt"] == before["prebuilt"] + 1
    finally:
        prebuilt._PREBUILT_CUDA.pop(prebuilt._sha256(source))
    prebuilt._register_cuda_compile_hook()  # idempotent: does not wrap itself
    assert tvm.get_global_func("tvm_callback_cuda_compile").same_as(hook)


def test_cuda_benchmark_without_a_gpu_exits_2_with_a_message(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "benchmarks/kernels_cuda.py", "run", "--bundle", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=120,
    )
    assert done.returncode == 2
    assert "error:" in done.stderr and "not a kernel bundle" in done.stderr


def test_cuda_benchmark_bundle_refuses_a_non_cuda_target(tmp_path: Path) -> None:
    for target in ("x86-host", "cuda-sm99"):
        done = subprocess.run(
            [sys.executable, "benchmarks/kernels_cuda.py", "bundle", "--target", target, "--out", str(tmp_path / "b")],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
            timeout=120,
        )
        assert done.returncode == 2 and "must be a CUDA profile" in done.stderr and "cuda-sm87" in done.stderr
        assert not (tmp_path / "b").exists()


def test_cuda_benchmark_checks_cover_every_gqa_ratio_and_dtype() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import kernels_cuda

    names = [name for name, _, _ in kernels_cuda.check_cases()]
    for dtype in ("float32", "float16"):
        for g in (1, 2, 4, 8):
            assert f"gqa{g} {dtype} prefill softcap" in names and f"gqa{g} {dtype} decode" in names
    specs = kernels_cuda.all_specs()
    assert {s.op for s in specs} == {OP_SELECT, OP_SPARSE, OP_DENSE}
    assert any(s.decode for s in specs) and {s.dtype for s in specs} == {"float32", "float16"}
