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

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

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
