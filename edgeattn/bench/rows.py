"""What a benchmark row is, and how `--lengths` / `--peers` / `--backends` are read.

A row is one way of running the model: edgeattn's own backends with dense or DHSA
attention on our kernels, or a peer -- the model as shipped (transformers SDPA),
ONNX Runtime on our plain dense export or on its GroupQueryAttention export, and
llama.cpp on the GGUF file the model comes from.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeattn.config import ConfigError, parse_token_counts

EDGEATTN_BACKENDS = ("torch", "ort", "tvm")
PEERS = ("transformers", "ort-onnx", "ort-gqa", "llama.cpp", "llama.cpp-fa")
ATTENTIONS = ("dense", "dhsa", "block-sparse")


@dataclass(frozen=True)
class RowSpec:
    """One row of the sweep (without its length)."""

    name: str  # "torch/dhsa", "transformers", "ort-gqa", "llama.cpp", ...
    backend: str  # torch | ort | tvm | transformers | onnxruntime | llama.cpp
    attention: str  # dense | dhsa | block-sparse
    kernels: str  # tvm (ours) | reference | sdpa | onnx | gqa | ggml
    what: str  # one line for the report: what computes

    @property
    def is_peer(self) -> bool:
        return self.name in PEERS


def edgeattn_row(backend: str, attention: str) -> RowSpec:
    what = {
        "torch": "transformers for the standard ops, every attention layer on our TVM kernels",
        "ort": "ONNX Runtime on our export, ai.edgeattn nodes on our TVM kernels",
        "tvm": "the whole model compiled with TVM",
    }[backend]
    return RowSpec(f"{backend}/{attention}", backend, attention, "tvm", what)


PEER_ROWS: dict[str, RowSpec] = {
    "transformers": RowSpec("transformers", "transformers", "dense", "sdpa", "the model as shipped: transformers SDPA"),
    "ort-onnx": RowSpec(
        "ort-onnx", "onnxruntime", "dense", "onnx", "ONNX Runtime on our dense export, plain ONNX attention (masks)"
    ),
    "ort-gqa": RowSpec(
        "ort-gqa", "onnxruntime", "dense", "gqa", "ONNX Runtime on our export with its GroupQueryAttention op"
    ),
    "llama.cpp": RowSpec(
        "llama.cpp", "llama.cpp", "dense", "ggml", "llama.cpp (llama-cpp-python) on the GGUF file, its defaults"
    ),
    "llama.cpp-fa": RowSpec(
        "llama.cpp-fa", "llama.cpp", "dense", "ggml-fa", "llama.cpp on the GGUF file with its flash attention on"
    ),
}


def parse_lengths(spec: str) -> list[int]:
    """'1K,4K,8K' -> [1024, 4096, 8192] (K = 1024; plain integers are tokens), sorted, no repeats."""
    return parse_token_counts(spec, "--lengths")


def _names(spec: str, known: tuple[str, ...], option: str) -> list[str]:
    names = [n.strip() for n in spec.split(",") if n.strip() and n.strip() != "none"]
    bad = [n for n in names if n not in known]
    if bad:
        raise ConfigError(f"{option} takes a comma list of {', '.join(known)}; got {', '.join(bad)}")
    return list(dict.fromkeys(names))


def select_rows(backends: str, attention: str, peers: str) -> list[RowSpec]:
    """The rows of a sweep: every (backend, attention) of ours, then the peers ('none': no rows of that kind)."""
    ours = [
        edgeattn_row(b, a)
        for b in _names(backends, EDGEATTN_BACKENDS, "--backends")
        for a in _names(attention, ATTENTIONS, "--attention")
    ]
    chosen = _names(peers, PEERS, "--peers")
    rows = ours + [PEER_ROWS[p] for p in chosen]
    if not rows:
        raise ConfigError("nothing to measure: give --backends and --attention, or --peers")
    return rows
