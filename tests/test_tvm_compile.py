"""`edgeattn compile`: an export -> a TVM artifact whose Relax VM gives ONNX Runtime's logits, with every
attention layer on the kernels_tvm kernels, loadable with TVM's runtime library alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgeattn.config import AttentionConfig
from edgeattn.export import exporter, tvm_import
from edgeattn.export.verify import OrtGemma
from edgeattn.models import LoadedModel
from edgeattn.runtime import tvm_backend, tvm_compile
from edgeattn.tiny import tiny_model

pytest.importorskip("tvm")

TWO_LAYERS = {
    "gemma2": dict(num_hidden_layers=2),
    "gemma3": dict(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"]),
}
CASES = [("gemma3", "dense"), ("gemma3", "dhsa"), ("gemma2", "dhsa")]  # gemma2: softcapping in every layer
MAX_CONTEXT = 128


def _export(folder: Path, family: str, kind: str) -> Path:
    cfg = AttentionConfig(kind=kind, budget=12, chunk_size=4, sinks=2)
    lm = LoadedModel(model=tiny_model(family, **TWO_LAYERS[family]), tokenizer=None, name=family, path=Path("."))
    return exporter.export_loaded(lm, folder / f"{family}-{kind}.onnx", cfg).onnx_path


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[tuple[str, str], tuple[Path, Path]]:
    """(family, kind) -> (onnx file, artifact folder), compiled once for the module."""
    out = {}
    folder = tmp_path_factory.mktemp("tvm-compile")
    for family, kind in CASES:
        onnx_path = _export(folder, family, kind)
        res = tvm_compile.compile_artifact(onnx_path, "x86-host", max_context=MAX_CONTEXT)
        assert not res.cached
        out[(family, kind)] = (onnx_path, res.path)
    return out


def _ort_steps(onnx_path: Path, steps: list[list[int]]) -> list[np.ndarray]:
    """Last-token logits of ONNX Runtime for each step (the cache carried over)."""
    sess = OrtGemma(onnx_path)
    past = sess.empty_past(1)
    logits = []
    for ids in steps:
        plen = next(iter(past.values())).shape[2]
        n = len(ids)
        feed = {
            "input_ids": np.asarray(ids, np.int64)[None],
            "attention_mask": np.ones((1, plen + n), np.int64),
            "position_ids": np.arange(plen, plen + n)[None],
            **past,
        }
        res = sess.session.run(None, feed)
        logits.append(res[0].reshape(-1))
        past = {name: res[1 + i] for i, name in enumerate(sess.past_names)}
    return logits


def _steps(seed: int = 0) -> list[list[int]]:
    """A prefill of 37 tokens in two chunks (21 is not a multiple of the chunk size), then 8 decode steps."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, 512, 37).tolist()
    return [prompt[:21], prompt[21:]] + [[int(t)] for t in rng.integers(0, 512, 8)]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("family, kind", CASES)
def test_prefill_and_decode_match_onnxruntime(artifacts, family: str, kind: str) -> None:
    onnx_path, folder = artifacts[(family, kind)]
    steps = _steps()
    expected = _ort_steps(onnx_path, steps)
    sess = tvm_backend.open_session(folder)
    assert sess.info.backend == "tvm" and sess.info.attention == kind
    for ids, exp in zip(steps, expected, strict=True):
        got = sess.append(ids)
        assert got.shape == exp.shape and got.dtype == np.float32
        assert _rel(got, exp) < 1e-4, (family, kind, sess.cached_tokens)
    assert sess.cached_tokens == 37 + 8
    # reset: the same prompt again from an empty cache gives the same logits
    sess.reset()
    assert sess.cached_tokens == 0
    assert _rel(sess.append(steps[0] + steps[1]), expected[1]) < 1e-4
    sess.close()


def test_every_attention_layer_is_on_a_kernel(artifacts) -> None:
    for (family, kind), (_, folder) in artifacts.items():
        man = json.loads((folder / "manifest.json").read_text())
        dense_layers = [r for r in man["export"]["layers"] if r["attention"] == "dense"]
        assert man["rewrites"]["dense_attention_fused"] == len(dense_layers), (family, kind)
        kernels = " ".join(man["kernels"])
        assert ("dense_flash_attention" in kernels) == bool(dense_layers)
        assert ("dhsa_sparse_attention" in kernels) == (kind == "dhsa")
        assert man["rewrites"]["gemms_packed"] > 0 and "edgeattn_gemm" in kernels
    # no Softmax (an L x L score tensor) is left in the rewritten graph
    onnx_path, _ = artifacts[("gemma2", "dhsa")]
    model, fused, _ = tvm_import.prepare_with_kernels(
        onnx.load(str(onnx_path)), tvm_import.export_manifest_for(onnx_path), None
    )
    assert fused == 1 and not any(n.op_type in ("Softmax", "Where") for n in model.graph.node)


def test_manifest_holds_hashes_target_tvm_and_planned_memory(artifacts) -> None:
    import tvm

    onnx_path, folder = artifacts[("gemma3", "dhsa")]
    man = json.loads((folder / "manifest.json").read_text())
    assert man["tvm"] == tvm.__version__ and man["target"]["profile"] == "x86-host"
    assert man["target"]["json"]["kind"] == "llvm"
    assert man["export"]["sha256"][onnx_path.name] == tvm_compile.sha256_file(onnx_path)
    for name in ("model.so", "params.bin"):
        assert man["files"][name] == tvm_compile.sha256_file(folder / name)
    mem = man["memory"]
    assert mem["weights_bytes"] == sum(int(np.prod(p["shape"])) * 4 for p in man["params"])
    assert 0 < mem["planned_activation_bytes"] and man["max_context"] == MAX_CONTEXT


def test_second_compile_is_cached_and_the_key_follows_the_inputs(artifacts) -> None:
    from edgeattn.kernels_tvm.targets import get_profile

    onnx_path, folder = artifacts[("gemma3", "dense")]
    again = tvm_compile.compile_artifact(onnx_path, "x86-host", max_context=MAX_CONTEXT)
    assert again.cached and again.path == folder and again.seconds < 5
    hashes = again.manifest["export"]["sha256"]
    key = again.manifest["key"]
    host, arm = get_profile("x86-host"), get_profile("arm64")
    assert tvm_compile.artifact_key(hashes, host, MAX_CONTEXT, again.manifest["tvm"]) == key
    assert tvm_compile.artifact_key(hashes, host, MAX_CONTEXT + 1, again.manifest["tvm"]) != key
    assert tvm_compile.artifact_key(hashes, arm, MAX_CONTEXT, again.manifest["tvm"]) != key
    assert tvm_compile.artifact_key(hashes, host, MAX_CONTEXT, "0.19.0") != key
    assert tvm_compile.artifact_key({"x": "0" * 64}, host, MAX_CONTEXT, again.manifest["tvm"]) != key


def test_failed_compile_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    onnx_path = _export(tmp_path, "gemma3", "dense")

    def boom(*a, **k):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(tvm_compile, "write_params", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        tvm_compile.compile_artifact(onnx_path, "x86-host", max_context=64, out_dir=tmp_path / "art")
    assert not (tmp_path / "art").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".art")]


RUNTIME_ONLY_SCRIPT = """
import json, sys
import numpy as np
import tvm
assert tvm._RUNTIME_ONLY, "TVM_USE_RUNTIME_LIB=1 was not honoured"
assert tvm.get_global_func("target.build.llvm", allow_missing=True) is None, "the compiler is loaded"
from edgeattn.runtime.tvm_backend import open_session
steps = json.loads(sys.argv[2])
sess = open_session(sys.argv[1])
np.save(sys.argv[3], np.stack([sess.append(ids) for ids in steps]))
# (torch may be imported by tvm_ffi's DLPack integration when installed; a device has none)
assert "tvm.relax" not in sys.modules and "onnx" not in sys.modules and "edgeattn.export.tvm_import" not in sys.modules
print("ok")
"""


def test_artifact_runs_with_the_tvm_runtime_alone(artifacts, tmp_path: Path) -> None:
    onnx_path, folder = artifacts[("gemma3", "dhsa")]
    steps = _steps(seed=1)
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1", "TVM_NUM_THREADS": "2"}
    done = subprocess.run(
        [sys.executable, "-c", RUNTIME_ONLY_SCRIPT, str(folder), json.dumps(steps), str(tmp_path / "got.npy")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]
    got = np.load(tmp_path / "got.npy")
    for g, e in zip(got, _ort_steps(onnx_path, steps), strict=True):
        assert _rel(g, e) < 1e-4


# ------------------------------------------------------------------ bad input: clear error, exit 2


def _copy(folder: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(folder, dest)
    return dest


def test_corrupt_library_is_refused_before_loading(artifacts, tmp_path: Path) -> None:
    bad = _copy(artifacts[("gemma3", "dense")][1], tmp_path / "bad")
    lib = bad / "model.so"
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0xFF
    lib.write_bytes(bytes(data))
    with pytest.raises(tvm_backend.ArtifactError, match="sha256.*not loaded") as err:
        tvm_backend.open_session(bad)
    assert err.value.exit_code == 2


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(tvm="0.19.0"), "built by TVM 0.19.0"),
        (lambda m: m["target"].update(arch="aarch64", profile="arm64"), "is for target 'arm64'"),
        (lambda m: m.update(format="something-else"), "not an edgeattn TVM artifact"),
    ],
)
def test_foreign_artifacts_give_a_clear_error(artifacts, tmp_path: Path, edit, message: str) -> None:
    bad = _copy(artifacts[("gemma3", "dense")][1], tmp_path / "bad")
    man = json.loads((bad / "manifest.json").read_text())
    edit(man)
    (bad / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(tvm_backend.ArtifactError, match=message):
        tvm_backend.open_session(bad)
    (bad / "manifest.json").write_text("{broken")
    with pytest.raises(tvm_backend.ArtifactError, match="damaged"):
        tvm_backend.open_session(bad)
    with pytest.raises(tvm_backend.ArtifactError, match="not a TVM artifact"):
        tvm_backend.open_session(tmp_path / "missing")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgeattn.cli", "compile", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_refuses_a_non_edgeattn_onnx_file(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    stock = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]))
    onnx.save(stock, tmp_path / "stock.onnx")
    done = _cli(str(tmp_path / "stock.onnx"), "--quiet")
    assert done.returncode == 2 and "error:" in done.stderr and "not an edgeattn export" in done.stderr
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    (tmp_path / "junk.manifest.json").write_text(json.dumps({"format": "edgeattn-onnx-export", "files": {}}))
    done = _cli(str(tmp_path / "junk.onnx"), "--quiet")
    assert done.returncode == 2 and "cannot be read as ONNX" in done.stderr
    done = _cli(str(tmp_path / "stock.onnx"), "--device", "nope")
    assert done.returncode == 2 and "unknown target 'nope'" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.manifest.json", "junk.onnx", "stock.onnx"]


def test_cli_compiles_then_answers_from_the_cache(artifacts) -> None:
    onnx_path, folder = artifacts[("gemma3", "dense")]
    done = _cli(str(onnx_path), "--max-context", str(MAX_CONTEXT), "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    assert summary["cached"] and Path(summary["artifact"]) == folder


# ------------------------------------------------------------------ the frontend seam


def _stock_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    w = helper.make_tensor("w", TensorProto.FLOAT, [8, 4], np.arange(32, dtype=np.float32).tolist())
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Softmax", ["h"], ["y"], axis=-1)]
    return helper.make_model(helper.make_graph(nodes, "stock", [x], [y], initializer=[w]))


def test_a_stock_graph_imports_unchanged_with_the_extended_table() -> None:
    import tvm
    from tvm.relax.frontend.onnx import from_onnx
    from tvm.relax.frontend.onnx import onnx_frontend as fe

    plain = from_onnx(_stock_model())
    stock_table = fe._get_convert_map
    lowering = tvm_import._Lowering(tvm.target.Target({"kind": "llvm"}), 4, None)
    with tvm_import.extended_convert_map(lowering.converters()):
        assert tvm_import.OP_DENSE in fe._get_convert_map()
        hooked = from_onnx(_stock_model())
    assert fe._get_convert_map is stock_table  # restored
    tvm.ir.assert_structural_equal(plain, hooked)
