"""Boundary predictor: network shapes, file format checks, labels, training, the shipped file."""

from __future__ import annotations

import json

import pytest
import torch

from edgeattn import calibrate, chunking, dhsa, predictor
from edgeattn.config import AttentionConfig
from edgeattn.predictor import BoundaryPredictor, PredictorConfig, PredictorFileError

SMALL = PredictorConfig(in_dim=32, hidden=8, window=4, mlp=8, threshold=0.25, model={"name": "tiny"})


def _segmented_keys(length: int, segments: int, seed: int, heads: int = 2, dim: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(segments, heads, dim, generator=g) * 3
    cuts = torch.sort(torch.randperm(length - 2, generator=g)[: segments - 1] + 1).values
    seg = torch.bucketize(torch.arange(length), cuts, right=True)
    return (torch.randn(1, heads, length, dim, generator=g) * 0.5 + centres[seg].permute(1, 0, 2)[None]).float()


def test_forward_shapes_and_edges() -> None:
    net = BoundaryPredictor(SMALL).eval()
    for length in (1, 3, 50):
        out = net(torch.randn(2, length, 32))
        assert out.shape == (2, length) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="features"):
        net(torch.randn(1, 5, 31))


def test_save_load_roundtrip_same_boundaries(tmp_path) -> None:
    torch.manual_seed(0)
    net = BoundaryPredictor(SMALL).eval()
    path = predictor.save(net, tmp_path / "p.safetensors", extra={"note": "test"})
    back = predictor.load(path)
    assert back.config == SMALL
    k = _segmented_keys(200, 6, seed=1)
    a = chunking.PredictorBoundaries(net, 4, 32)(k)
    b = chunking.PredictorBoundaries(back, 4, 32)(k)
    assert torch.equal(a, b)
    assert not list(tmp_path.glob("*.partial"))


def test_corrupt_files_are_clear_errors(tmp_path) -> None:
    net = BoundaryPredictor(SMALL)
    good = predictor.save(net, tmp_path / "good.safetensors")
    raw = good.read_bytes()

    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(raw[:-8] + bytes(b ^ 0xFF for b in raw[-8:]))
    with pytest.raises(PredictorFileError, match="SHA-256"):
        predictor.load(flipped)

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(PredictorFileError, match="predictor"):
        predictor.load(truncated)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(PredictorFileError, match="not a readable safetensors"):
        predictor.load(garbage)

    with pytest.raises(PredictorFileError, match="does not exist"):
        predictor.load(tmp_path / "missing.safetensors")


def test_foreign_and_future_files_are_refused(tmp_path) -> None:
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(PredictorFileError, match="not an edgeattn boundary predictor"):
        predictor.load(other)

    net = BoundaryPredictor(SMALL)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    meta = {"format": predictor.FORMAT_NAME, "version": "99", "config": SMALL.to_json(), "sha256": ""}
    future = tmp_path / "future.safetensors"
    save_file(state, str(future), metadata=meta)
    with pytest.raises(PredictorFileError, match="version 99"):
        predictor.load(future)

    bigger = PredictorConfig(**{**json.loads(SMALL.to_json()), "hidden": 16})
    meta = {**meta, "version": str(predictor.FORMAT_VERSION), "config": bigger.to_json()}
    meta["sha256"] = predictor._tensor_digest(state)
    mismatched = tmp_path / "mismatched.safetensors"
    save_file(state, str(mismatched), metadata=meta)
    with pytest.raises(PredictorFileError, match="do not fit"):
        predictor.load(mismatched)


def test_mismatched_model_is_a_clear_error() -> None:
    from edgeattn.tiny import tiny_config

    net = BoundaryPredictor(PredictorConfig(in_dim=256))
    with pytest.raises(PredictorFileError, match="edgeattn calibrate"):
        predictor.check_compatible(net, tiny_config("gemma3"))  # keys of 2 x 16 = 32 features
    predictor.check_compatible(BoundaryPredictor(SMALL), tiny_config("gemma3"))


def test_labels_mark_shifts() -> None:
    k = torch.cat([torch.ones(1, 1, 30, 8), -torch.ones(1, 1, 30, 8)], dim=2) + 0.01 * torch.randn(1, 1, 60, 8)
    labels = calibrate.shift_labels(k)
    assert labels.dtype == torch.bool and labels.shape == (60,)
    assert labels[30] and labels.sum() <= 3
    assert not labels[0]


def test_f1_score() -> None:
    gold = torch.tensor([0, 1, 0, 0, 1, 0, 0, 0], dtype=torch.bool)
    assert calibrate.f1_score(gold, gold)["f1"] == 1.0
    shifted = torch.roll(gold, 1)
    assert calibrate.f1_score(shifted, gold)["f1"] == 0.0
    assert calibrate.f1_score(shifted, gold, tolerance=1)["f1"] == 1.0


def _planted_data(n: int, length: int) -> list[list[calibrate.Sample]]:
    data = []
    for i in range(n):
        k = _segmented_keys(length, 6, seed=10 + i)
        data.append([calibrate.Sample(0, chunking.key_features(k)[0], calibrate.shift_labels(k))])
    return data


def test_training_learns_planted_boundaries() -> None:
    cfg = PredictorConfig(in_dim=32, hidden=16, window=4, mlp=16)
    result = calibrate.train(_planted_data(10, 200), cfg, epochs=20, lr=1e-2, seed=0, progress=lambda _m: None)
    assert result.test["f1"] > 0.6, result.test
    assert result.net.config.threshold == result.threshold


def test_threshold_for_chunks_hits_the_target_count() -> None:
    gen = torch.Generator().manual_seed(0)
    labels = [torch.rand(600, generator=gen) < 0.07 for _ in range(3)]
    # noisy logits that stay high for 3 positions after each label (like a smooth predictor)
    logits = []
    for y in labels:
        z = torch.randn(600, generator=gen) - 2.0
        for shift in range(3):
            z = z + 4.0 * torch.roll(y.float(), shift)
        logits.append(z)
    target = calibrate.count_chunks([y.float() for y in labels], 0.5, 8, 64)
    thr = calibrate.threshold_for_chunks(logits, target, 8, 64)
    assert abs(calibrate.count_chunks(logits, thr, 8, 64) - target) <= 2


def test_shift_rule_threshold_matches_the_shift_rules_chunk_count() -> None:
    data = _planted_data(3, 200)
    samples = [s for seq in data for s in seq]
    gen = torch.Generator().manual_seed(1)
    logits = [torch.randn(200, generator=gen) for _ in samples]
    thr, _ = calibrate.pick_threshold("shift", logits, samples, 8, 64)
    shift = chunking.ShiftBoundaries(min_chunk=8, max_chunk=64)
    target = sum(len(shift(s.feats[None, None])) - 1 for s in samples)
    assert abs(calibrate.count_chunks(logits, thr, 8, 64) - target) <= 1


def test_threshold_rules_share_the_weights() -> None:
    cfg = PredictorConfig(in_dim=32, hidden=8, window=4, mlp=8)
    data = _planted_data(4, 120)
    quiet = {"epochs": 3, "seed": 1, "progress": lambda _m: None}
    by_labels = calibrate.train(data, cfg, threshold_rule="labels", **quiet)
    by_f1 = calibrate.train(data, cfg, threshold_rule="f1", **quiet)
    # same weights (same seed), only the threshold differs
    for x, y in zip(by_labels.net.state_dict().values(), by_f1.net.state_dict().values(), strict=True):
        assert torch.equal(x, y)
    assert by_labels.net.config.threshold == by_labels.threshold
    assert by_f1.val_f1 >= by_labels.val_f1  # f1 is the F1-optimal choice on validation
    with pytest.raises(ValueError, match="threshold rule"):
        calibrate.train(data, cfg, threshold_rule="best", **quiet)


def test_training_is_deterministic() -> None:
    cfg = PredictorConfig(in_dim=32, hidden=8, window=4, mlp=8)
    data = _planted_data(3, 80)
    a = calibrate.train(data, cfg, epochs=2, seed=3, progress=lambda _m: None)
    b = calibrate.train(data, cfg, epochs=2, seed=3, progress=lambda _m: None)
    for x, y in zip(a.net.state_dict().values(), b.net.state_dict().values(), strict=True):
        assert torch.equal(x, y)
    assert a.threshold == b.threshold


def test_capture_sees_post_rope_keys_and_keeps_outputs() -> None:
    from edgeattn.tiny import tiny_model

    model = tiny_model("gemma3")
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        store = calibrate.capture(model, ids[0].tolist(), [1, 3], with_queries=True)
        after = model(ids).logits
    assert set(store) == {1, 3}
    assert store[1]["k"].shape == (1, 2, 40, 16) and store[1]["q"].shape == (1, 4, 40, 16)
    assert torch.equal(before, after)
    assert model.config._attn_implementation == "sdpa"


def test_shipped_predictor_loads_and_matches_its_card() -> None:
    assert predictor.SHIPPED_PATH.is_file(), "the package must ship the default model's predictor"
    net = predictor.load(predictor.SHIPPED_PATH)
    card = json.loads(predictor.SHIPPED_CARD.read_text())
    assert net.config.in_dim == card["fingerprint"]["key_features"] == 256
    assert card["f1"]["test"]["f1"] > 0 and "edgeattn calibrate" in card["command"]
    assert predictor.SHIPPED_PATH.stat().st_size < 400_000


@pytest.fixture(scope="module")
def gemma():
    from edgeattn import models

    return models.load()


@pytest.mark.real_model
def test_shipped_predictor_on_the_default_model(gemma) -> None:
    from edgeattn import text

    ids = text.token_ids(gemma.tokenizer, 300)
    layers = [5, 11, 17]
    store = calibrate.capture(gemma.model, ids, layers)
    cfg = AttentionConfig(chunking="predictor", budget=512)
    fn = chunking.boundary_fn_for(cfg, gemma)
    assert isinstance(fn, chunking.PredictorBoundaries)
    for layer in layers:
        b = fn(store[layer]["k"], None)
        dhsa.check_boundaries(b, 300)
        lengths = (b[1:] - b[:-1]).tolist()
        assert all(cfg.min_chunk <= n <= cfg.max_chunk for n in lengths)
        assert torch.equal(b, fn(store[layer]["k"], None))


@pytest.mark.real_model
def test_calibrate_end_to_end_small(gemma, tmp_path) -> None:
    path, card = calibrate.calibrate(
        out=tmp_path / "p.safetensors", seq_len=96, sequences_n=3, epochs=1, loaded=gemma, hidden=8
    )
    net = predictor.load(path)
    assert net.config.model["name"] == "gemma3-270m" and net.config.in_dim == 256
    written = json.loads(path.with_suffix(".json").read_text())
    assert written == card and 0 <= card["f1"]["test"]["f1"] <= 1
    assert card["data"]["tokens"] == 3 * 96 and "--sequences 3" in card["command"]
    fn = chunking.boundary_fn_for(AttentionConfig(chunking="predictor", budget=512), tmp_path, predictor=path)
    assert isinstance(fn, chunking.PredictorBoundaries)
