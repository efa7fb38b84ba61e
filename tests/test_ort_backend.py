"""Backend ``ort``: ONNX Runtime on exported files, the ai.edgeattn nodes on the TVM kernels.

Tiny random Gemma 3 and Gemma 2 (softcap) models: every check runs the real exporter, real
ONNX Runtime and the real TIR kernels, against the PyTorch reference (edgeattn.dhsa patched
into the model) or the model as shipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from edgeattn import patching, tiny
from edgeattn.config import AttentionConfig
from edgeattn.errors import CorruptModelError, EdgeAttnError
from edgeattn.export import manifest as manifest_mod
from edgeattn.export import ops
from edgeattn.export.exporter import export_loaded
from edgeattn.export.verify import torch_greedy
from edgeattn.runtime import ort_backend
from edgeattn.runtime.ort_backend import ManifestMismatchError, open_session
from edgeattn.runtime.ort_ops import run_node

SMALL = AttentionConfig(kind="dhsa", budget=24, chunk_size=4, sinks=2)  # keeps ~1/3 of 70 keys
FAMILIES = ("gemma3", "gemma2")  # gemma2: attention and final logit softcapping
PROMPT = 70
DECODE = 16


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())


@pytest.fixture(scope="module", params=FAMILIES)
def tiny_loaded(request):
    model = tiny.tiny_model(request.param)
    return SimpleNamespace(model=model, name=f"tiny-{request.param}", tokenizer=None, family=request.param)


@pytest.fixture(scope="module")
def prompt() -> list[int]:
    return np.random.default_rng(0).integers(0, 512, PROMPT).tolist()


def _export(loaded, folder: Path, cfg: AttentionConfig, dense_op: str = "onnx") -> Path:
    path = folder / f"{loaded.family}-{cfg.kind}-{cfg.budget}-obs{cfg.observe}-{dense_op}.onnx"
    if not path.exists():
        export_loaded(loaded, path, cfg, dense_op=dense_op)
    return path


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ort_exports")


def _greedy(session, ids: list[int], n: int) -> tuple[np.ndarray, list[int]]:
    logits = session.append(ids)
    first, tokens = logits, []
    for i in range(n):
        tokens.append(int(logits.argmax()))
        if i + 1 < n:
            logits = session.append([tokens[-1]])
    return first, tokens


def _torch_reference(loaded, cfg: AttentionConfig | None, ids: list[int]) -> tuple[np.ndarray, list[int]]:
    """Last-position logits and DECODE greedy tokens of the model patched with ``cfg`` (None: as shipped)."""
    model = loaded.model
    if cfg is not None:
        patching.patch(model, cfg, "global")
    try:
        logits, tokens = torch_greedy(model, torch.tensor([ids]), DECODE)
    finally:
        patching.unpatch(model)
    return logits[0, -1], tokens


@pytest.mark.parametrize("dense_op", ["edgeattn", "onnx"])
def test_small_budget_matches_pytorch_reference(tiny_loaded, export_dir, prompt, dense_op):
    """ort + tvm kernels at a budget well below L: the PyTorch DHSA reference's logits and greedy tokens."""
    path = _export(tiny_loaded, export_dir, SMALL, dense_op)
    ref_logits, ref_tokens = _torch_reference(tiny_loaded, SMALL, prompt)
    session = open_session(path, kernels="tvm", threads=2)
    assert session.info.kernels == "tvm" and session.info.attention == "dhsa"
    kernel_ops = {n.op_type for n in session._runner.kernel_nodes}
    assert kernel_ops == ({ops.OP_SELECT, ops.OP_SPARSE} | ({ops.OP_DENSE} if dense_op == "edgeattn" else set()))
    logits, tokens = _greedy(session, prompt, DECODE)
    assert rel_err(logits, ref_logits) < 1e-4
    assert tokens == ref_tokens
    assert session.cached_tokens == PROMPT + DECODE - 1
    # the prefill's sparse kernel was built for this file's chunks (a tile of 8 queries per head for
    # chunks of 4), as the torch backend builds it, not for the 32-query default
    from edgeattn.kernels_tvm import registry

    tiles = {
        k.spec.query_tile for k in registry._layer_kernels.values() if k.spec.op == ops.OP_SPARSE and not k.spec.decode
    }
    assert registry.query_tile_for(np.arange(0, 33, SMALL.chunk_size)) in tiles


def test_a_long_prefill_trims_the_heap_after_each_ort_segment(tiny_loaded, export_dir, monkeypatch):
    """runtime/heap.py: the segments' freed pages go back to the OS between segments of a prefill,
    not between the steps of a decode; the logits are those of the untrimmed run."""
    from edgeattn.runtime import heap

    path = _export(tiny_loaded, export_dir, SMALL, "edgeattn")
    ids = np.random.default_rng(3).integers(0, 512, 100).tolist()
    trims: list[int] = []
    original = heap._TRIM
    monkeypatch.setattr(heap, "_TRIM", lambda pad: trims.append(pad) or (original(pad) if original else 0))
    monkeypatch.setattr(heap, "TRIM_FROM_TOKENS", 10**9)
    untrimmed = open_session(path, kernels="tvm", threads=1).append(ids)
    monkeypatch.undo()
    monkeypatch.setattr(heap, "_TRIM", lambda pad: trims.append(pad) or (original(pad) if original else 0))
    monkeypatch.setattr(heap, "TRIM_FROM_TOKENS", 100)  # the tiny model's context is 4096
    session = open_session(path, kernels="tvm", threads=1)
    segments = session._runner.segments
    trims.clear()
    assert rel_err(session.append(ids), untrimmed) == 0.0
    assert len(trims) == segments > 1
    trims.clear()
    session.append([7])  # a decode step: nothing to trim
    assert trims == []


def test_budget_at_least_length_equals_dense(tiny_loaded, export_dir, prompt):
    """Budget >= L: DHSA on the kernels is the model as shipped (logits within 1e-4, same 16 tokens)."""
    cfg = AttentionConfig(kind="dhsa", budget=4096, chunk_size=4, sinks=2)
    session = open_session(_export(tiny_loaded, export_dir, cfg, "edgeattn"), kernels="tvm", threads=2)
    logits, tokens = _greedy(session, prompt, DECODE)
    ref_logits, ref_tokens = _torch_reference(tiny_loaded, None, prompt)
    assert rel_err(logits, ref_logits) < 1e-4
    assert tokens == ref_tokens


def test_chunked_prefill_equals_one_shot(tiny_loaded, export_dir, prompt):
    """Several append() calls = one (splits on chunk boundaries, so DHSA's query chunks are the same).

    Exactly so for the paper's selection (``observe=0``): the observation window is each call's last
    queries, so with it a split prefill picks its vertical chunks per call (export/OPS.md)."""
    paper = SMALL.with_(observe=0)
    session = open_session(_export(tiny_loaded, export_dir, paper, "edgeattn"), kernels="tvm", threads=2)
    one_shot = session.append(prompt)
    after = session.append([7])
    session.reset()
    assert session.cached_tokens == 0
    for lo, hi in ((0, 32), (32, 48), (48, PROMPT)):
        chunked = session.append(prompt[lo:hi])
    assert session.cached_tokens == PROMPT
    assert rel_err(chunked, one_shot) < 1e-4
    assert rel_err(session.append([7]), after) < 1e-4


@pytest.mark.parametrize("dense_op", ["edgeattn", "gqa"])
def test_dense_ops_equal_plain_export(tiny_loaded, export_dir, prompt, dense_op):
    """DenseFlashAttention (function body and TVM kernel) and ORT's GroupQueryAttention = the plain dense file,
    in prefill, a chunk after a cache, and decode."""
    dense = AttentionConfig(kind="dense")
    plain = open_session(_export(tiny_loaded, export_dir, dense, "onnx"), kernels="reference", threads=2)
    path = _export(tiny_loaded, export_dir, dense, dense_op)
    for kernels in ("reference", "tvm"):
        other = open_session(path, kernels=kernels, threads=2)
        plain.reset()
        for piece in (prompt[:40], prompt[40:], [3]):
            assert rel_err(other.append(piece), plain.append(piece)) < 1e-5, (dense_op, kernels)
    assert ort_backend.check_export(path)["onnx"]["dense_op"] == dense_op


def _random_qk(hq=4, hkv=2, lq=45, lk=45, d=16, seed=0):
    g = np.random.default_rng(seed)
    q = g.standard_normal((1, hq, lq, d)).astype(np.float32) * 3  # peaked softmax: capping matters
    k = g.standard_normal((1, hkv, lk, d)).astype(np.float32) + 0.5  # a common key component, as in real models
    v = g.standard_normal((1, hkv, lk, d)).astype(np.float32)
    return q, k, v


@pytest.mark.parametrize("lq", [45, 7, 1])  # prefill, a query suffix starting mid-chunk, decode
def test_nodes_on_kernels_equal_function_bodies(lq):
    """Each ai.edgeattn node on its kernel gives the function body's result: sel/nsel equal, out to rounding."""
    import onnxruntime as ort

    q, k, v = _random_qk(lq=lq)
    boundaries = np.array([0, *range(4, 45, 4), 45], np.int64)
    width = ops.max_selected(24, 2, 4)
    tq, tk = ("q", 1, ["B", "Hq", "Lq", "D"]), ("k", 1, ["B", "Hkv", "Lk", "D"])
    tv, tb = ("v", 1, ["B", "Hkv", "Lk", "D"]), ("boundaries", 7, ["N"])
    tsel, tnsel = ("sel", 7, ["B", "Hkv", "Nq", "M"]), ("nsel", 7, ["B", "Hkv", "Nq"])
    tout = ("out", 1, ["B", "Hq", "Lq", "D"])
    # the attributes of the tiny Gemma 2's layers (scaling 1/4, softcap 50, window 16, budget 24, 2 sinks):
    # the kernels compiled for the model tests serve here too
    select = ops.single_op_model(ops.OP_SELECT, [tq, tk, tb], [tsel, tnsel], budget=24, sinks=2, max_selected=width)
    attn_in = [tq, tk, tv, tb, tsel, tnsel]
    sparse = ops.single_op_model(ops.OP_SPARSE, attn_in, [tout], scaling=0.25, softcap=50.0, sinks=2)
    dense = ops.single_op_model(ops.OP_DENSE, [tq, tk, tv], [tout], scaling=0.25, softcap=50.0, window=16)

    def body(model, feed):
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)

    sel, nsel = body(select, {"q": q, "k": k, "boundaries": boundaries})
    k_sel, k_nsel = run_node(select.graph.node[0], [q, k, boundaries])
    assert k_sel.dtype == np.int64 and k_sel.shape == sel.shape
    np.testing.assert_array_equal(k_sel, sel)
    np.testing.assert_array_equal(k_nsel, nsel)
    feed = {"q": q, "k": k, "v": v, "boundaries": boundaries, "sel": sel, "nsel": nsel}
    (out,) = body(sparse, feed)
    (k_out,) = run_node(sparse.graph.node[0], [q, k, v, boundaries, sel, nsel])
    np.testing.assert_allclose(k_out, out, rtol=1e-5, atol=1e-5)
    (out,) = body(dense, {"q": q, "k": k, "v": v})
    (k_out,) = run_node(dense.graph.node[0], [q, k, v])
    np.testing.assert_allclose(k_out, out, rtol=1e-5, atol=1e-5)


def test_long_prefill_builds_no_length_squared_tensor(export_dir):
    """4096 tokens through the tvm path: the growth of peak RSS stays far below one L x L score tensor
    (4 heads x 4096^2 x 4 B = 256 MiB per layer, which the function bodies and plain ONNX attention build)."""
    from edgeattn.runtime.measure import MIB, PeakRSS

    loaded = SimpleNamespace(model=tiny.tiny_model("gemma3"), name="tiny-gemma3", tokenizer=None, family="gemma3")
    session = open_session(_export(loaded, export_dir, SMALL, "edgeattn"), kernels="tvm", threads=2)
    ids = np.random.default_rng(1).integers(0, 512, 4096).tolist()
    session.append(ids[:64])  # compile the kernels outside the measured region
    session.reset()
    with PeakRSS() as mem:
        logits = session.append(ids)
    assert np.isfinite(logits).all()
    assert mem.extra < 64 * MIB, f"prefill grew RSS by {mem.extra / MIB:.0f} MiB"


# ------------------------------------------------------------------ bad files


@pytest.fixture
def dense_file(tmp_path) -> Path:
    loaded = SimpleNamespace(model=tiny.tiny_model("gemma3"), name="tiny", tokenizer=None)
    path = tmp_path / "m.onnx"
    export_loaded(loaded, path, AttentionConfig(kind="dense"))
    return path


def _assert_user_error(exc: EdgeAttnError, *words: str) -> None:
    assert exc.exit_code == 2
    msg = str(exc)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg


def test_file_not_matching_its_manifest_is_refused(dense_file, tmp_path):
    with dense_file.open("ab") as f:  # the file changed after export
        f.write(b"\0")
    for kernels in ("tvm", "reference"):
        with pytest.raises(ManifestMismatchError) as err:
            open_session(dense_file, kernels=kernels)
        _assert_user_error(err.value, "m.onnx", "sha256", "re-export")


def test_manifest_of_another_file_or_none_is_refused(dense_file, tmp_path):
    other = tmp_path / "other.onnx"
    other.write_bytes(dense_file.read_bytes())
    with pytest.raises(ManifestMismatchError) as err:  # no other.manifest.json
        open_session(other)
    _assert_user_error(err.value, "no manifest")
    manifest_mod.manifest_path(other).write_text(manifest_mod.manifest_path(dense_file).read_text())
    with pytest.raises(ManifestMismatchError) as err:  # a manifest that describes m.onnx
        open_session(other)
    _assert_user_error(err.value, "m.onnx", "not other.onnx")
    manifest_mod.manifest_path(other).write_text("{not json")
    with pytest.raises(ManifestMismatchError) as err:
        open_session(other)
    _assert_user_error(err.value, "unreadable")


@pytest.mark.parametrize("kernels", ["tvm", "reference"])
def test_corrupt_onnx_file_is_refused(dense_file, kernels):
    """Garbage bytes whose manifest matches them (a corrupt export): not ONNX, one clear error."""
    dense_file.write_bytes(b"\x08\x07garbage, not a protobuf" * 100)
    mpath = manifest_mod.manifest_path(dense_file)
    data = json.loads(mpath.read_text())
    data["files"] = manifest_mod.file_entries([dense_file])
    mpath.write_text(json.dumps(data))
    with pytest.raises(CorruptModelError) as err:
        s = open_session(dense_file, kernels=kernels)
        s.append([1, 2, 3])
    assert not isinstance(err.value, ManifestMismatchError)
    _assert_user_error(err.value, "m.onnx", "re-export")


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(EdgeAttnError) as err:
        open_session(tmp_path / "nope.onnx")
    _assert_user_error(err.value, "does not exist")


# ------------------------------------------------------------------ the export cache


def test_cached_export_is_made_once_per_key(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEATTN_CACHE", str(tmp_path))
    loaded = SimpleNamespace(model=tiny.tiny_model("gemma3"), name="tiny-gemma3", tokenizer=None)
    first = ort_backend.cached_export(loaded, SMALL)
    stamp = first.stat().st_mtime_ns
    again = ort_backend.cached_export(loaded, SMALL)
    assert again == first and again.stat().st_mtime_ns == stamp  # not exported twice
    other = ort_backend.cached_export(loaded, SMALL, dense_op="edgeattn")
    budget = ort_backend.cached_export(loaded, AttentionConfig(kind="dhsa", budget=32, chunk_size=4, sinks=2))
    assert len({first.parent, other.parent, budget.parent}) == 3
    leftovers = [p.name for p in (tmp_path / "onnx").iterdir() if p.name.startswith(".")]
    assert leftovers == []
    session = open_session(other, kernels="tvm", threads=2)  # the manifest check passes on a cached file
    assert np.isfinite(session.append([1, 2, 3])).all()


# ------------------------------------------------------------------ the real model


@pytest.mark.real_model
@pytest.mark.slow  # exports the real model (~1-2 min) before it runs; the tiny models cover the behaviour in CI
def test_real_model_full_budget_equals_shipped_model(real_model, tmp_path_factory, monkeypatch):
    """Gemma 3 270M at an odd length (1531) with budget 2048 >= L, every layer on the kernels
    (--dense-op edgeattn): the model as shipped's logits within 1e-4 and its 16 greedy tokens."""
    from edgeattn import text

    monkeypatch.setenv("EDGEATTN_CACHE", str(tmp_path_factory.mktemp("ort_real_cache")))
    cfg = AttentionConfig(kind="dhsa", budget=2048)
    path = ort_backend.cached_export(real_model, cfg, dense_op="edgeattn")
    ids = text.token_ids(real_model.tokenizer, 1531)
    session = open_session(path, kernels="tvm", threads=2)
    logits, tokens = _greedy(session, ids, DECODE)
    session.close()
    ref_logits, ref_tokens = _torch_reference(real_model, None, ids)
    assert rel_err(logits, ref_logits) < 1e-4
    assert tokens == ref_tokens
