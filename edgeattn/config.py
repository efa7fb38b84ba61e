"""Attention configuration shared by every backend (PyTorch, ONNX, TVM).

One frozen dataclass so that a configuration can be hashed, written into an
export manifest and compared between the exporter and the runtime.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

AttentionKind = Literal["dense", "dhsa", "block-sparse"]
ChunkingKind = Literal["fixed", "shift", "predictor"]

ATTENTION_KINDS: tuple[str, ...] = ("dense", "dhsa", "block-sparse")
CHUNKING_KINDS: tuple[str, ...] = ("fixed", "shift", "predictor")

# Chunks of 16 (the DHSA authors use blocks of 32): a mean over 32 queries and 32 keys blurs a
# single salient key below the noise, and with fixed chunks of 32 DHSA lost needles block-sparse
# also lost; 16 keeps them (benchmarks/selection.py, edgeattn/CHUNKING.md "Selection that finds
# what dense attention finds").  ~2K token budget for long prompts, as the authors.
DEFAULT_CHUNK_SIZE = 16
DEFAULT_BUDGET = 2048
DEFAULT_SINKS = 4
DEFAULT_MIN_CHUNK = 8
DEFAULT_MAX_CHUNK = 64
DEFAULT_LOCAL = 0  # DHSA's local band (AttentionConfig.local); see edgeattn/dhsa.py
DEFAULT_OBSERVE = 16  # DHSA's observation window (AttentionConfig.observe): the last queries of a call; 0: off
DEFAULT_VERTICAL = 0  # tokens of the budget the observation window's chunks may take; 0: half the budget
OBSERVE_HELP = (
    "DHSA observation window: the last N queries of each call score every key exactly, and the chunks they "
    "single out (up to half the budget) are kept for every query. 0: the paper's selection (chunk means only)."
)

# Option defaults shared by every verb (run, export, compile, bench, eval): each
# CLI option reads its default from here, so `run` and `export` cannot drift apart.
DEFAULT_CHUNKING = "fixed"
DEFAULT_LAYERS = "global"
DEFAULT_PROMPT_TOKENS = 8192  # `edgeattn run` without a prompt: long enough that budget 2048 is L/4
DEFAULT_MAX_NEW_TOKENS = 32
DEFAULT_KERNELS = "tvm"  # where TVM imports; "reference" is the PyTorch / ONNX-function-body path


def resolve_threads(threads: int | None) -> int:
    """`--threads` in every verb: the CPU threads of torch, TVM's pool and ONNX Runtime alike.

    None means all cores.  TVM reads TVM_NUM_THREADS when its pool starts, so
    the runtime sets it from this value before the first kernel runs.
    """
    import os

    if threads is None:
        return os.cpu_count() or 1
    if threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    return threads


class ConfigError(ValueError):
    """A configuration that cannot work; the message says how to fix it."""


def parse_token_count(item: str, option: str = "--lengths") -> int:
    """``"4K"`` -> 4096, ``"1500"`` -> 1500: token counts as every verb and benchmark writes them (K = 1024)."""
    text = item.strip().upper()
    scale = 1024 if text.endswith("K") else 1
    digits = text[:-1] if scale > 1 else text
    if not digits.isdigit() or int(digits) < 1:
        raise ConfigError(
            f"{option}: cannot read {item.strip()!r} as a token count; write positive counts like 1K,4K,16K or 2000"
        )
    return int(digits) * scale


def parse_token_counts(spec: str, option: str = "--lengths") -> list[int]:
    """``"4K, 1K,2000,4K"`` -> [1024, 2000, 4096]: sorted, repeats dropped; ConfigError names ``option``."""
    counts = {parse_token_count(part, option) for part in spec.split(",") if part.strip()}
    if not counts:
        raise ConfigError(f"{option} {spec!r} names no length; write a comma list like 1K,4K,16K")
    return sorted(counts)


@dataclass(frozen=True)
class AttentionConfig:
    """How one attention layer computes: dense, DHSA or the block-sparse baseline.

    ``budget`` is N_b, the most keys any query attends to (own chunk and sinks
    included).  ``chunk_size`` is the fixed chunk (or block) length; for the
    adaptive chunking sources ``min_chunk``/``max_chunk`` bound every chunk.
    """

    kind: AttentionKind = "dhsa"
    budget: int = DEFAULT_BUDGET
    chunk_size: int = DEFAULT_CHUNK_SIZE
    sinks: int = DEFAULT_SINKS
    chunking: ChunkingKind = "fixed"
    min_chunk: int = DEFAULT_MIN_CHUNK
    max_chunk: int = DEFAULT_MAX_CHUNK
    local: int = DEFAULT_LOCAL  # band of recent keys (tokens before the own chunk) always kept; 0: off
    observe: int = DEFAULT_OBSERVE  # last queries of a call whose exact scores pick "vertical" chunks; 0: off
    vertical: int = DEFAULT_VERTICAL  # tokens those vertical chunks may take of the budget; 0: budget // 2

    def __post_init__(self) -> None:
        if self.kind not in ATTENTION_KINDS:
            raise ConfigError(f"unknown attention kind {self.kind!r}; choose one of {', '.join(ATTENTION_KINDS)}")
        if self.chunking not in CHUNKING_KINDS:
            raise ConfigError(f"unknown chunking {self.chunking!r}; choose one of {', '.join(CHUNKING_KINDS)}")
        if self.chunk_size < 1:
            raise ConfigError(f"chunk size must be >= 1, got {self.chunk_size}")
        if self.sinks < 0:
            raise ConfigError(f"sinks must be >= 0, got {self.sinks}")
        if self.local < 0:
            raise ConfigError(f"local band must be >= 0 tokens, got {self.local}")
        if self.observe < 0 or self.vertical < 0:
            raise ConfigError(f"observe and vertical must be >= 0 tokens, got {self.observe} and {self.vertical}")
        if self.vertical > self.budget:
            raise ConfigError(
                f"vertical {self.vertical} exceeds the budget {self.budget}: the observation window's chunks are "
                "part of the budget; pass a smaller vertical (0: half the budget)"
            )
        if not 1 <= self.min_chunk <= self.max_chunk:
            raise ConfigError(
                f"need 1 <= min_chunk <= max_chunk, got min_chunk={self.min_chunk}, max_chunk={self.max_chunk}"
            )
        if self.kind != "dense" and self.budget < self.largest_chunk + self.sinks:
            knob = "--chunk-size" if self.largest_chunk == self.chunk_size else "--max-chunk"
            raise ConfigError(
                f"budget {self.budget} cannot hold a query's own chunk ({self.largest_chunk} "
                f"tokens) plus {self.sinks} sink tokens; pass --budget >= "
                f"{self.largest_chunk + self.sinks} or a smaller {knob}"
            )

    @property
    def largest_chunk(self) -> int:
        """The longest chunk this configuration can produce (bounds the budget)."""
        if self.kind == "dhsa" and self.chunking != "fixed":
            return self.max_chunk
        return self.chunk_size

    @property
    def vertical_tokens(self) -> int:
        """Tokens of the budget the observation window's vertical chunks may take (0 when off)."""
        if self.observe == 0 or self.kind != "dhsa":
            return 0
        return self.vertical or self.budget // 2

    def with_(self, **changes: Any) -> AttentionConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AttentionConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


DENSE = AttentionConfig(kind="dense")
