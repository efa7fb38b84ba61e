"""runtime/kv_cache.py: full-attention cache layers that append in place."""

from __future__ import annotations

import copy

import torch
from transformers.cache_utils import DynamicLayer

from edgeattn.runtime import kv_cache
from edgeattn.tiny import tiny_model


def test_growing_layer_appends_in_place_and_matches_concatenation() -> None:
    layer, plain = kv_cache.GrowingLayer(), DynamicLayer()
    g = torch.Generator().manual_seed(0)
    ptrs = set()
    for add in (300, 1, 1, 5, 1, 40, 1):
        k, v = torch.randn(1, 1, add, 8, generator=g), torch.randn(1, 1, add, 8, generator=g)
        keys, values = layer.update(k, v)
        ref_k, ref_v = plain.update(k, v)
        assert torch.equal(keys, ref_k) and torch.equal(values, ref_v)
        assert keys.is_contiguous() and values.is_contiguous()
        ptrs.add(keys.data_ptr())
    assert len(ptrs) == 1  # one allocation served every append (300 * 1.125 + 256 tokens of room)
    assert layer.get_seq_length() == 349
    twin = copy.deepcopy(layer)  # benchmarks copy a cache; the copy grows on its own
    twin.update(torch.ones(1, 1, 1, 8), torch.ones(1, 1, 1, 8))
    assert layer.get_seq_length() == 349 and twin.get_seq_length() == 350
    layer.crop(-9)
    keys, _ = layer.update(torch.zeros(1, 1, 1, 8), torch.zeros(1, 1, 1, 8))
    assert keys.shape[-2] == 341 and torch.equal(keys[0, 0, -1], torch.zeros(8))


def test_several_kv_heads_fall_back_to_concatenation() -> None:
    layer = kv_cache.GrowingLayer()
    k = torch.randn(1, 2, 10, 8)
    keys, _ = layer.update(k, k)
    keys, _ = layer.update(k, k)
    assert keys.shape == (1, 2, 20, 8) and keys.is_contiguous()


def test_model_decodes_the_same_on_the_growing_cache() -> None:
    from transformers import DynamicCache

    model = tiny_model("gemma3", num_key_value_heads=1)
    ids = torch.randint(4, 512, (1, 40), generator=torch.Generator().manual_seed(1))
    outs = []
    for cache in (DynamicCache(config=model.config), kv_cache.new_cache(model.config)):
        logits = []
        with torch.inference_mode():
            out = model(input_ids=ids, cache=cache, use_cache=True)
            for _ in range(6):
                nxt = out.logits[:, -1:].argmax(-1)
                out = model(input_ids=nxt, cache=cache, use_cache=True)
                logits.append(out.logits[0, -1])
        outs.append(torch.stack(logits))
    assert any(isinstance(layer, kv_cache.GrowingLayer) for layer in cache.layers)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_decode_steps_run_torch_on_one_thread_beside_the_kernels() -> None:
    """After each torch op libgomp's idle workers spin; on 2 cores TVM's pool then waits for a time slice
    before every kernel. A decode step (one token) on our kernels runs torch on one thread; prefill keeps them all."""
    from pathlib import Path

    from edgeattn.config import AttentionConfig
    from edgeattn.models import LoadedModel
    from edgeattn.runtime.torch_backend import TorchSession

    loaded = LoadedModel(tiny_model("gemma3"), None, "tiny", Path("."))
    seen: list[int] = []
    hook = loaded.model.model.layers[0].register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for kernels, decode_threads in (("tvm", 1), ("reference", 2)):
            seen.clear()
            s = TorchSession(loaded, AttentionConfig(kind="dhsa", budget=48, chunk_size=16), kernels=kernels)
            s.append(list(range(4, 60)))
            s.append([7])
            assert seen == [2, decode_threads], kernels
            assert torch.get_num_threads() == 2  # restored after the step
    finally:
        hook.remove()
        torch.set_num_threads(before)


def test_window_layer_keeps_only_its_window_after_a_prefill() -> None:
    """transformers' sliding layer keeps a slice of the call's whole K and V, so their storage stays alive
    (960 MiB over Gemma 3 270M's sliding layers after a 32K prefill); ours copies the window out."""
    from transformers.cache_utils import DynamicSlidingWindowLayer

    g = torch.Generator().manual_seed(0)
    ours, theirs = kv_cache.WindowLayer(16), DynamicSlidingWindowLayer(16)
    for add in (200, 1, 1, 40, 1):
        k, v = torch.randn(1, 1, add, 8, generator=g), torch.randn(1, 1, add, 8, generator=g)
        got, ref = ours.update(k, v), theirs.update(k, v)
        assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
        held = ours.keys.untyped_storage().nbytes() + ours.values.untyped_storage().nbytes()
        assert held <= 2 * (2 * 16) * 8 * 4, (add, held)  # a window-sized tensor each, not the call's
        if add == 200:  # what the fix is for: transformers' layer still holds the prompt's 200 keys
            assert theirs.keys.untyped_storage().nbytes() == 200 * 8 * 4


def test_a_long_prefill_trims_the_heap_after_each_attention_and_leaves_no_hook(monkeypatch) -> None:
    """runtime/heap.py: an attention's freed temporaries go back to the OS before the MLP's peak (glibc
    kept them mapped under it); the hooks go with the call."""
    from pathlib import Path

    from edgeattn.config import AttentionConfig
    from edgeattn.models import LoadedModel
    from edgeattn.runtime import heap, torch_backend

    monkeypatch.setattr(heap, "TRIM_FROM_TOKENS", 64)  # the tiny model's context is 4096
    loaded = LoadedModel(tiny_model("gemma3"), None, "tiny", Path("."))
    layers = loaded.model.model.layers
    trims: list[int] = []
    original = heap._TRIM
    heap._TRIM = lambda pad: trims.append(pad) or (original(pad) if original else 0)  # count the real calls
    try:
        s = torch_backend.TorchSession(loaded, AttentionConfig(kind="dense"), kernels="tvm")
        s.append(list(range(4, 4 + heap.TRIM_FROM_TOKENS)))
        assert len(trims) == len(layers)  # after each attention, before the MLP
        trims.clear()
        s.append(list(range(4, 4 + heap.TRIM_FROM_TOKENS - 1)))  # shorter: the trim is not worth its faults
        assert trims == []
        s.append([5])  # a decode step: nothing to trim
        assert trims == []
    finally:
        heap._TRIM = original
    assert all(not layer._forward_hooks and not layer.self_attn._forward_hooks for layer in layers)
