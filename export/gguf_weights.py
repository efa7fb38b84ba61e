"""A GGUF's quantized tensors as MatMulNBits blocks, bit for bit, without an fp32 copy.

Why: the built-in model arrives as Q4_K_M.  Dequantizing it to fp32 and quantizing again
(``--weights int4``) rounds every weight twice: on Gemma 3 270M that keeps 70 % top-1 agreement
with the fp32 model (export/QUANT.md).  Every llama.cpp block format used by Q4_K_M is an affine grid per block
of 16 or 32 weights, which is what MatMulNBits stores, so each tensor can be carried over
exactly, block by block, straight from the memory-mapped file:

==========  =====================================  =====================================
GGUF type   GGUF block                             MatMulNBits (this module)
==========  =====================================  =====================================
Q8_0        32 x int8, fp16 scale                  int8, group 32, zero point 128
Q5_0        32 x 5 bit, fp16 scale, w = d(q - 16)  int8, group 32, zero point 128
Q6_K        16 x 6 bit, int8 sub-scale x fp16      int8, group 16, zero point 128
Q4_K        32 x 4 bit, 6-bit scale and min        int4, group 32, float zero point
            (w = d*sc*q - dmin*m)                  (dmin*m / (d*sc), MatMulNBits' float zp)
==========  =====================================  =====================================

The bit layouts are those of ggml-quants (as gguf-py's ``gguf.quants`` decodes them); the
tests check a tensor of each type in the built-in file against ``gguf.quants.dequantize``.
``GatherBlockQuantized`` (the embedding lookup) takes integer zero points only, so a table in
Q4_K would be read with float zero points by the LM head and requantized for the lookup; the
built-in file's table is Q8_0, which needs neither.
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeattn.config import ConfigError
from edgeattn.export.quantize import BlockQuantized

# GGUF tensor name -> transformers state-dict key (Gemma 2 / Gemma 3 text)
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight"}
SUPPORTED_TYPES = ("Q8_0", "Q5_0", "Q6_K", "Q4_K")
# (bits, group) each type becomes; float matrices stay float
_EXACT = {"Q8_0": (8, 32), "Q5_0": (8, 32), "Q6_K": (8, 16), "Q4_K": (4, 32)}
_QK_K = 256


def hf_key(gguf_name: str) -> str | None:
    """The state-dict key of a GGUF matrix, or None for tensors the export keeps in float (norms)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"
    return None


@dataclass
class GGUFTensor:
    """One matrix of the file: its GGUF name, block type, and rows as a memory-mapped byte view."""

    name: str
    type_name: str
    shape: tuple[int, ...]  # GGUF order, innermost first: (K, N)
    data: np.ndarray  # uint8 [N, bytes per row]


@dataclass
class GGUFWeights:
    """The matrices of one GGUF file, by state-dict key; each converted when asked for."""

    path: Path
    tensors: dict[str, GGUFTensor]
    FLOAT_TYPES = ("F32", "F16", "BF16")

    @staticmethod
    def exact_format(gguf_type: str) -> tuple[int, int] | None:
        """(bits, group) of the MatMulNBits layout that holds ``gguf_type`` exactly."""
        return _EXACT.get(gguf_type)

    def type_of(self, key: str) -> str | None:
        t = self.tensors.get(key)
        return None if t is None else t.type_name

    def block(self, key: str) -> BlockQuantized:
        """``key`` in MatMulNBits' layout, exactly as the file stores it."""
        t = self.tensors[key]
        if t.type_name not in _CONVERTERS:
            raise ConfigError(
                f"{self.path.name}: tensor {t.name} is {t.type_name}, which has no MatMulNBits mapping "
                f"(supported: {', '.join(SUPPORTED_TYPES)}); export with --weights int8 or int4 to requantize it"
            )
        k, n = int(t.shape[0]), int(t.shape[1])
        return _CONVERTERS[t.type_name](t.data, n, k)


def open_gguf(path: Path) -> GGUFWeights:
    """The file's matrices, memory-mapped; nothing is read until a block is asked for."""
    import gguf

    path = Path(path)
    try:
        infos, data_start = _tensor_infos(path)
    except (ValueError, IndexError, struct.error) as err:
        raise ConfigError(f"{path} is not a readable GGUF file ({err})") from err
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    tensors = {}
    for name, shape, type_id, offset in infos:
        key = hf_key(name)
        if key is None or len(shape) != 2:
            continue
        qtype = gguf.GGMLQuantizationType(type_id)
        block_values, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        row_bytes = shape[0] // block_values * block_bytes
        start = data_start + offset
        rows = raw[start : start + row_bytes * shape[1]].reshape(shape[1], row_bytes)
        tensors[key] = GGUFTensor(name=name, type_name=qtype.name, shape=tuple(shape), data=rows)
    return GGUFWeights(path=path, tensors=tensors)


# GGUF value types -> byte size (fixed-size scalars); 8 = string, 9 = array
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _tensor_infos(path: Path) -> tuple[list[tuple[str, list[int], int, int]], int]:
    """(name, shape, type id, offset) of every tensor, and where tensor data starts.

    Why not ``gguf.GGUFReader``: it turns every metadata value into numpy views, and Gemma's
    262K-token vocabulary makes that 25 s for the built-in file; the tensor table is all an
    export needs, so the metadata is stepped over (strings by their length prefix).
    """
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        return _parse_infos(buf)


def _parse_infos(buf: mmap.mmap) -> tuple[list[tuple[str, list[int], int, int]], int]:
    if buf[:4] != b"GGUF":
        raise ValueError("no GGUF magic bytes")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version < 2:
        raise ValueError(f"GGUF version {version} is too old (2 or later)")
    pos = 24
    alignment = 32

    def string(at: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", buf, at)
        return buf[at + 8 : at + 8 + n].decode("utf-8", "replace"), at + 8 + n

    def skip(vtype: int, at: int) -> int:
        if vtype in _SCALAR_BYTES:
            return at + _SCALAR_BYTES[vtype]
        if vtype == 8:
            return at + 8 + struct.unpack_from("<Q", buf, at)[0]
        if vtype == 9:
            etype, count = struct.unpack_from("<IQ", buf, at)
            at += 12
            if etype in _SCALAR_BYTES:
                return at + count * _SCALAR_BYTES[etype]
            for _ in range(count):
                at = skip(etype, at)
            return at
        raise ValueError(f"unknown GGUF value type {vtype}")

    for _ in range(n_kv):
        key, pos = string(pos)
        (vtype,) = struct.unpack_from("<I", buf, pos)
        if key == "general.alignment" and vtype == 4:
            (alignment,) = struct.unpack_from("<I", buf, pos + 4)
        pos = skip(vtype, pos + 4)
    infos = []
    for _ in range(n_tensors):
        name, pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        shape = list(struct.unpack_from(f"<{n_dims}Q", buf, pos + 4))
        pos += 4 + 8 * n_dims
        type_id, offset = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        infos.append((name, shape, type_id, offset))
    return infos, (pos + alignment - 1) // alignment * alignment


def _blocks(rows: np.ndarray, n: int, k: int, block_bytes: int, block_values: int) -> np.ndarray:
    if k % block_values:
        raise ConfigError(f"a row of {k} values is not a whole number of {block_values}-value GGUF blocks")
    return rows.reshape(n * (k // block_values), block_bytes)


def _int8(levels: np.ndarray, scales: np.ndarray, n: int, k: int, group: int) -> BlockQuantized:
    """Signed levels (int16 [N*blocks, group]) and scales -> int8 with MatMulNBits' default zero point 128."""
    packed = (levels + 128).astype(np.uint8).reshape(n, k // group, group)
    return BlockQuantized(packed=packed, scales=scales.reshape(n, -1), zero_points=None, bits=8, group=group, n=n, k=k)


def _q8_0(rows: np.ndarray, n: int, k: int) -> BlockQuantized:
    b = _blocks(rows, n, k, 34, 32)
    d = b[:, :2].copy().view(np.float16).astype(np.float32)
    q = b[:, 2:].view(np.int8).astype(np.int16)
    return _int8(q, d, n, k, 32)


def _q5_0(rows: np.ndarray, n: int, k: int) -> BlockQuantized:
    b = _blocks(rows, n, k, 22, 32)
    d = b[:, :2].copy().view(np.float16).astype(np.float32)
    high = b[:, 2:6].copy().view(np.uint32)  # bit j: the fifth bit of value j
    low = b[:, 6:]  # value j < 16 in the low nibble of byte j, value 16 + j in its high nibble
    low = np.concatenate([low & 0x0F, low >> 4], axis=1).astype(np.int16)
    fifth = ((high >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int16)
    return _int8((low | (fifth << 4)) - 16, d, n, k, 32)


def _q6_k(rows: np.ndarray, n: int, k: int) -> BlockQuantized:
    b = _blocks(rows, n, k, 210, _QK_K)
    nb = b.shape[0]
    ql, qh, sub, d = b[:, :128], b[:, 128:192], b[:, 192:208], b[:, 208:210]
    d = d.copy().view(np.float16).astype(np.float32)
    scales = d * sub.view(np.int8).astype(np.float32)  # [nb, 16]: one per 16 values
    # two halves of 128 values; in each, 64 low nibbles of ql (4 rows of 32) and 2 bits of qh
    low = ql.reshape(nb, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    low = (low & 0x0F).reshape(nb, 2, 4, 32)
    hi = qh.reshape(nb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    hi = (hi & 0x03).reshape(nb, 2, 4, 32)
    q = (low | (hi << 4)).astype(np.int16).reshape(nb, _QK_K) - 32
    return _int8(q.reshape(-1, 16), scales, n, k, 16)


def _q4_k(rows: np.ndarray, n: int, k: int) -> BlockQuantized:
    from gguf.quants import Q4_K

    b = _blocks(rows, n, k, 144, _QK_K)
    nb = b.shape[0]
    d = b[:, :2].copy().view(np.float16).astype(np.float32)
    dmin = b[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, mins = Q4_K.get_scale_min(b[:, 4:16])  # 6-bit scale and min of each of the 8 sub-blocks
    scale = d * sc.astype(np.float32)  # [nb, 8]
    offset = dmin * mins.astype(np.float32)  # w = scale * q - offset
    # sub-blocks 2j and 2j+1 share 32 bytes: the low nibbles are 2j's values, the high ones 2j+1's
    qs = b[:, 16:].reshape(nb, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    q = (qs & 0x0F).reshape(nb, 8, 32)
    # w = scale * (q - zp) with zp = offset / scale; a block whose scale is 0 holds -offset in every
    # value: write it as scale = offset, q = 0, zp = 1
    flat = scale == 0
    zp = np.divide(offset, scale, out=np.ones_like(offset), where=~flat)
    scale = np.where(flat, offset, scale)
    q = np.where(flat[:, :, None], 0, q).astype(np.uint8)
    packed = (q[:, :, 0::2] | (q[:, :, 1::2] << 4)).astype(np.uint8)  # MatMulNBits: low nibble first
    kb = k // 32
    return BlockQuantized(
        packed=packed.reshape(n, kb, 16),
        scales=scale.reshape(n, kb),
        zero_points=zp.reshape(n, kb).astype(np.float32),
        bits=4,
        group=32,
        n=n,
        k=k,
    )


_CONVERTERS = {"Q8_0": _q8_0, "Q5_0": _q5_0, "Q6_K": _q6_k, "Q4_K": _q4_k}

__all__ = ["GGUFTensor", "GGUFWeights", "SUPPORTED_TYPES", "hf_key", "open_gguf"]
