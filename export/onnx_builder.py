"""A small node builder shared by the graph writer and the custom-op function bodies.

Writing ONNX by hand with ``onnx.helper`` is verbose; this keeps every node's
name unique and turns one line of Python into one node, so the op bodies in
:mod:`edgeattn.export.ops` read like the PyTorch reference they mirror.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

# Opset of the default domain for the exported graph and the function bodies.
OPSET = 18

INT64 = TensorProto.INT64
INT32 = TensorProto.INT32
FLOAT = TensorProto.FLOAT
BOOL = TensorProto.BOOL


class NodeBuilder:
    """Collects nodes (and, for graphs, initializers) under unique names."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0
        self._consts: dict[tuple, str] = {}

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}{hint}_{self._count}"

    def op(
        self,
        op_type: str,
        *inputs: str,
        outputs: int | Sequence[str] = 1,
        domain: str = "",
        hint: str | None = None,
        **attrs: Any,
    ) -> Any:
        """Append one node; return its output name (or the list of names when it has several)."""
        if isinstance(outputs, int):
            outs = [self.fresh(hint or op_type.lower()) for _ in range(outputs)]
        else:
            outs = list(outputs)
        node = helper.make_node(
            op_type,
            list(inputs),
            outs,
            name=self.fresh(f"{op_type}"),
            domain=domain,
            **{k: v for k, v in attrs.items() if v is not None},
        )
        self.nodes.append(node)
        return outs[0] if len(outs) == 1 else outs

    def const(self, value: Any, dtype: Any = None, hint: str = "const") -> str:
        """A Constant node (function bodies cannot hold initializers); identical constants are shared."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key in self._consts:
            return self._consts[key]
        name = self.fresh(hint)
        self.nodes.append(
            helper.make_node(
                "Constant", [], [name], name=self.fresh("Constant"), value=numpy_helper.from_array(arr, name)
            )
        )
        self._consts[key] = name
        return name

    def i64(self, *values: int) -> str:
        """A 1-D int64 constant (axes, shapes, slice bounds)."""
        return self.const(list(values), np.int64, hint="i64")

    def scalar_i64(self, value: int) -> str:
        return self.const(value, np.int64, hint="s64")

    def attr_const(self, attr: str, kind: str) -> str:
        """A scalar holding the value of the enclosing function's attribute ``attr`` (kind int|float)."""
        field, atype = {"int": ("value_int", AttributeProto.INT), "float": ("value_float", AttributeProto.FLOAT)}[kind]
        name = self.fresh(attr)
        node = helper.make_node("Constant", [], [name], name=self.fresh("Constant"))
        node.attribute.append(helper.make_attribute_ref(field, atype))
        node.attribute[-1].ref_attr_name = attr
        self.nodes.append(node)
        return name

    def initializer(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    # ---- a few composite helpers used by both the graph and the functions

    def dim(self, shape: str, axis: int) -> str:
        """Scalar int64: dimension ``axis`` of a Shape output.

        TVM's importer keeps this a symbolic shape value (good for pinning shapes with
        Reshape); use :meth:`dim_tensor` where it meets ordinary tensors.
        """
        return self.op("Gather", shape, self.scalar_i64(axis), axis=0)

    def dim_tensor(self, shape: str, axis: int) -> str:
        """Scalar int64 tensor of dimension ``axis``: TVM's importer turns the Reshape into a real tensor."""
        return self.as_tensor(self.op("Slice", shape, self.i64(axis), self.i64(axis + 1)))

    def shape_slice(self, shape: str, start: int, end: int) -> str:
        """``shape[start:end]`` as an int64 tensor (TVM's importer: a tensor, not a shape value)."""
        return self.op("Reshape", self.op("Slice", shape, self.i64(start), self.i64(end)), self.i64(end - start))

    def as_tensor(self, value: str) -> str:
        """A no-op in ONNX; makes TVM's importer materialise a shape value as a scalar tensor."""
        return self.op("Reshape", value, self.const([], np.int64, hint="scalar_shape"))

    def unsqueeze(self, x: str, *axes: int) -> str:
        return self.op("Unsqueeze", x, self.i64(*axes))

    def squeeze(self, x: str, *axes: int) -> str:
        return self.op("Squeeze", x, self.i64(*axes))
