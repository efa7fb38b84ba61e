"""Tiny random Gemma 2 / Gemma 3 models for architecture tests.

No Gemma 2 weights ship on PyPI, so Gemma 2 (softcapping, alternating local and
global layers, GQA) is exercised with random weights of the real architecture.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def tiny_config(family: str = "gemma3", **overrides: Any) -> Any:
    """A small config of ``family`` ("gemma2" or "gemma3") with global and sliding layers."""
    from transformers import Gemma2Config, Gemma3TextConfig

    common: dict[str, Any] = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        sliding_window=16,
        query_pre_attn_scalar=16,
    )
    if family == "gemma2":
        common.update(attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
        cls = Gemma2Config
    elif family == "gemma3":
        common.update(sliding_window_pattern=2, layer_types=["sliding_attention", "full_attention"] * 2)
        cls = Gemma3TextConfig
    else:
        raise ValueError(f"unknown tiny family {family!r}; use gemma2 or gemma3")
    common.update(overrides)
    return cls(**common)


def tiny_model(family: str = "gemma3", seed: int = 0, **overrides: Any) -> Any:
    """A randomly initialised causal LM of ``family``, float32, eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    impl = "eager" if family == "gemma2" else "sdpa"  # SDPA cannot softcap
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), attn_implementation=impl)
    return model.eval()


def save_tiny_model(out_dir: Path, family: str = "gemma3", seed: int = 0, tokenizer: bool = False) -> Path:
    """Write a tiny random model as an HF directory, for CLI tests.

    Without ``tokenizer`` the folder has none (the CLI must say so); with it, a
    512-token BPE trained on the offline pydoc prose, so every verb runs end to
    end on a model that loads, exports and compiles in seconds.
    """
    model = tiny_model(family, seed)
    model.save_pretrained(out_dir)
    if tokenizer:
        tiny_tokenizer(model.config.vocab_size).save_pretrained(out_dir)
    return out_dir


def tiny_tokenizer(vocab_size: int = 512) -> Any:
    """A byte-level BPE of ``vocab_size`` tokens trained on pydoc prose, with Gemma's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from edgeattn.text import pydoc_text

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]  # ids 0-3, as in Gemma's vocabulary
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([pydoc_text()[:200_000]], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
