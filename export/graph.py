"""Write a Gemma 2 / Gemma 3 causal LM as an ONNX graph, straight from its weights.

Why not trace: tracing transformers' generation code (cache classes, mask
builders) through torch.onnx is brittle across versions, and the graph we want
is small and fixed -- embedding, N decoder layers, norm, tied LM head -- with
the attention of chosen layers replaced by the ``ai.edgeattn`` ops.  Writing it
from the weights gives full control over the KV-cache I/O and dynamic axes; the
verifier (``edgeattn.export.verify``) checks the result against the PyTorch
model, so any drift in the architecture shows up as a logit error.

Graph I/O (B, S, P, T = P + S are dynamic):
  inputs  input_ids int64 [B, S], attention_mask int64 [B, T] (1 = real token),
          position_ids int64 [B, S], past_key_values.{i}.key/value [B, Hkv, P, D]
  outputs logits [B, 1, V] (last position; all positions with all_logits) and
          present.{i}.key/value [B, Hkv, T, D] (past concatenated with this step)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgeattn.config import AttentionConfig
from edgeattn.errors import UnsupportedModelError
from edgeattn.export import ops, quantize
from edgeattn.export.onnx_builder import BOOL, FLOAT, INT32, INT64, OPSET, NodeBuilder

SUPPORTED_FAMILIES = ("gemma2", "gemma3_text")
_ONNX_DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}
_NP_DTYPES = {"float32": np.float32, "float16": np.float16}
BOUNDARIES_INPUT = "dhsa_boundaries"
EMBEDDING_KEY = "model.embed_tokens.weight"  # the table; Gemma ties the LM head to it
LM_HEAD_KEY = "lm_head.weight"  # an untied head's own weight
# How dense and sliding-window layers are written (`edgeattn export --dense-op`):
#   onnx      plain ONNX attention with an explicit [B,1,1,S,T] mask (any runtime; O(S*T) memory)
#   edgeattn  one ai.edgeattn DenseFlashAttention node per layer (function body = the same masked
#             attention; edgeattn's ort/tvm backends run the TVM dense flash kernel instead)
#   gqa       ONNX Runtime's com.microsoft GroupQueryAttention (ORT only: its best dense baseline)
DENSE_OPS = ("onnx", "edgeattn", "gqa")
MS_DOMAIN = quantize.MS_DOMAIN


@dataclass
class GraphSpec:
    """What to write: which layers get which attention, dtype, logits of all positions or the last."""

    cfg: AttentionConfig
    sparse_layers: list[int] = field(default_factory=list)
    dtype: str = "float32"
    all_logits: bool = False
    boundaries_input: bool = False  # adaptive chunking: boundaries come in as a graph input
    dense_op: str = "onnx"  # one of DENSE_OPS: how the dense and sliding-window layers are written
    weights: quantize.WeightFormat = field(default_factory=quantize.WeightFormat)  # int8/int4/gguf: MatMulNBits
    gguf: Any = None  # export.gguf_weights.GGUFWeights of a GGUF source: its blocks carried over exactly


@dataclass
class ModelFacts:
    """Architecture facts read from a loaded HF model (everything the graph needs besides weights)."""

    family: str
    layers: int
    hidden: int
    heads_q: int
    heads_kv: int
    head_dim: int
    vocab: int
    eps: float
    scaling: float
    layer_types: list[str]
    sliding_window: int | None
    attn_softcap: float | None
    final_softcap: float | None
    qk_norm: bool
    embed_scale: float
    inv_freq: dict[str, np.ndarray]  # per layer type
    rope_scale: dict[str, float]


def model_facts(model: Any) -> ModelFacts:
    """Read the architecture of a Gemma 2 / Gemma 3 text model; UnsupportedModelError otherwise."""
    c = model.config
    family = getattr(c, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        raise UnsupportedModelError(
            f"cannot export a {family!r} model: the exporter writes Gemma 2 and Gemma 3 text models "
            f"(model_type {' or '.join(SUPPORTED_FAMILIES)})."
        )
    act = getattr(c, "hidden_activation", None) or getattr(c, "hidden_act", None)
    if act != "gelu_pytorch_tanh":
        raise UnsupportedModelError(
            f"activation {act!r} is not supported by the exporter (Gemma uses gelu_pytorch_tanh)"
        )
    if getattr(c, "attention_bias", False):
        raise UnsupportedModelError("attention projections with bias are not supported by the exporter")
    if getattr(c, "use_bidirectional_attention", False):
        raise UnsupportedModelError(
            "bidirectional Gemma 3 (embedding) models are not causal LMs; export a causal model"
        )
    layer_types = list(getattr(c, "layer_types", None) or ["full_attention"] * c.num_hidden_layers)
    rotary = model.model.rotary_emb
    inv_freq: dict[str, np.ndarray] = {}
    rope_scale: dict[str, float] = {}
    for lt in sorted(set(layer_types)):
        if hasattr(rotary, f"{lt}_inv_freq"):  # Gemma 3: one rotary table per layer type
            inv, scale, rtype = (
                getattr(rotary, f"{lt}_inv_freq"),
                getattr(rotary, f"{lt}_attention_scaling"),
                (rotary.rope_type.get(lt, "default") if isinstance(rotary.rope_type, dict) else rotary.rope_type),
            )
        else:
            inv, scale, rtype = rotary.inv_freq, rotary.attention_scaling, getattr(rotary, "rope_type", "default")
        if rtype in ("dynamic", "longrope"):
            raise UnsupportedModelError(
                f"RoPE type {rtype!r} changes its frequencies with the sequence length; the exporter "
                "supports static RoPE (default, linear, yarn, llama3)"
            )
        inv_freq[lt] = inv.detach().float().cpu().numpy()
        rope_scale[lt] = float(scale)
    embed = model.model.embed_tokens
    embed_scale = float(getattr(embed, "embed_scale", getattr(embed, "scalar_embed_scale", c.hidden_size**0.5)))
    return ModelFacts(
        family=family,
        layers=c.num_hidden_layers,
        hidden=c.hidden_size,
        heads_q=c.num_attention_heads,
        heads_kv=c.num_key_value_heads,
        head_dim=c.head_dim,
        vocab=c.vocab_size,
        eps=float(c.rms_norm_eps),
        scaling=float(c.query_pre_attn_scalar) ** -0.5,
        layer_types=layer_types,
        sliding_window=getattr(c, "sliding_window", None),
        attn_softcap=getattr(c, "attn_logit_softcapping", None),
        final_softcap=getattr(c, "final_logit_softcapping", None),
        qk_norm=hasattr(model.model.layers[0].self_attn, "q_norm"),
        embed_scale=embed_scale,
        inv_freq=inv_freq,
        rope_scale=rope_scale,
    )


@dataclass
class _QuantizedWeight:
    inputs: list[str]  # MatMulNBits' B, scales (and zero points) initializers
    q: quantize.BlockQuantized


class _GemmaWriter:
    def __init__(self, model: Any, facts: ModelFacts, spec: GraphSpec) -> None:
        self.model = model
        self.f = facts
        self.spec = spec
        self.nb = NodeBuilder()
        self.dt = _ONNX_DTYPES[spec.dtype]
        self.np_dt = _NP_DTYPES[spec.dtype]
        self.state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        self._quantized: dict[str, _QuantizedWeight | None] = {}
        self.precision: dict[str, str] = {}  # state-dict key -> how the export stores it
        self._written: set[str] = set()

    # ---- weights
    def weight(self, key: str, transpose: bool = False, plus_one: bool = False) -> str:
        """The initializer of ``key`` (written once: the tied table serves the lookup and the LM head)."""
        if key in self._written:
            return key
        self._written.add(key)
        w = self.state[key].float().numpy()
        if plus_one:  # Gemma's RMSNorm multiplies by (1 + w): fold the 1 in (computed in float32, as HF does)
            return self.nb.initializer(key, (w + 1.0).astype(np.float32))
        if transpose:
            w = w.T
        return self.nb.initializer(key, w.astype(self.np_dt))

    def linear(self, x: str, key: str) -> str:
        """x @ W.T for the Linear weight ``key`` [N, K]: MatMul, or MatMulNBits on quantized weights."""
        weight = self.quantized(key)
        if weight is None:
            return self.nb.op("MatMul", x, self.weight(key, transpose=True))
        return self.matmul_nbits(x, weight)

    def quantized(self, key: str) -> _QuantizedWeight | None:
        """The packed weight of ``key`` as initializers, or None where it stays float.

        Chosen once per key (the tied table serves the lookup and the LM head); what was chosen
        is kept in ``self.precision`` for the manifest.
        """
        if key not in self._quantized:
            q, how = quantize.choose_block(
                key, self.spec.weights, lambda: self.state[key].float().numpy(), self.spec.gguf
            )
            self.precision[key] = how or self.spec.dtype  # float weights: the graph's float type
            self._quantized[key] = None if q is None else self._write_block(key, q)
        return self._quantized[key]

    def _write_block(self, key: str, q: quantize.BlockQuantized) -> _QuantizedWeight:
        names = [self.nb.initializer(f"{key}.q{q.bits}", q.packed), self.nb.initializer(f"{key}.scales", q.scales)]
        if q.zero_points is not None:
            names.append(self.nb.initializer(f"{key}.zero_points", q.zero_points))
        return _QuantizedWeight(names, q)

    def matmul_nbits(self, x: str, weight: _QuantizedWeight) -> str:
        q = weight.q
        return self.nb.op(
            "MatMulNBits",
            x,
            *weight.inputs,
            domain=MS_DOMAIN,
            K=q.k,
            N=q.n,
            bits=q.bits,
            block_size=q.group,
            accuracy_level=quantize.ACCURACY_LEVEL[q.bits],
        )

    def embedding(self, ids: str) -> str:
        """Rows of the embedding table for ``ids`` [B, S] -> [B, S, H] (before Gemma's sqrt(H) scale)."""
        nb = self.nb
        key = EMBEDDING_KEY
        weight = self.quantized(key)
        if weight is None:
            return nb.op("Gather", self.weight(key), ids, axis=0)
        if not weight.q.integer_zero_points:  # GatherBlockQuantized reads integer zero points only
            fmt = quantize.weight_format("int8", 32)
            q = quantize.quantize_rows(self.state[key].float().numpy(), fmt)
            self.precision[key] = (
                f"{q.label} (requantized: the lookup takes integer zero points; was {self.precision[key]})"
            )
            weight = self._quantized[key] = self._write_block(key, q)
        packed, scales, q = weight.inputs[0], weight.inputs[1], weight.q
        # the packed table [V, k_blocks, blob] is the LM head's MatMulNBits weight too; the lookup
        # dequantizes one block per step along its last axis, so its scales are [V, k_blocks, 1]
        # and its zero points (int4) one per block, [V, k_blocks, 1]: unpacked, unlike MatMulNBits'
        zero_points = []
        if q.zero_points is not None:
            zero_points = [nb.initializer(f"{key}.block_zero_points", q.block_zero_points()[:, :, None])]
        rows = nb.op(
            "GatherBlockQuantized",
            packed,
            ids,
            nb.op("Reshape", scales, nb.i64(q.n, q.k_blocks, 1)),
            *zero_points,
            domain=MS_DOMAIN,
            bits=q.bits,
            block_size=q.group,
            quantize_axis=2,
            gather_axis=0,
        )
        h = nb.op("Reshape", rows, nb.i64(0, 0, -1))  # [B, S, k_blocks * group]
        if q.k_blocks * q.group != q.k:  # the last block is padded with zeros: cut the padding
            h = nb.op("Slice", h, nb.i64(0), nb.i64(q.k), nb.i64(2))
        return h

    # ---- building blocks
    def rmsnorm(self, x: str, key: str) -> str:
        nb = self.nb
        w = self.weight(key, plus_one=True)
        xf = nb.op("Cast", x, to=FLOAT) if self.dt != FLOAT else x
        ms = nb.op("ReduceMean", nb.op("Mul", xf, xf), nb.i64(-1), keepdims=1)
        inv = nb.op("Reciprocal", nb.op("Sqrt", nb.op("Add", ms, nb.const(self.f.eps, np.float32))))
        y = nb.op("Mul", nb.op("Mul", xf, inv), w)
        return nb.op("Cast", y, to=self.dt) if self.dt != FLOAT else y

    def rope_tables(self, layer_type: str, positions_f: str) -> tuple[str, str]:
        nb = self.nb
        inv = nb.const(self.f.inv_freq[layer_type], np.float32, hint=f"inv_freq_{layer_type}")
        freqs = nb.op("Mul", nb.unsqueeze(positions_f, 2), inv)  # [B,S,D/2]
        emb = nb.op("Concat", freqs, freqs, axis=-1)
        scale = nb.const(self.f.rope_scale[layer_type], np.float32)
        cos = nb.op("Mul", nb.op("Cos", emb), scale)
        sin = nb.op("Mul", nb.op("Sin", emb), scale)
        if self.dt != FLOAT:
            cos, sin = nb.op("Cast", cos, to=self.dt), nb.op("Cast", sin, to=self.dt)
        return nb.unsqueeze(cos, 1), nb.unsqueeze(sin, 1)  # [B,1,S,D]

    def rope(self, x: str, cos: str, sin: str) -> str:
        nb = self.nb
        half = self.f.head_dim // 2
        x1, x2 = nb.op("Split", x, nb.i64(half, half), axis=-1, outputs=2)
        rotated = nb.op("Concat", nb.op("Neg", x2), x1, axis=-1)
        return nb.op("Add", nb.op("Mul", x, cos), nb.op("Mul", rotated, sin))

    def heads(self, x: str, n: int) -> str:
        """[B,S,n*D] -> [B,n,S,D]."""
        nb = self.nb
        return nb.op("Transpose", nb.op("Reshape", x, nb.i64(0, 0, n, self.f.head_dim)), perm=[0, 2, 1, 3])

    def softcap(self, x: str, cap: float) -> str:
        nb = self.nb
        c = nb.op("CastLike", nb.const(cap, np.float32), x)
        return nb.op("Mul", nb.op("Tanh", nb.op("Div", x, c)), c)

    def dense_attention(self, q: str, k: str, v: str, mask: str) -> str:
        """Causal GQA attention with an explicit mask [B,1,1,S,T]; softmax in float32 like HF eager."""
        nb, f = self.nb, self.f
        g = f.heads_q // f.heads_kv
        qg = nb.op("Reshape", q, nb.i64(0, f.heads_kv, g, -1, f.head_dim))
        kt = nb.unsqueeze(nb.op("Transpose", k, perm=[0, 1, 3, 2]), 2)
        scores = nb.op("Mul", nb.op("MatMul", qg, kt), nb.op("CastLike", nb.const(f.scaling, np.float32), q))
        if f.attn_softcap:
            scores = self.softcap(scores, f.attn_softcap)
        if self.dt != FLOAT:
            scores = nb.op("Cast", scores, to=FLOAT)
        scores = nb.op("Where", mask, scores, nb.const(np.finfo(np.float32).min, np.float32))
        probs = nb.op("Softmax", scores, axis=-1)
        if self.dt != FLOAT:
            probs = nb.op("Cast", probs, to=self.dt)
        out = nb.op("MatMul", probs, nb.unsqueeze(v, 2))  # [B,Hkv,g,S,D]
        return nb.op("Reshape", out, nb.i64(0, f.heads_q, -1, f.head_dim))

    # ---- the model
    def build(self) -> onnx.ModelProto:
        nb, f, spec = self.nb, self.f, self.spec
        cfg = spec.cfg
        dyn_past = ["batch", f.heads_kv, "past_sequence_length", f.head_dim]
        dyn_present = ["batch", f.heads_kv, "total_sequence_length", f.head_dim]
        inputs = [
            helper.make_tensor_value_info("input_ids", INT64, ["batch", "sequence_length"]),
            helper.make_tensor_value_info("attention_mask", INT64, ["batch", "total_sequence_length"]),
            helper.make_tensor_value_info("position_ids", INT64, ["batch", "sequence_length"]),
        ]
        outputs = [
            helper.make_tensor_value_info(
                "logits", self.dt, ["batch", "sequence_length" if spec.all_logits else 1, f.vocab]
            )
        ]
        for i in range(f.layers):
            for kind in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", self.dt, dyn_past))
                outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", self.dt, dyn_present))
        if spec.boundaries_input:
            inputs.append(helper.make_tensor_value_info(BOUNDARIES_INPUT, INT64, ["num_boundaries"]))

        # embeddings (the table is shared with the tied LM head)
        h = self.embedding("input_ids")
        h = nb.op("Mul", h, nb.op("CastLike", nb.const(f.embed_scale, np.float32), h), hint="embedded")

        # lengths, masks, positions: shared by all layers.  Every tensor is reshaped to a shape
        # computed from the inputs' shapes (T = P + S), so TVM's importer knows the symbolic
        # shapes of the masks (it gives a Range output a fresh, unrelated length otherwise).
        zero, one = nb.scalar_i64(0), nb.scalar_i64(1)
        ids_shape = nb.op("Shape", "input_ids")
        batch, seq = nb.dim(ids_shape, 0), nb.dim(ids_shape, 1)
        past = nb.dim(nb.op("Shape", "past_key_values.0.key"), 2)
        total = nb.op("Add", past, seq, hint="total_len")
        masks: dict[str, str] = {}  # explicit [B,1,1,S,T] masks: only the plain-ONNX dense layers read them
        if spec.dense_op == "onnx":
            kpos = nb.op("Reshape", nb.op("Range", zero, total, one), nb.unsqueeze(total, 0), hint="key_pos")
            qpos = nb.op("Reshape", nb.op("Range", past, total, one), nb.unsqueeze(seq, 0), hint="query_pos")
            q_col = nb.unsqueeze(qpos, 1)
            causal = nb.op("LessOrEqual", nb.unsqueeze(kpos, 0), q_col)  # [S,T]
        if spec.dense_op in ("onnx", "gqa"):
            attn_mask = nb.op(
                "Reshape", "attention_mask", nb.op("Concat", nb.unsqueeze(batch, 0), nb.unsqueeze(total, 0), axis=0)
            )
        if spec.dense_op == "onnx":
            padding = nb.unsqueeze(nb.op("Cast", attn_mask, to=BOOL), 1, 2, 3)  # [B,1,1,1,T]
            masks["full_attention"] = nb.op("And", causal, padding, hint="mask_full")
            if f.sliding_window:
                near = nb.op("Less", nb.op("Sub", q_col, nb.unsqueeze(kpos, 0)), nb.scalar_i64(f.sliding_window))
                masks["sliding_attention"] = nb.op("And", nb.op("And", causal, near), padding, hint="mask_sliding")
        if spec.dense_op == "gqa":  # GQA reads lengths, not masks: seqlens_k = real tokens - 1 per row
            seqlens_k = nb.op("Cast", nb.op("Sub", nb.op("ReduceSum", attn_mask, nb.i64(1), keepdims=0), one), to=INT32)
            total_i32 = nb.op("Cast", total, to=INT32, hint="total_len_i32")
        positions_f = nb.op("Cast", "position_ids", to=FLOAT)
        rope = {lt: self.rope_tables(lt, positions_f) for lt in sorted(set(f.layer_types))}
        boundaries = None
        if spec.sparse_layers:
            if spec.boundaries_input:
                boundaries = BOUNDARIES_INPUT
            else:  # fixed chunks over all keys: 0, c, 2c, ..., T
                # Range(0, T + c, c) clipped at T: 0, c, ..., T (one Range, no Concat of a shape and a tensor,
                # which TVM's importer cannot mix)
                chunk = nb.scalar_i64(cfg.chunk_size)
                steps = nb.op("Range", zero, nb.op("Add", total, chunk), chunk)
                boundaries = nb.op("Min", steps, nb.as_tensor(nb.unsqueeze(total, 0)), hint="boundaries")

        for i in range(f.layers):
            p = f"model.layers.{i}."
            lt = f.layer_types[i]
            window = f.sliding_window if lt == "sliding_attention" else None
            x = self.rmsnorm(h, p + "input_layernorm.weight")
            q = self.heads(self.linear(x, p + "self_attn.q_proj.weight"), f.heads_q)
            k = self.heads(self.linear(x, p + "self_attn.k_proj.weight"), f.heads_kv)
            v = self.heads(self.linear(x, p + "self_attn.v_proj.weight"), f.heads_kv)
            if f.qk_norm:
                q = self.rmsnorm(q, p + "self_attn.q_norm.weight")
                k = self.rmsnorm(k, p + "self_attn.k_norm.weight")
            cos, sin = rope[lt]
            q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
            if spec.dense_op == "gqa" and i not in spec.sparse_layers:  # [B,S,Hq*D]; writes present.i.*
                attn = self.gqa_attention(q, k, v, i, window, seqlens_k, total_i32)
            else:
                k_all = nb.op("Concat", f"past_key_values.{i}.key", k, axis=2, outputs=[f"present.{i}.key"])
                v_all = nb.op("Concat", f"past_key_values.{i}.value", v, axis=2, outputs=[f"present.{i}.value"])
                if i in spec.sparse_layers:
                    attn = self.sparse_attention(q, k_all, v_all, boundaries, window, i)
                elif spec.dense_op == "edgeattn":
                    attn = self.dense_flash(q, k_all, v_all, window)
                else:
                    attn = self.dense_attention(q, k_all, v_all, masks[lt] if window else masks["full_attention"])
                attn = nb.op("Reshape", nb.op("Transpose", attn, perm=[0, 2, 1, 3]), nb.i64(0, 0, -1))
            attn = self.linear(attn, p + "self_attn.o_proj.weight")
            h = nb.op("Add", h, self.rmsnorm(attn, p + "post_attention_layernorm.weight"), hint=f"h{i}_attn")
            x = self.rmsnorm(h, p + "pre_feedforward_layernorm.weight")
            gate = self.linear(x, p + "mlp.gate_proj.weight")
            up = self.linear(x, p + "mlp.up_proj.weight")
            mlp = self.linear(nb.op("Mul", self.gelu_tanh(gate), up), p + "mlp.down_proj.weight")
            h = nb.op("Add", h, self.rmsnorm(mlp, p + "post_feedforward_layernorm.weight"), hint=f"h{i}")

        h = self.rmsnorm(h, "model.norm.weight")
        if not spec.all_logits:
            h = nb.op("Slice", h, nb.i64(-1), nb.i64(np.iinfo(np.int64).max), nb.i64(1), hint="last_hidden")
        head_key = EMBEDDING_KEY if self._tied() else LM_HEAD_KEY
        flat = nb.op("Reshape", h, nb.i64(-1, f.hidden))
        head = self.quantized(head_key)
        if head is not None:
            logits = self.matmul_nbits(flat, head)
        else:
            logits = nb.op("Gemm", flat, self.weight(head_key), transB=1)
        out_shape = nb.op("Concat", nb.op("Slice", nb.op("Shape", h), nb.i64(0), nb.i64(2)), nb.i64(f.vocab), axis=0)
        if f.final_softcap:
            logits = self.softcap(nb.op("Reshape", logits, out_shape), f.final_softcap)
            nb.op("Identity", logits, outputs=["logits"])
        else:
            nb.op("Reshape", logits, out_shape, outputs=["logits"])

        graph = helper.make_graph(nb.nodes, "edgeattn_gemma", inputs, outputs, initializer=nb.initializers)
        opsets = [helper.make_opsetid("", OPSET)]
        functions = []
        if spec.sparse_layers or spec.dense_op == "edgeattn":
            opsets.append(helper.make_opsetid(ops.DOMAIN, ops.DOMAIN_VERSION))
            used = {n.op_type for n in nb.nodes if n.domain == ops.DOMAIN}
            functions = [fn for fn in ops.functions() if fn.name in used]  # the bodies of the ops in the file
        if spec.dense_op == "gqa" or any(w is not None for w in self._quantized.values()):
            opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
        model = helper.make_model(graph, opset_imports=opsets, functions=functions, producer_name="edgeattn")
        model.ir_version = 10
        return model

    def _tied(self) -> bool:
        if LM_HEAD_KEY not in self.state:
            return True
        return (
            bool(self.model.config.tie_word_embeddings)
            or self.state[LM_HEAD_KEY].data_ptr() == self.state[EMBEDDING_KEY].data_ptr()
        )

    def gelu_tanh(self, x: str) -> str:
        """gelu with the tanh approximation, spelled out (Gelu-20 needs opset 20; TVM imports these ops)."""
        nb = self.nb

        def c(val: float) -> str:
            return nb.op("CastLike", nb.const(val, np.float32), x)

        inner = nb.op(
            "Mul",
            c(math.sqrt(2.0 / math.pi)),
            nb.op("Add", x, nb.op("Mul", c(0.044715), nb.op("Mul", x, nb.op("Mul", x, x)))),
        )
        return nb.op("Mul", nb.op("Mul", c(0.5), x), nb.op("Add", c(1.0), nb.op("Tanh", inner)))

    def dense_flash(self, q: str, k: str, v: str, window: int | None) -> str:
        """One ai.edgeattn DenseFlashAttention node: causal (+ window, softcap) over all keys, [B,Hq,S,D]."""
        nb, f = self.nb, self.f
        out = nb.op(
            ops.OP_DENSE,
            q,
            k,
            v,
            domain=ops.DOMAIN,
            hint="dense_out",
            scaling=f.scaling,
            softcap=float(f.attn_softcap or 0.0),
            window=int(window or 0),
        )
        if not f.attn_softcap:
            nb.nodes[-1].overload = ops.NO_SOFTCAP
        return out

    def gqa_attention(self, q: str, k: str, v: str, layer: int, window: int | None, seqlens: str, total: str) -> str:
        """ONNX Runtime's GroupQueryAttention (com.microsoft): appends k, v to the past itself.

        Inputs are the rotated q [B,Hq,S,D] and the new k, v [B,Hkv,S,D] (RoPE is done here, so
        ``do_rotary`` stays 0); returns [B,S,Hq*D] and writes ``present.{layer}.key/value``.
        ``local_window_size`` = the window (checked: query p sees keys p - window < j <= p, as in
        transformers; window - 1 gives other logits from the first query past the window).
        """
        nb, f = self.nb, self.f

        def packed(x: str) -> str:  # [B,H,S,D] -> [B,S,H*D]
            return nb.op("Reshape", nb.op("Transpose", x, perm=[0, 2, 1, 3]), nb.i64(0, 0, -1))

        attrs: dict[str, Any] = dict(num_heads=f.heads_q, kv_num_heads=f.heads_kv, scale=f.scaling)
        if f.attn_softcap:
            attrs["softcap"] = float(f.attn_softcap)
        if window:
            attrs["local_window_size"] = int(window)
        out, _, _ = nb.op(
            "GroupQueryAttention",
            packed(q),
            packed(k),
            packed(v),
            f"past_key_values.{layer}.key",
            f"past_key_values.{layer}.value",
            seqlens,
            total,
            domain=MS_DOMAIN,
            outputs=[f"layers.{layer}.gqa_out", f"present.{layer}.key", f"present.{layer}.value"],
            **attrs,
        )
        return out

    def sparse_attention(self, q: str, k: str, v: str, boundaries: str, window: int | None, layer: int) -> str:
        nb, f, cfg = self.nb, self.f, self.spec.cfg
        min_chunk = cfg.chunk_size if (cfg.kind == "block-sparse" or cfg.chunking == "fixed") else cfg.min_chunk
        window_attrs = {"observe": cfg.observe, "vertical": cfg.vertical_tokens} if cfg.vertical_tokens else {}
        sel, nsel = nb.op(
            ops.OP_SELECT,
            q,
            k,
            boundaries,
            domain=ops.DOMAIN,
            outputs=[f"layers.{layer}.dhsa_sel", f"layers.{layer}.dhsa_nsel"],
            budget=cfg.budget,
            sinks=cfg.sinks,
            max_selected=ops.max_selected(cfg.budget, cfg.sinks, min_chunk),
            normalize=1 if cfg.kind == "dhsa" else 0,
            local=cfg.local,  # the band of recent keys (0: off); explicit, as inliners may drop defaults
            **window_attrs,
        )
        if window_attrs:
            nb.nodes[-1].overload = ops.VERTICAL  # the body with the observation window's vertical chunks
        out = nb.op(
            ops.OP_SPARSE,
            q,
            k,
            v,
            boundaries,
            sel,
            nsel,
            domain=ops.DOMAIN,
            hint=f"layers.{layer}.dhsa_out",
            scaling=f.scaling,
            softcap=float(f.attn_softcap or 0.0),
            window=int(window or 0),
            sinks=cfg.sinks,
        )
        if not f.attn_softcap:
            nb.nodes[-1].overload = ops.NO_SOFTCAP  # the body without the capping nodes
        return out


def build_onnx(model: Any, spec: GraphSpec, precision: dict[str, str] | None = None) -> onnx.ModelProto:
    """The ONNX model of ``model`` with ``spec``'s attention (weights as initializers, in memory).

    ``precision``, when given, receives how each matrix is stored (state-dict key -> description).
    """
    facts = model_facts(model)
    if spec.dense_op not in DENSE_OPS:
        raise ValueError(f"dense op {spec.dense_op!r} is unknown; choose one of {', '.join(DENSE_OPS)}")
    bad = [i for i in spec.sparse_layers if not 0 <= i < facts.layers]
    if bad:
        raise ValueError(f"layer indices {bad} out of range: the model has layers 0..{facts.layers - 1}")
    writer = _GemmaWriter(model, facts, spec)
    proto = writer.build()
    if precision is not None:
        precision.update(writer.precision)
    return proto
