"""The ``ai.edgeattn`` nodes of an exported file on the TVM kernels, inside an ONNX Runtime run.

How: the file is cut at its ``ai.edgeattn`` nodes.  ONNX Runtime runs every stretch of
standard ops between two such nodes (one InferenceSession per stretch, "segment"); the
nodes themselves run on the kernels of ``kernels_tvm`` (``registry.layer_kernel`` with the
node's attributes); tensors pass between them as numpy arrays that ORT reads without a
copy (its CPU inputs wrap numpy memory) and TVM reads through DLPack.

Why not an ORT custom op: onnxruntime-extensions' Python ops (PyOp) hand every output back
to ONNX Runtime as a Python list (``r.flatten().tolist()`` in its ``_ocos.py``): measured here,
2.2 s for one 16 MiB output -- the attention output of one layer at 4K tokens -- against
milliseconds for the kernel.  A compiled custom-op library needs ONNX Runtime's C API headers,
which no PyPI wheel ships.  Cutting the graph costs one ``session.run`` per segment and loses
ORT's fusions across attention nodes (there are none across attention), and keeps the
standard ops exactly as ORT runs the whole file.  ``export/OPS.md`` ("ONNX Runtime") says the same.

Nothing here builds an L x L tensor: select -> sel/nsel [B, Hkv, Nq, M], sparse and dense
attention -> out [B, Hq, Lq, D]; prefill kernels when Lq > 1, decode kernels when Lq == 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeattn.export import ops as onnx_ops
from edgeattn.export import quantize
from edgeattn.runtime import heap

EDGEATTN_OPS = (onnx_ops.OP_SELECT, onnx_ops.OP_SPARSE, onnx_ops.OP_DENSE)


# ------------------------------------------------------------------ the nodes on the kernels


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _kernel_input(x: np.ndarray, dtype: Any) -> Any:
    """A contiguous, 64-byte aligned copy-free view where possible (registry.as_tvm copies otherwise)."""
    return np.ascontiguousarray(x, dtype=dtype)


def _run_select(q: np.ndarray, k: np.ndarray, boundaries: np.ndarray, attrs: dict[str, Any], target: Any) -> list:
    import torch

    from edgeattn.kernels_tvm import registry

    bsz, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    bnd = boundaries.astype(np.int64)
    nc = len(bnd) - 1
    nq = int((bnd[1:] > lk - lq).sum())
    width = int(attrs["max_selected"])
    m = max(1, min(width, nc))  # the kernel's top-list width; the file's sel is padded to `width` with -1
    kern = registry.layer_kernel(
        onnx_ops.OP_SELECT,
        target,
        heads_q=hq,
        heads_kv=hkv,
        head_dim=d,
        dtype=str(q.dtype),
        budget=int(attrs["budget"]),
        sinks=int(attrs.get("sinks", 4)),
        normalize=bool(attrs.get("normalize", 1)),
        local=int(attrs.get("local", 0)),
        observe=int(attrs.get("observe", 0)),
        vertical=int(attrs.get("vertical", 0)),
    )
    bt = registry.empty(bnd.shape, "int32")
    bt.copy_(torch.from_numpy(bnd.astype(np.int32)))
    sel = np.full((bsz, hkv, nq, width), -1, np.int64)
    nsel = np.empty((bsz, hkv, nq), np.int64)
    for b in range(bsz):
        sel_t, nsel_t = registry.empty((hkv, nq, m), "int32"), registry.empty((hkv, nq), "int32")
        kern(_kernel_input(q[b], q.dtype), _kernel_input(k[b], k.dtype), bt, sel_t, nsel_t)
        sel[b, :, :, :m] = sel_t.numpy()
        nsel[b] = nsel_t.numpy()
    return [sel, nsel]


def _attention_spec(q: np.ndarray, k: np.ndarray, attrs: dict[str, Any]) -> dict[str, Any]:
    return dict(
        heads_q=q.shape[1],
        heads_kv=k.shape[1],
        head_dim=q.shape[3],
        dtype=str(q.dtype),
        scaling=float(attrs["scaling"]),
        softcap=float(attrs.get("softcap", 0.0)) or None,
        window=int(attrs.get("window", 0)) or None,
        decode=q.shape[2] == 1,
    )


def _run_attention(op: str, arrays: Sequence[np.ndarray], attrs: dict[str, Any], target: Any) -> list:
    """DHSASparseAttention (q, k, v, boundaries, sel, nsel) or DenseFlashAttention (q, k, v) -> [out]."""
    import torch

    from edgeattn.kernels_tvm import registry

    q, k, v = arrays[:3]
    spec = _attention_spec(q, k, attrs)
    if op == onnx_ops.OP_SPARSE:
        spec["sinks"] = int(attrs.get("sinks", 4))
        if not spec["decode"]:
            # one query chunk per CPU query tile, as run_layer does: without the hint the kernel's
            # 32-query tiles ran chunks of 16 half empty (ort DHSA 35.0 s at 16K against 28.4 s
            # with chunks of 32, where torch DHSA moved by 0.8 s)
            spec["query_tile"] = registry.query_tile_for(arrays[3])
    kern = registry.layer_kernel(op, target, **spec)
    out = np.empty(q.shape, q.dtype)
    extra: list[Any] = []
    if op == onnx_ops.OP_SPARSE:
        boundaries, sel, nsel = arrays[3:6]
        if (nsel < 0).any():
            raise RuntimeError(f"{op}: nsel < 0 (the chunk selection overflowed max_selected); an exporter bug")
        bt = registry.empty(boundaries.shape, "int32")
        bt.copy_(torch.from_numpy(boundaries.astype(np.int32)))
        # the kernel reads sel[h, c, :nsel]: cut the file's -1 padding to the widest row
        width = max(1, int(nsel.max()) if nsel.size else 1)
        sel32 = np.ascontiguousarray(sel[..., :width], dtype=np.int32)
        nsel32 = np.ascontiguousarray(nsel, dtype=np.int32)
    for b in range(q.shape[0]):
        if op == onnx_ops.OP_SPARSE:
            extra = [bt, _kernel_input(sel32[b], np.int32), _kernel_input(nsel32[b], np.int32)]
        ob = registry.empty(q.shape[1:], str(q.dtype))  # 64-byte aligned: written in place, zero-copy
        kern(_kernel_input(q[b], q.dtype), _kernel_input(k[b], k.dtype), _kernel_input(v[b], v.dtype), *extra, ob)
        if q.shape[0] == 1:
            return [ob.numpy()[None]]
        out[b] = ob.numpy()
    return [out]


def run_node(node: onnx.NodeProto, arrays: Sequence[np.ndarray], target: Any = None) -> list[np.ndarray]:
    """Run one ``ai.edgeattn`` node on the TVM kernels; outputs as the file declares them (int64 sel/nsel)."""
    attrs = _attrs(node)
    if node.op_type == onnx_ops.OP_SELECT:
        return _run_select(arrays[0], arrays[1], arrays[2], attrs, target)
    if node.op_type in (onnx_ops.OP_SPARSE, onnx_ops.OP_DENSE):
        return _run_attention(node.op_type, arrays, attrs, target)
    raise ValueError(f"{node.domain}.{node.op_type} has no kernel; known: {', '.join(EDGEATTN_OPS)}")


def is_edgeattn_node(node: onnx.NodeProto) -> bool:
    return node.domain == onnx_ops.DOMAIN and node.op_type in EDGEATTN_OPS


# ------------------------------------------------------------------ the file, cut at those nodes


@dataclass
class _Step:
    """One step of a run: an ORT segment (session) or one kernel node."""

    inputs: list[str]
    outputs: list[str]
    session: Any = None  # onnxruntime.InferenceSession for a segment
    node: onnx.NodeProto | None = None  # the ai.edgeattn node for a kernel step
    frees: tuple[str, ...] = ()  # values no later step reads: dropped after this one


def _value_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Element type (and what shape inference knows) of every tensor, from a weight-less copy of the graph."""
    g = model.graph
    init_types = {t.name: t.data_type for t in g.initializer}
    nodes, placeholders = [], []
    for node in g.node:  # onnx cannot type what follows a com.microsoft quantized op: a stand-in can
        stand = quantize.stand_in(node)
        if stand is None:
            nodes.append(node)
            continue
        nodes.append(stand[0])
        placeholders.append(
            helper.make_tensor_value_info(stand[1], init_types.get(stand[2], onnx.TensorProto.FLOAT), None)
        )
    light = helper.make_graph(
        nodes,
        g.name,
        list(g.input)
        + [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in g.initializer]
        + placeholders,
        list(g.output),
    )
    lm = helper.make_model(light, opset_imports=list(model.opset_import), functions=list(model.functions))
    lm.ir_version = model.ir_version
    inferred = onnx.shape_inference.infer_shapes(lm)
    types = {vi.name: vi.type for vi in list(inferred.graph.value_info) + list(light.input) + list(light.output)}
    # custom-op outputs (function inference may leave them out): their types follow from the op
    for node in g.node:
        if is_edgeattn_node(node):
            for name in node.output:
                if name not in types or not types[name].tensor_type.elem_type:
                    elem = onnx.TensorProto.INT64 if node.op_type == onnx_ops.OP_SELECT else None
                    if elem is None:
                        elem = types[node.input[0]].tensor_type.elem_type
                    types[name] = helper.make_tensor_type_proto(elem, None)
    return types


def _untyped_shape(t: onnx.TypeProto) -> onnx.TypeProto:
    """Keep the element type only (inferred symbolic dims of intermediates are not worth trusting)."""
    return helper.make_tensor_type_proto(t.tensor_type.elem_type, None)


class SegmentedModel:
    """An exported file whose ai.edgeattn nodes run on TVM kernels and everything else on ORT.

    ``run(feed)`` takes and returns the file's graph inputs/outputs by name, like
    ``InferenceSession.run``; ``input_names``/``output_names`` mirror the file.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        session_factory: Callable[[bytes], Any],
        target: Any = None,
    ) -> None:
        g = model.graph
        self.target = target
        self.input_names = [i.name for i in g.input]
        self.output_names = [o.name for o in g.output]
        types = _value_types(model)
        inits = {t.name: t for t in g.initializer}

        # group the nodes: runs of standard nodes, and each ai.edgeattn node alone
        groups: list[list[onnx.NodeProto]] = []
        for node in g.node:
            if is_edgeattn_node(node):
                groups.append([node])
            elif groups and not is_edgeattn_node(groups[-1][-1]):
                groups[-1].append(node)
            else:
                groups.append([node])
        consumers: dict[str, set[int]] = {}
        for gi, nodes in enumerate(groups):
            for node in nodes:
                for name in node.input:
                    if name:
                        consumers.setdefault(name, set()).add(gi)
        graph_outputs = set(self.output_names)
        # initializers read by more than one segment (the tied embedding: lookup and LM head)
        # are held once here and fed to each as an input (ORT reads numpy inputs without a copy);
        # quantized ones stay initializers of each segment, as MatMulNBits prepacks only those
        # (fed as an input, it unpacks the whole table on every call: 1.3 s for Gemma 3's LM head)
        quantized_inputs = {n for node in g.node if quantize.is_quantized_op(node) for n in node.input}
        self.shared: dict[str, np.ndarray] = {
            n: numpy_helper.to_array(inits[n])
            for n, used in consumers.items()
            if n in inits and len(used) > 1 and n not in quantized_inputs
        }
        self.steps: list[_Step] = []
        for gi, nodes in enumerate(groups):
            produced = [o for n in nodes for o in n.output if o]
            produced_set = set(produced)
            needed: list[str] = []
            for node in nodes:
                for name in node.input:
                    if name and name not in produced_set and name not in needed:
                        needed.append(name)
            outputs = [o for o in produced if o in graph_outputs or any(c > gi for c in consumers.get(o, ()))]
            if is_edgeattn_node(nodes[0]):
                # a copy: a sub-message would keep the whole ModelProto (weights included) alive
                node = onnx.NodeProto()
                node.CopyFrom(nodes[0])
                self.steps.append(_Step(inputs=list(node.input), outputs=list(node.output), node=node))
                continue
            own_inits = [inits[n] for n in needed if n in inits and n not in self.shared]
            feeds = [n for n in needed if n not in inits or n in self.shared]
            sub = helper.make_graph(
                nodes,
                f"{g.name}_segment{gi}",
                [helper.make_value_info(n, _untyped_shape(types[n])) for n in feeds],
                [helper.make_value_info(n, _untyped_shape(types[n])) for n in outputs],
                initializer=own_inits,
            )
            sub_model = helper.make_model(sub, opset_imports=list(model.opset_import), functions=list(model.functions))
            sub_model.ir_version = model.ir_version
            data = sub_model.SerializeToString()
            del sub_model, sub
            self.steps.append(_Step(inputs=feeds, outputs=outputs, session=session_factory(data)))
        # drop each intermediate value after its last reader (graph outputs and shared weights stay)
        last_read: dict[str, int] = {}
        for si, step in enumerate(self.steps):
            for name in step.inputs:
                last_read[name] = si
        for si, step in enumerate(self.steps):
            step.frees = tuple(
                n
                for n, last in last_read.items()
                if last == si and n not in graph_outputs and n not in self.shared and n not in self.input_names
            )

    @property
    def kernel_nodes(self) -> list[onnx.NodeProto]:
        return [s.node for s in self.steps if s.node is not None]

    @property
    def segments(self) -> int:
        return sum(1 for s in self.steps if s.session is not None)

    def run(self, feed: dict[str, np.ndarray], trim: bool = False) -> dict[str, np.ndarray]:
        """The file's outputs for ``feed``; ``trim``: hand freed heap pages back after each ORT segment
        (a long prefill: the next segment's peak then stands on what is alive, see runtime/heap.py)."""
        values: dict[str, np.ndarray] = {**self.shared, **feed}
        for step in self.steps:
            if step.node is not None:
                outs = run_node(step.node, [values[n] for n in step.inputs], self.target)
            else:
                outs = step.session.run(step.outputs, {n: values[n] for n in step.inputs})
            values.update(zip(step.outputs, outs, strict=True))
            for name in step.frees:
                values.pop(name, None)
            if trim and step.node is None:
                heap.release_freed_memory()
        return {n: values[n] for n in self.output_names}


__all__ = ["EDGEATTN_OPS", "SegmentedModel", "is_edgeattn_node", "run_node"]
