"""Import an exported file with TVM 0.27's Relax ONNX frontend (the portable, op-by-op path).

TVM's frontend has no notion of ONNX functions, so the ``ai.edgeattn`` nodes are
first inlined (``onnx.inliner.inline_local_functions``) into their plain-ONNX
bodies.  One more rewrite is needed: inside the bodies, attribute values reach
the computation through ``Constant`` nodes with ``value_int``/``value_float``
(references to the op's attributes); after inlining those hold literals, and
TVM's Constant converter only reads ``value`` tensors, so they are rewritten to
tensors.  A runtime that has TIR kernels for the ops (kernels_tvm) skips the
inlining and maps each node to its kernel instead.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeattn.export import ops

_SCALAR_FIELDS = {
    "value_int": np.int64,
    "value_float": np.float32,
    "value_ints": np.int64,
    "value_floats": np.float32,
}


def constants_as_tensors(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite Constant(value_int/value_float/...) nodes of the main graph to Constant(value=tensor)."""
    for node in model.graph.node:
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            continue
        attr = node.attribute[0] if len(node.attribute) == 1 else None
        if attr is None or attr.name not in _SCALAR_FIELDS:
            continue
        value = helper.get_attribute_value(attr)
        arr = np.asarray(value, dtype=_SCALAR_FIELDS[attr.name])
        del node.attribute[:]
        node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(arr)))
    return model


def prepare_for_tvm(model: onnx.ModelProto) -> onnx.ModelProto:
    """Inline the ai.edgeattn functions and normalise constants so TVM's frontend imports the graph."""
    from onnx import inliner

    inlined = inliner.inline_local_functions(model)
    return constants_as_tensors(inlined)


def import_onnx(
    path_or_model: str | Path | onnx.ModelProto,
    shapes: dict[str, tuple[int, ...]] | None = None,
    keep_params_in_input: bool = False,
) -> Any:
    """The Relax IRModule of an exported file (functions inlined).

    ``shapes`` fixes input shapes (ONNX input names).  The dense graph imports with
    dynamic shapes; the inlined DHSA bodies compute their chunk tables from data, and
    TVM 0.27 can only lower those ops (LegalizeOps, CumSum) when their shapes are known,
    so the DHSA graph is imported per input shape (everything then folds to static shapes).
    """
    from tvm.relax.frontend.onnx import from_onnx

    model = onnx.load(str(path_or_model)) if not isinstance(path_or_model, onnx.ModelProto) else path_or_model
    return from_onnx(prepare_for_tvm(model), shape_dict=shapes, keep_params_in_input=keep_params_in_input)


def compile_cpu(mod: Any) -> Any:
    """Compile a Relax module for the host CPU (LLVM) and return a VirtualMachine."""
    import tvm
    from tvm import relax

    mod = relax.transform.DecomposeOpsForInference()(mod)
    mod = relax.transform.LegalizeOps()(mod)
    exe = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))
    return relax.VirtualMachine(exe, tvm.cpu())


def run(vm: Any, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """Call ``main`` with numpy inputs (graph input order); numpy outputs."""
    import tvm

    dev = tvm.cpu()
    args = [tvm.runtime.tensor(x, dev) for x in inputs]
    out = vm["main"](*args)
    if hasattr(out, "numpy"):
        return [out.numpy()]
    return [o.numpy() for o in out]


# --------------------------------------------------------------------------- whole-model import (kernels)
#
# `import_with_kernels` is the path of `edgeattn compile`: no inlining.  Each
# ai.edgeattn node becomes a `call_tir` of its kernels_tvm kernel; each dense
# attention subgraph of the exporter (MatMul -> scale -> [softcap] -> Where(mask)
# -> Softmax -> MatMul) is first rewritten into one `DenseFlashAttention` node
# and lowered to the dense flash kernel, so no L x L tensor exists; on CPUs every
# `x @ W` with a constant W becomes a packed-weight GEMM (kernels_tvm.cpu_rules).
# TVM 0.27's frontend has no hook for custom ops: `_extended_convert_map` wraps its
# module-level `_get_convert_map` for the duration of one import (pinned to 0.27,
# see `check_frontend_seam`).

OP_DENSE = "DenseFlashAttention"  # internal node of the rewritten graph (never written to a file)
OP_GEMM = "EdgeattnPackedMatMul"
OP_PACKED_GATHER = "EdgeattnPackedGather"
OP_BOUNDARIES = "EdgeattnFixedBoundaries"
TVM_SEAM_VERSION = "0.27"
OPAQUE_PATTERN = 8  # relax OpPatternKind.kOpaque


class NotAnEdgeattnExport(ValueError):
    """The ONNX file was not written by `edgeattn export` (or its manifest is missing or foreign)."""


def export_manifest_for(onnx_path: str | Path) -> dict[str, Any]:
    """The export manifest beside ``onnx_path``; NotAnEdgeattnExport naming the fix otherwise."""
    import json

    from edgeattn.export.manifest import MANIFEST_FORMAT, manifest_path

    path = Path(onnx_path)
    mpath = manifest_path(path)
    if not mpath.is_file():
        raise NotAnEdgeattnExport(
            f"{path} has no {mpath.name} beside it: it is not an edgeattn export; "
            "write the file with `edgeattn export MODEL -o FILE.onnx`"
        )
    try:
        data = json.loads(mpath.read_text())
    except json.JSONDecodeError as exc:
        raise NotAnEdgeattnExport(f"{mpath} is damaged ({exc}); export the model again") from exc
    if data.get("format") != MANIFEST_FORMAT:
        raise NotAnEdgeattnExport(
            f"{mpath} is not an edgeattn export manifest; export the model with `edgeattn export`"
        )
    return data


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def _constant_value(name: str, producers: dict[str, onnx.NodeProto], inits: dict[str, onnx.TensorProto]) -> float:
    """The scalar behind ``name`` (through CastLike), from a Constant node or an initializer."""
    node = producers.get(name)
    if node is not None and node.op_type == "CastLike":
        return _constant_value(node.input[0], producers, inits)
    if node is not None and node.op_type == "Constant":
        attr = node.attribute[0]
        value = helper.get_attribute_value(attr)
        return float(np.asarray(numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else value))
    if name in inits:
        return float(numpy_helper.to_array(inits[name]))
    raise ValueError(f"{name} is not a constant")


def fuse_dense_attention(model: onnx.ModelProto, windows: dict[int, int | None]) -> int:
    """Rewrite each exporter dense-attention subgraph into one DenseFlashAttention(q, k, v) node, in place.

    ``windows`` maps a layer index to its sliding window (None: full attention),
    from the export manifest.  Returns how many subgraphs were rewritten; the
    dead mask and score nodes are pruned by :func:`prune_dead_nodes`.
    """
    producers = _producers(model)
    inits = {t.name: t for t in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    replace: dict[int, onnx.NodeProto] = {}
    index = {id(n): i for i, n in enumerate(model.graph.node)}
    for sm in [n for n in model.graph.node if n.op_type == "Softmax"]:
        where = producers.get(sm.input[0])
        if where is None or where.op_type != "Where":
            continue
        scores = producers.get(where.input[1])
        softcap = 0.0
        if scores is not None and scores.op_type == "Mul" and producers.get(scores.input[0], scores).op_type == "Tanh":
            tanh = producers[scores.input[0]]
            div = producers[tanh.input[0]]
            softcap = _constant_value(div.input[1], producers, inits)
            scores = producers.get(div.input[0])
        if scores is None or scores.op_type != "Mul":
            continue
        qk = producers.get(scores.input[0])
        if qk is None or qk.op_type != "MatMul":
            continue
        scaling = _constant_value(scores.input[1], producers, inits)
        q_reshape, k_unsq = producers.get(qk.input[0]), producers.get(qk.input[1])
        k_tr = producers.get(k_unsq.input[0]) if k_unsq is not None else None
        if q_reshape is None or q_reshape.op_type != "Reshape" or k_tr is None or k_tr.op_type != "Transpose":
            continue
        pv = [c for c in consumers.get(sm.output[0], []) if c.op_type == "MatMul"]
        if len(pv) != 1:
            continue
        v_unsq = producers.get(pv[0].input[1])
        out_reshape = consumers.get(pv[0].output[0], [])
        if v_unsq is None or v_unsq.op_type != "Unsqueeze" or len(out_reshape) != 1:
            continue
        k_all, v_all = k_tr.input[0], v_unsq.input[0]
        if not k_all.startswith("present.") or not k_all.endswith(".key"):
            continue
        layer = int(k_all.split(".")[1])
        window = int(windows.get(layer) or 0)
        node = helper.make_node(
            OP_DENSE,
            [q_reshape.input[0], k_all, v_all],
            [out_reshape[0].output[0]],
            name=f"dense_flash_{layer}",
            domain=ops.DOMAIN,
            scaling=float(scaling),
            softcap=float(softcap),
            window=window,
        )
        replace[index[id(out_reshape[0])]] = node
    for i, node in replace.items():
        model.graph.node[i].CopyFrom(node)
    prune_dead_nodes(model)
    return len(replace)


def prune_dead_nodes(model: onnx.ModelProto) -> None:
    """Drop nodes none of whose outputs reach a graph output (and initializers nothing reads)."""
    live = {o.name for o in model.graph.output}
    keep: list[onnx.NodeProto] = []
    for node in reversed(model.graph.node):
        if any(o in live for o in node.output):
            keep.append(node)
            live.update(i for i in node.input if i)
    keep.reverse()
    del model.graph.node[:]
    model.graph.node.extend(keep)
    used = [t for t in model.graph.initializer if t.name in live]
    del model.graph.initializer[:]
    model.graph.initializer.extend(used)


def fix_batch(model: onnx.ModelProto, batch: int = 1) -> None:
    """Pin the ``batch`` axis of every graph input and output (the runtime runs one sequence)."""
    for vi in list(model.graph.input) + list(model.graph.output):
        for dim in vi.type.tensor_type.shape.dim:
            if dim.dim_param == "batch":
                dim.Clear()
                dim.dim_value = batch


def pack_gemm_weights(model: onnx.ModelProto, nb: int) -> int:
    """Turn ``MatMul(x, W)`` / ``Gemm(x, W, transB=1)`` with a constant W into packed GEMM nodes, in place.

    W becomes the initializer ``W.packed`` [N / nb, K, nb]; a ``Gather`` reading
    the same table (Gemma's tied embedding) reads the packed table instead, so the
    vocabulary matrix is held once.  Returns the number of GEMMs rewritten.
    """
    from edgeattn.kernels_tvm.cpu_rules import pack_weight

    inits = {t.name: t for t in model.graph.initializer}
    packed: dict[str, tuple[str, int, int]] = {}  # weight -> (packed name, K, N)
    transposed_tables: set[str] = set()
    count = 0

    def packed_name(name: str, transposed: bool) -> tuple[str, int, int] | None:
        if name in packed:
            return packed[name]
        t = inits.get(name)
        if t is None or len(t.dims) != 2 or t.data_type != onnx.TensorProto.FLOAT:
            return None
        n = t.dims[0] if transposed else t.dims[1]
        k = t.dims[1] if transposed else t.dims[0]
        if n % nb:
            return None
        arr = pack_weight(numpy_helper.to_array(t), nb, transposed=transposed)
        new = numpy_helper.from_array(arr, name + ".packed")
        model.graph.initializer.append(new)
        packed[name] = (new.name, int(k), int(n))
        if transposed:
            transposed_tables.add(name)
        return packed[name]

    for i, node in enumerate(model.graph.node):
        hit = None
        if node.op_type == "MatMul" and node.input[1] in inits:
            hit = packed_name(node.input[1], transposed=False)
        elif node.op_type == "Gemm" and len(node.input) == 2 and node.input[1] in inits:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("transB", 0) == 1 and not attrs.get("transA", 0) and attrs.get("alpha", 1.0) == 1.0:
                hit = packed_name(node.input[1], transposed=True)
        if hit is None:
            continue
        pname, k, n = hit
        new = helper.make_node(OP_GEMM, [node.input[0], pname], list(node.output), name=node.name, k=k, n=n)
        model.graph.node[i].CopyFrom(new)
        count += 1
    for i, node in enumerate(model.graph.node):
        if node.op_type == "Gather" and node.input[0] in transposed_tables:
            pname, k, n = packed[node.input[0]]
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("axis", 0) == 0:
                new = helper.make_node(
                    OP_PACKED_GATHER, [pname, node.input[1]], list(node.output), name=node.name, k=k, n=n
                )
                model.graph.node[i].CopyFrom(new)
    prune_dead_nodes(model)
    return count


def _shape(x: Any) -> list[Any]:
    return list(x.ty.shape.values)


class _Lowering:
    """The converters of one import: kernels for ``target``, one PrimFunc per distinct kernel spec."""

    def __init__(self, target: Any, chunk_size: int | None, tile: Any, decode: bool = False) -> None:
        self.target = target
        self.chunk_size = chunk_size
        self.tile = tile
        self.decode = decode  # Lq == 1 everywhere: the attention kernels specialised for decode
        self.gvars: dict[tuple, Any] = {}
        self.kernels: list[str] = []

    def _gvar(self, bb: Any, key: tuple, name: str, build: Any) -> Any:
        gv = self.gvars.get(key)
        if gv is None:
            unique = f"{name}_{len(self.gvars)}"
            # opaque: FuseOps must not fuse a hand-written kernel into its neighbours (FuseTIR would
            # inline its loop nests, and they are not TensorIR blocks)
            # and already scheduled: DLight (GPU targets) must leave it alone
            func = build().with_attr("global_symbol", unique).with_attr("op_pattern", OPAQUE_PATTERN)
            func = func.with_attr("tirx.is_scheduled", True)
            gv = self.gvars[key] = bb.add_func(func, unique)
            self.kernels.append(f"{unique}: {key}")
        return gv

    def _attention_kernel(self, bb: Any, op: str, q: Any, k: Any, **attrs: Any) -> Any:
        from edgeattn.kernels_tvm import registry
        from edgeattn.kernels_tvm.abi import SYMBOL, KernelSpec

        _, hq, _, d = _shape(q)
        hkv = _shape(k)[1]
        kw = dict(heads_q=int(hq), heads_kv=int(hkv), head_dim=int(d), **attrs)
        if op != "DHSAChunkSelect":
            kw["decode"] = self.decode
        fields = KernelSpec.__dataclass_fields__
        if op == "DHSASparseAttention" and "query_tile" in fields and self.chunk_size:
            kw["query_tile"] = int(self.chunk_size)  # a schedule hint: one chunk per CPU query tile
        unknown = [k for k, v in kw.items() if k not in fields and v]
        if unknown:
            raise NotAnEdgeattnExport(
                f"the export's {op} nodes carry {unknown}, which this build's kernels do not know; "
                "update edgeattn (kernels_tvm) or export without them"
            )
        kw = {k: v for k, v in kw.items() if k in fields}
        key = (op, tuple(sorted(kw.items())))
        return self._gvar(bb, key, SYMBOL[op], lambda: registry.build_module(op, self.target, **kw)[SYMBOL[op]])

    @staticmethod
    def _heads(bb: Any, x: Any) -> Any:
        b, h, n, d = _shape(x)
        return bb.emit(relax_op().reshape(x, [h, n, d]))

    def dense(self, bb: Any, inputs: list[Any], attr: dict[str, Any]) -> Any:
        from tvm import relax

        q, k, v = inputs
        gv = self._attention_kernel(
            bb,
            "DenseFlashAttention",
            q,
            k,
            scaling=float(attr["scaling"]),
            softcap=float(attr.get("softcap", 0.0)) or None,
            window=int(attr.get("window", 0)) or None,
        )
        b, hq, s, d = _shape(q)
        out = bb.emit(
            relax.call_tir(
                gv,
                [self._heads(bb, q), self._heads(bb, k), self._heads(bb, v)],
                relax.TensorType([hq, s, d], q.ty.dtype),
            )
        )
        return relax_op().reshape(out, [b, hq, s, d])

    def select(self, bb: Any, inputs: list[Any], attr: dict[str, Any]) -> Any:
        from tvm import relax

        q, k, boundaries = inputs
        if self.chunk_size is None:
            raise NotAnEdgeattnExport("the export manifest has no chunk_size; re-export the model with edgeattn export")
        gv = self._attention_kernel(
            bb,
            "DHSAChunkSelect",
            q,
            k,
            budget=int(attr["budget"]),
            sinks=int(attr.get("sinks", 4)),
            normalize=bool(attr.get("normalize", 1)),
            local=int(attr.get("local", 0)),
            observe=int(attr.get("observe", 0)),
            vertical=int(attr.get("vertical", 0)),
        )
        s, t, hkv = _shape(q)[2], _shape(k)[2], _shape(k)[1]
        c = int(self.chunk_size)
        nq = (t + c - 1) // c - (t - s) // c  # key chunks holding a query (fixed chunks of c)
        m = int(attr["max_selected"])
        b32 = boundaries  # int32 from EdgeattnFixedBoundaries
        return bb.emit(
            relax.call_tir(
                gv,
                [self._heads(bb, q), self._heads(bb, k), b32],
                [relax.TensorType([hkv, nq, m], "int32"), relax.TensorType([hkv, nq], "int32")],
            )
        )

    def sparse(self, bb: Any, inputs: list[Any], attr: dict[str, Any]) -> Any:
        from tvm import relax

        q, k, v, boundaries, sel, nsel = inputs
        gv = self._attention_kernel(
            bb,
            "DHSASparseAttention",
            q,
            k,
            scaling=float(attr["scaling"]),
            softcap=float(attr.get("softcap", 0.0)) or None,
            window=int(attr.get("window", 0)) or None,
            sinks=int(attr.get("sinks", 4)),
        )
        b, hq, s, d = _shape(q)
        args = [self._heads(bb, q), self._heads(bb, k), self._heads(bb, v), boundaries, sel, nsel]
        out = bb.emit(relax.call_tir(gv, args, relax.TensorType([hq, s, d], q.ty.dtype)))
        return relax_op().reshape(out, [b, hq, s, d])

    def gemm(self, bb: Any, inputs: list[Any], attr: dict[str, Any]) -> Any:
        from tvm import relax

        from edgeattn.kernels_tvm import cpu_rules

        x, wp = inputs
        k, n = int(attr["k"]), int(attr["n"])
        gv = self._gvar(bb, ("gemm", k, n), "edgeattn_gemm", lambda: cpu_rules.gemm_primfunc(k, n, self.tile))
        lead = _shape(x)[:-1]
        rows = lead[0]
        for dim in lead[1:]:
            rows = rows * dim
        x2 = bb.emit(relax_op().reshape(x, [rows, k]))
        out = bb.emit(relax.call_tir(gv, [x2, wp], relax.TensorType([rows, n], x.ty.dtype)))
        return relax_op().reshape(out, [*lead, n])

    def packed_gather(self, bb: Any, inputs: list[Any], attr: dict[str, Any]) -> Any:
        from tvm import relax

        from edgeattn.kernels_tvm import cpu_rules

        wp, ids = inputs
        k, n = int(attr["k"]), int(attr["n"])
        gv = self._gvar(
            bb, ("gather", k, n), "edgeattn_packed_gather", lambda: cpu_rules.packed_gather_primfunc(k, n, self.tile)
        )
        lead = _shape(ids)
        count = lead[0]
        for dim in lead[1:]:
            count = count * dim
        flat = bb.emit(relax_op().reshape(relax_op().astype(ids, "int64"), [count]))
        out = bb.emit(relax.call_tir(gv, [wp, flat], relax.TensorType([count, k], wp.ty.dtype)))
        return relax_op().reshape(out, [*lead, k])

    def boundaries(self, bb: Any, inputs: list[Any], attr: dict[str, Any]) -> Any:
        from tvm import relax

        from edgeattn.kernels_tvm import cpu_rules

        (k,) = inputs
        c = int(attr["chunk"])
        t = _shape(k)[2]
        gpu = self.target.kind.name not in ("llvm", "c")
        gv = self._gvar(
            bb, ("boundaries", c, gpu), "edgeattn_fixed_boundaries", lambda: cpu_rules.fixed_boundaries_primfunc(c, gpu)
        )
        return bb.emit(relax.call_tir(gv, [k], relax.TensorType([(t + c - 1) // c + 1], "int32")))

    def converters(self) -> dict[str, Any]:
        from tvm.relax.frontend.onnx import onnx_frontend as fe

        def make(name: str, fn: Any) -> Any:
            def impl(cls: Any, bb: Any, inputs: Any, attr: Any, params: Any) -> Any:
                return fn(bb, list(inputs), attr)

            return type(name, (fe.OnnxOpConverter,), {"_impl_v1": classmethod(impl)})

        return {
            OP_DENSE: make(OP_DENSE, self.dense),
            ops.OP_SELECT: make(ops.OP_SELECT, self.select),
            ops.OP_SPARSE: make(ops.OP_SPARSE, self.sparse),
            OP_GEMM: make(OP_GEMM, self.gemm),
            OP_PACKED_GATHER: make(OP_PACKED_GATHER, self.packed_gather),
            OP_BOUNDARIES: make(OP_BOUNDARIES, self.boundaries),
        }


def relax_op() -> Any:
    from tvm.relax import op

    return op


def check_frontend_seam() -> None:
    """Raise naming the fix when this TVM is not the version whose private frontend names the import uses."""
    import tvm
    from tvm.relax.frontend.onnx import onnx_frontend as fe

    if not tvm.__version__.startswith(TVM_SEAM_VERSION) or not hasattr(fe, "_get_convert_map"):
        raise RuntimeError(
            f"edgeattn's TVM import extends the Relax ONNX frontend of TVM {TVM_SEAM_VERSION} "
            f"(onnx_frontend._get_convert_map); this is TVM {tvm.__version__}: install apache-tvm==0.27.0.post1"
        )


@contextmanager
def extended_convert_map(extra: dict[str, Any]) -> Iterator[None]:
    """TVM's ONNX converter table plus ``extra`` (op_type -> converter class), for the duration of the block."""
    from tvm.relax.frontend.onnx import onnx_frontend as fe

    check_frontend_seam()
    stock = fe._get_convert_map

    def extended() -> dict[str, Any]:
        table = stock()
        clash = set(extra) & set(table)
        if clash:
            raise RuntimeError(f"TVM's ONNX frontend already converts {sorted(clash)}; rename the custom ops")
        table.update(extra)
        return table

    fe._get_convert_map = extended
    try:
        yield
    finally:
        fe._get_convert_map = stock


@dataclass
class KernelImport:
    """The Relax module of an export with its kernels, and its weights (``main``'s trailing parameters)."""

    mod: Any
    param_names: list[str]
    params: list[np.ndarray]
    num_inputs: int
    input_names: list[str]
    output_names: list[str]
    kernels: list[str] = field(default_factory=list)
    dense_fused: int = 0
    gemms_packed: int = 0


def fixed_boundaries(model: onnx.ModelProto, chunk_size: int) -> None:
    """Feed the DHSA nodes boundaries from one EdgeattnFixedBoundaries(k) node, in place.

    The exporter computes fixed chunks in the graph (Range, Min over shapes); TVM 0.27
    fuses those shape computations into a PrimFunc that FuseTIR cannot build.  The
    boundaries of fixed chunks of c over T keys are 0, c, 2c, ..., T: one small kernel.
    """
    first_k = None
    for node in model.graph.node:
        if node.domain == ops.DOMAIN and node.op_type == ops.OP_SELECT:
            first_k = node.input[1]
            break
    if first_k is None:
        return
    name = "edgeattn_fixed_boundaries"
    new = helper.make_node(OP_BOUNDARIES, [first_k], [name], name=name, chunk=int(chunk_size))
    at = next(i for i, n in enumerate(model.graph.node) if first_k in n.output)
    model.graph.node.insert(at + 1, new)
    for node in model.graph.node:
        if node.domain == ops.DOMAIN and node.op_type in (ops.OP_SELECT, ops.OP_SPARSE):
            node.input[2 if node.op_type == ops.OP_SELECT else 3] = name
    prune_dead_nodes(model)


def prepare_with_kernels(
    model: onnx.ModelProto, manifest: dict[str, Any], tile: Any
) -> tuple[onnx.ModelProto, int, int]:
    """The ONNX rewrites before import: batch 1, fixed DHSA boundaries, dense attention fused, GEMMs packed (CPU)."""
    model = constants_as_tensors(model)
    fix_batch(model)
    foreign = sorted(
        {f"{n.domain}.{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx", ops.DOMAIN)}
    )
    from edgeattn.export.quantize import TVM_NOT_YET, is_quantized_op

    if any(is_quantized_op(n) for n in model.graph.node):
        raise NotAnEdgeattnExport(TVM_NOT_YET.format(label=", ".join(foreign)))
    if foreign:
        raise NotAnEdgeattnExport(
            f"the export uses {foreign}, "
            "which TVM's frontend cannot import; compile an export with plain ONNX or edgeattn dense attention "
            "(edgeattn export without the GroupQueryAttention option)"
        )
    att = manifest.get("attention") or {}
    if any(n.domain == ops.DOMAIN and n.op_type.startswith("DHSA") for n in model.graph.node):  # not DenseFlash
        if att.get("chunking", "fixed") != "fixed" and att.get("kind") != "block-sparse" or not att.get("chunk_size"):
            raise NotAnEdgeattnExport(
                "the export's DHSA boundaries are not fixed chunks (manifest attention: "
                f"{att}); the compiled path supports fixed chunks (edgeattn export --chunking fixed)"
            )
        if any(i.name == "dhsa_boundaries" for i in model.graph.input):
            raise NotAnEdgeattnExport(
                "the export takes DHSA boundaries as an input (dhsa_boundaries); the compiled path computes "
                "fixed chunks itself: export with --chunking fixed"
            )
        fixed_boundaries(model, int(att["chunk_size"]))
    windows = {int(row["layer"]): row.get("window") for row in manifest.get("layers", [])}
    fused = fuse_dense_attention(model, windows)
    packed = pack_gemm_weights(model, tile.nb) if tile is not None else 0
    return model, fused, packed


def import_with_kernels(
    model: onnx.ModelProto,
    manifest: dict[str, Any],
    target: Any,
    *,
    pack: bool = True,
    decode: bool = False,
) -> KernelImport:
    """ONNX export -> Relax with every attention on the kernels_tvm kernels (see the section comment).

    ``decode``: import for one new token (sequence axis pinned to 1, the decode
    kernels); otherwise the sequence axis is dynamic.  ``pack``: packed-weight
    GEMMs (CPU targets only).  Weights stay out of the module: they are the
    trailing parameters of ``main`` and come back as numpy arrays.
    """
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from edgeattn.kernels_tvm import cpu_rules

    family = "cpu" if target.kind.name in ("llvm", "c") else target.kind.name
    tile = cpu_rules.gemm_tile(target) if (pack and family == "cpu") else None
    model, fused, packed = prepare_with_kernels(model, manifest, tile)
    if decode:
        for vi in list(model.graph.input) + list(model.graph.output):
            for dim in vi.type.tensor_type.shape.dim:
                if dim.dim_param == "sequence_length":
                    dim.Clear()
                    dim.dim_value = 1
    chunk = (manifest.get("attention") or {}).get("chunk_size")
    lowering = _Lowering(target, chunk, tile, decode=decode)
    with extended_convert_map(lowering.converters()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TVM renames inputs with dots
        mod = from_onnx(model, keep_params_in_input=True, sanitize_input_names=True)
    mod, params = relax.frontend.detach_params(mod)
    func = mod["main"]
    num_inputs = int(func.attrs["num_input"])
    names = [str(p.name) for p in func.params[num_inputs:]]
    arrays = [p.numpy() for p in params.get("main", [])]
    return KernelImport(
        mod=mod,
        param_names=names,
        params=arrays,
        num_inputs=num_inputs,
        input_names=[i.name for i in model.graph.input],
        output_names=[o.name for o in model.graph.output],
        kernels=lowering.kernels,
        dense_fused=fused,
        gemms_packed=packed,
    )
