"""``--verify``: run the exported file in ONNX Runtime and compare it with PyTorch.

PyTorch here is the loaded model with the same attention patched in
(``edgeattn.patching``, i.e. the ``edgeattn.dhsa`` reference), so the check
covers both the graph writer and the custom-op function bodies.  Reported per
prompt: max absolute and relative logit error, top-1 agreement, and whether
greedy decoding through the KV-cache outputs reproduces PyTorch's tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeattn.config import AttentionConfig


@dataclass
class PromptCheck:
    prompt: str  # "random" or "real"
    tokens: int
    max_abs_err: float
    rel_err: float  # max |onnx - torch| / max |torch|
    top1_agree: float  # fraction of positions whose argmax agree
    decode_tokens: int
    decode_match: bool
    onnx_tokens: list[int]
    torch_tokens: list[int]

    def line(self) -> str:
        dec = (
            f"greedy {self.decode_tokens} tokens {'match' if self.decode_match else 'DIFFER'}"
            if self.decode_tokens
            else "no decode"
        )
        return (
            f"{self.prompt:6s} prompt, {self.tokens} tokens: max logit error {self.max_abs_err:.3g} "
            f"(relative {self.rel_err:.3g}), top-1 agreement {self.top1_agree:.1%}, {dec}"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class OrtGemma:
    """An ONNX Runtime session over an exported file, with prefill/decode helpers."""

    def __init__(self, path: Path | str, threads: int | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        first = self.inputs[self.past_names[0]]
        self.kv_heads, self.head_dim = first.shape[1], first.shape[3]
        self.dtype = np.float16 if "float16" in first.type else np.float32
        self.output_names = [o.name for o in self.session.get_outputs()]

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        return {n: np.zeros((batch, self.kv_heads, 0, self.head_dim), self.dtype) for n in self.past_names}

    def step(self, ids: np.ndarray, past: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Run ids [B, S] after ``past``; return (logits, next past)."""
        batch, seq = ids.shape
        plen = next(iter(past.values())).shape[2]
        feed = {
            "input_ids": ids.astype(np.int64),
            "attention_mask": np.ones((batch, plen + seq), np.int64),
            "position_ids": np.broadcast_to(np.arange(plen, plen + seq, dtype=np.int64), (batch, seq)).copy(),
            **past,
        }
        outs = dict(zip(self.output_names, self.session.run(None, feed), strict=True))
        nxt = {n: outs[n.replace("past_key_values.", "present.")] for n in self.past_names}
        return outs["logits"], nxt

    def greedy(self, ids: np.ndarray, n: int) -> tuple[np.ndarray, list[int]]:
        """Prefill ``ids`` [1, S] then decode ``n`` tokens greedily with the KV cache."""
        logits, past = self.step(ids, self.empty_past(ids.shape[0]))
        first_logits = logits
        tokens = []
        for i in range(n):
            tok = int(np.argmax(logits[0, -1]))
            tokens.append(tok)
            if i + 1 < n:
                logits, past = self.step(np.array([[tok]], np.int64), past)
        return first_logits, tokens


def torch_reference(model: Any, cfg: AttentionConfig, sparse_layers: list[int]) -> Any:
    """The model with the exported attention patched in (dense: unpatched)."""
    from edgeattn import patching

    patching.unpatch(model)
    if cfg.kind != "dense" and sparse_layers:
        patching.patch(model, cfg, sparse_layers)
    return model


def torch_greedy(model: Any, ids: torch.Tensor, n: int) -> tuple[np.ndarray, list[int]]:
    """Full-sequence logits of ``ids`` and ``n`` greedy tokens through transformers' KV cache."""
    with torch.no_grad():
        logits = model(ids).logits.float().numpy()
        tokens: list[int] = []
        if n:
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                top_p=None,
                top_k=None,
                temperature=None,
                pad_token_id=0,
            )
            tokens = out[0, ids.shape[1] :].tolist()
    return logits, tokens


def compare(onnx_logits: np.ndarray, torch_logits: np.ndarray) -> tuple[float, float, float]:
    """(max abs error, relative error, top-1 agreement) over the positions the ONNX file returns."""
    ref = torch_logits[:, -onnx_logits.shape[1] :].astype(np.float64)
    got = onnx_logits.astype(np.float64)
    err = float(np.abs(got - ref).max())
    rel = err / max(float(np.abs(ref).max()), 1e-30)
    agree = float((got.argmax(-1) == ref.argmax(-1)).mean())
    return err, rel, agree


def check_prompt(session: OrtGemma, model: Any, ids: list[int], label: str, decode_tokens: int) -> PromptCheck:
    arr = np.array([ids], np.int64)
    onnx_logits, onnx_tokens = session.greedy(arr, decode_tokens)
    torch_logits, torch_tokens = torch_greedy(model, torch.tensor(arr), decode_tokens)
    err, rel, agree = compare(onnx_logits, torch_logits)
    return PromptCheck(
        prompt=label,
        tokens=len(ids),
        max_abs_err=err,
        rel_err=rel,
        top1_agree=agree,
        decode_tokens=decode_tokens,
        decode_match=onnx_tokens == torch_tokens,
        onnx_tokens=onnx_tokens,
        torch_tokens=torch_tokens,
    )


def verify_export(
    onnx_path: Path | str,
    loaded: Any,
    cfg: AttentionConfig,
    sparse_layers: list[int],
    prompt_tokens: int = 101,
    decode_tokens: int = 16,
    seed: int = 0,
) -> list[PromptCheck]:
    """Check an exported file against PyTorch on a random and (with a tokenizer) a real prompt."""
    from edgeattn import text

    model = torch_reference(loaded.model, cfg, sparse_layers)
    session = OrtGemma(onnx_path)
    rng = np.random.default_rng(seed)
    vocab = model.config.vocab_size
    prompts = [("random", rng.integers(0, vocab, prompt_tokens).tolist())]
    if getattr(loaded, "tokenizer", None) is not None:
        prompts.append(("real", text.token_ids(loaded.tokenizer, prompt_tokens)))
    try:
        return [check_prompt(session, model, ids, label, decode_tokens) for label, ids in prompts]
    finally:
        from edgeattn import patching

        patching.unpatch(model)
