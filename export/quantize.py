"""Weight formats of an export: fp32, fp16, int8 and int4.

Why ONNX Runtime's ``MatMulNBits`` and ``GatherBlockQuantized`` (domain com.microsoft): they
are the ops ONNX Runtime runs natively on packed 4/8-bit weights (its model builder writes them
for every quantized LLM), so a quantized file never holds an fp32 copy of a weight, on disk or
in the session.  The numbers come from ONNX Runtime's own weight-only quantizer
(``onnxruntime.quantization.matmul_nbits_quantizer``, round-to-nearest), not from code of ours.

Layout (one layout for every quantized tensor): a weight ``W [N, K]`` (PyTorch's Linear layout,
output features first) is cut along K into blocks of ``group`` values; each block has one fp32
scale and a zero point and stores ``q = round(W / scale) + zero_point`` as unsigned ``bits``-bit
integers, packed low bits first: ``packed [N, ceil(K/group), group*bits/8]`` uint8,
``scales [N, ceil(K/group)]``; int4 also has ``zero_points [N, ceil(ceil(K/group)/2)]`` (packed
the same way), int8 uses the ops' default zero point 128.

Why int4 is asymmetric and int8 symmetric (measured on Gemma 3 270M, 512 positions of prose,
top-1 agreement with fp32): int4 group 32 symmetric 60 %, asymmetric 67-71 % -- with 16 levels, a
zero-centred grid wastes levels on one side of each block; int8 symmetric keeps 97 %, and its
default zero point needs no tensor.

Why int8 is group-wise, group 32: ``MatMulNBits`` needs a power-of-two block of at least 16, and
Gemma's hidden sizes (640, 1152, 2304) are not powers of two, so one block per output channel
cannot be written.  ONNX Runtime's fast kernel for 8-bit weights quantizes the activations to
int8 in blocks of the same size (see ``ACCURACY_LEVEL``), so the group sets the activations'
precision too: top-1 agreement 96.9 % at group 32, 95.9 % at 64, 94.5 % at 128.

The tied embedding table (Gemma ties the LM head to it) is quantized once and read by both the
lookup (``GatherBlockQuantized`` on the same packed tensor) and the LM head (``MatMulNBits``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeattn.config import ConfigError

WEIGHT_FORMATS = ("fp32", "fp16", "int8", "int4", "gguf")
DEFAULT_GROUP = {"int4": 32, "int8": 32}
MIN_GROUP = 16
MS_DOMAIN = "com.microsoft"
QUANTIZED_OPS = ("MatMulNBits", "GatherBlockQuantized")
# MatMulNBits' accuracy_level per weight width: 4 quantizes the activations to int8 per block
# of the weights' group inside each matmul (as llama.cpp's quantized dot products do), 0 computes
# in float32.  Measured on Gemma 3 270M, 2 threads: ONNX Runtime's CPU kernels have no fast
# float32 path for 8-bit weights (1.1 s per decode step at level 0, 44 ms at level 4); for 4-bit
# weights level 4 cuts MatMulNBits' share of a decode step from 117 to 71 ms and costs about one
# point of top-1 agreement (71.3 -> 70.1 %).  Tests that pin the layout set level 0.
ACCURACY_LEVEL = {4: 4, 8: 4}

TVM_NOT_YET = (
    "quantized weights ({label}) run on the ort backend for now: the tvm backend has no dequantize+matmul "
    "kernels for MatMulNBits yet; run it with --backend ort, or export with --weights fp32 / fp16 for tvm"
)

WEIGHTS_HELP = (
    "Weight format: fp32; fp16 (weights and activations in float16); int8 (symmetric) or int4 (with zero "
    "points), block-quantized with an fp32 scale per --group-size weights (ONNX Runtime's MatMulNBits and "
    "GatherBlockQuantized; the tied embedding and LM head included, stored once); gguf: a GGUF model's "
    "tensors exactly as the file stores them (Q4_K as int4, Q5_0/Q6_K/Q8_0 as int8; export/QUANT.md)."
)
GROUP_HELP = "Weights per scale for int8/int4: a power of two >= 16 (default 32)."


@dataclass(frozen=True)
class WeightFormat:
    """How the linear, embedding and LM-head weights of an export are stored."""

    kind: str = "fp32"
    group: int | None = None  # weights per scale (int8/int4 only)

    @property
    def quantized(self) -> bool:
        return self.kind in ("int8", "int4", "gguf")

    @property
    def bits(self) -> int | None:
        return {"int8": 8, "int4": 4}.get(self.kind)

    @property
    def symmetric(self) -> bool:
        return self.kind == "int8"

    @property
    def label(self) -> str:
        return f"{self.kind}-g{self.group}" if self.group else self.kind

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "group": self.group, "bits": self.bits}


def weight_format(kind: str = "fp32", group: int | None = None) -> WeightFormat:
    """A checked :class:`WeightFormat`; the errors name the flag and the values that work."""
    if kind not in WEIGHT_FORMATS:
        raise ConfigError(f"--weights {kind!r} is unknown; choose one of {', '.join(WEIGHT_FORMATS)}")
    if kind not in DEFAULT_GROUP:
        if group is not None:
            raise ConfigError(f"--group-size applies to int8 and int4 weights, not {kind}; leave it out")
        return WeightFormat(kind)
    group = DEFAULT_GROUP[kind] if group is None else int(group)
    if group < MIN_GROUP or group & (group - 1):
        raise ConfigError(
            f"--group-size {group} does not work with --weights {kind}: ONNX Runtime's MatMulNBits needs a power "
            f"of two >= {MIN_GROUP} (e.g. 32, 64, 128)"
        )
    return WeightFormat(kind, group)


def format_of_manifest(onnx_info: dict[str, Any]) -> WeightFormat:
    """The weight format an export's manifest records (files from before the option: fp32/fp16 by dtype)."""
    w = onnx_info.get("weights")
    if w:
        return WeightFormat(w["kind"], w.get("group"))
    return WeightFormat("fp16" if onnx_info.get("dtype") == "float16" else "fp32")


@dataclass
class BlockQuantized:
    """One weight [N, K] in the layout of the module docstring."""

    packed: np.ndarray  # uint8 [N, k_blocks, group * bits / 8]
    scales: np.ndarray  # float32 [N, k_blocks]
    # uint8 [N, ceil(k_blocks * bits / 8)], packed; or float32 [N, k_blocks] (a GGUF's Q4_K);
    # None: the ops' default 2**(bits-1)
    zero_points: np.ndarray | None
    bits: int
    group: int
    n: int
    k: int

    @property
    def k_blocks(self) -> int:
        return int(self.packed.shape[1])

    @property
    def nbytes(self) -> int:
        zp = 0 if self.zero_points is None else self.zero_points.nbytes
        return int(self.packed.nbytes + self.scales.nbytes + zp)

    @property
    def label(self) -> str:
        zp = "" if self.integer_zero_points else ", float zero points"
        return f"int{self.bits} g{self.group}{zp}"

    @property
    def integer_zero_points(self) -> bool:
        """GatherBlockQuantized (the embedding lookup) reads integer zero points only."""
        return self.zero_points is None or self.zero_points.dtype == np.uint8

    def block_zero_points(self) -> np.ndarray:
        """One zero point per block, unpacked: [N, k_blocks] (uint8, or float32 as stored)."""
        if self.zero_points is None:
            return np.full((self.n, self.k_blocks), 1 << (self.bits - 1), np.uint8)
        if not self.integer_zero_points:
            return self.zero_points
        return _unpack(self.zero_points, self.bits)[:, : self.k_blocks]

    def dequantize(self) -> np.ndarray:
        """W [N, K] in float32 (tests and diagnostics; no runtime path calls this)."""
        q = _unpack(self.packed.reshape(self.n, -1), self.bits).reshape(self.n, self.k_blocks, self.group)
        zp = self.block_zero_points().astype(np.float32)[:, :, None]
        w = (q.astype(np.float32) - zp) * self.scales[:, :, None]
        return w.reshape(self.n, -1)[:, : self.k]


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [N, M] holding 8/bits values per byte, low bits first -> uint8 [N, M * 8/bits]."""
    if bits == 8:
        return packed
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[0], -1)


def quantize_rows(w: np.ndarray, fmt: WeightFormat) -> BlockQuantized:
    """Block-quantize ``w [N, K]`` along K with ONNX Runtime's quantizer (round-to-nearest)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    if not fmt.quantized or fmt.group is None or fmt.bits is None:
        raise ValueError(f"{fmt.label} is not a block-quantized format")
    if w.ndim != 2:
        raise ValueError(f"quantize_rows takes a 2-D weight, got shape {w.shape}")
    n, k = w.shape
    config = DefaultWeightOnlyQuantConfig(block_size=fmt.group, is_symmetric=fmt.symmetric, bits=fmt.bits)
    # ORT's routine takes MatMul's B layout [K, N]; its outputs are [N, k_blocks, blob] and [N, k_blocks]
    packed, scales, zero_points = DefaultWeightOnlyQuantizer(config).qbits_block_quant(
        np.ascontiguousarray(w.T, dtype=np.float32)
    )
    return BlockQuantized(
        packed=packed,
        scales=scales.astype(np.float32),
        zero_points=None if fmt.symmetric else zero_points,
        bits=fmt.bits,
        group=fmt.group,
        n=n,
        k=k,
    )


def choose_block(
    key: str, fmt: WeightFormat, dense: Callable[[], np.ndarray], gguf: Any = None
) -> tuple[BlockQuantized | None, str]:
    """How the matrix ``key`` is stored: (blocks, description), or (None, description) to keep it float.

    ``dense()`` gives the float weight [N, K] (called only to quantize); ``gguf`` is the source
    file's :class:`~edgeattn.export.gguf_weights.GGUFWeights`, whose blocks are carried over
    exactly wherever they already are the asked format (always, for ``--weights gguf``).
    """
    gtype = gguf.type_of(key) if gguf is not None else None
    if fmt.kind == "gguf":
        if gtype is None or gtype in gguf.FLOAT_TYPES:
            return None, f"float32 (GGUF {gtype or 'has no such tensor'})"
        q = gguf.block(key)  # a clear ConfigError for a type with no mapping
        return q, f"{q.label} (GGUF {gtype}, exact)"
    if not fmt.quantized:
        return None, ""
    if gtype is not None and gguf.exact_format(gtype) == (fmt.bits, fmt.group):
        q = gguf.block(key)
        return q, f"{q.label} (GGUF {gtype}, exact)"
    q = quantize_rows(dense(), fmt)
    return q, q.label + (f" (requantized from GGUF {gtype})" if gtype else "")


def is_quantized_op(node: Any) -> bool:
    """A ``MatMulNBits`` / ``GatherBlockQuantized`` node (the ops a quantized export adds)."""
    return node.domain == MS_DOMAIN and node.op_type in QUANTIZED_OPS


def stand_in(node: Any) -> tuple[Any, str, str] | None:
    """A standard-ONNX node with the same output type as a quantized op, for onnx's shape inference.

    onnx's inference does not know com.microsoft ops and types nothing after them; the stand-in
    (MatMul / Gather on a float placeholder) lets it type the rest of the graph.  Returns
    (node, placeholder name, the input whose element type the placeholder takes: the scales,
    which have the activations' type), or None for any other node.
    """
    from onnx import helper

    if not is_quantized_op(node):
        return None
    placeholder = f"{node.output[0]}__stand_in_weight"
    if node.op_type == "MatMulNBits":
        stand = helper.make_node("MatMul", [node.input[0], placeholder], list(node.output[:1]))
    else:
        stand = helper.make_node("Gather", [placeholder, node.input[1]], list(node.output[:1]), axis=0)
    return stand, placeholder, node.input[2]


__all__ = [
    "ACCURACY_LEVEL",
    "BlockQuantized",
    "DEFAULT_GROUP",
    "GROUP_HELP",
    "MS_DOMAIN",
    "QUANTIZED_OPS",
    "TVM_NOT_YET",
    "WEIGHTS_HELP",
    "WEIGHT_FORMATS",
    "WeightFormat",
    "choose_block",
    "format_of_manifest",
    "is_quantized_op",
    "quantize_rows",
    "stand_in",
    "weight_format",
]
