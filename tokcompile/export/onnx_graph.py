"""Reading an ONNX graph without its weights: build-time constants, producers, element types and static shapes.

Used by the ONNX exporter (the TopK constants in the manifest) and by the TensorRT check. Every function takes
an `onnx.ModelProto` or `GraphProto` loaded with `load_external_data=False`; `read_constant` reads one tensor's
external data alone when it needs values.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

STANDARD_DOMAINS = ("", "ai.onnx")
# Ops through which a TopK's K may be computed from tensor shapes (what TensorRT takes as a shape tensor).
SHAPE_OPS = frozenset({"Shape", "Size", "Gather", "Slice", "Concat", "Squeeze", "Unsqueeze", "Reshape", "Cast",
                       "Identity", "Add", "Sub", "Mul", "Div", "Min", "Max", "Neg", "Abs", "ReduceMin", "ReduceMax"})


def type_name(elem_type: int) -> str:
    from onnx import TensorProto

    try:
        return TensorProto.DataType.Name(elem_type)
    except ValueError:
        return f"type {elem_type}"


def constants(graph: Any) -> dict[str, Any]:
    """Tensors known at build time: initializers and Constant outputs, by name (onnx TensorProto)."""
    from onnx import TensorProto, helper

    consts: dict[str, Any] = {i.name: i for i in graph.initializer}
    for n in graph.node:
        if n.op_type != "Constant" or n.domain not in STANDARD_DOMAINS:
            continue
        for a in n.attribute:
            if a.name == "value":
                consts[n.output[0]] = a.t
            elif a.name == "value_int":
                consts[n.output[0]] = helper.make_tensor(n.output[0], TensorProto.INT64, [], [a.i])
            elif a.name == "value_ints":
                consts[n.output[0]] = helper.make_tensor(n.output[0], TensorProto.INT64, [len(a.ints)], a.ints)
    return consts


def topk_constants(model: Any) -> list[int | None]:
    """The K of every TopK node of the main graph when it is a constant, else None (TensorRT: K <= 3840)."""
    from onnx import numpy_helper

    consts = constants(model.graph)
    ks: list[int | None] = []
    for n in model.graph.node:
        if n.op_type == "TopK":
            t = consts.get(n.input[1]) if len(n.input) > 1 else None
            ks.append(int(numpy_helper.to_array(t).reshape(-1)[0]) if t is not None else None)
    return ks


def subgraphs(model: Any) -> Iterator[Any]:
    """The main graph, every subgraph (If/Loop/Scan bodies), and the local functions' bodies."""
    from onnx import AttributeProto

    todo = [model.graph]
    while todo:
        g = todo.pop()
        yield g
        for n in g.node:
            for a in n.attribute:
                if a.type == AttributeProto.GRAPH:
                    todo.append(a.g)
                elif a.type == AttributeProto.GRAPHS:
                    todo.extend(a.graphs)
    yield from model.functions  # FunctionProto: .node like a graph, no initializers


def read_constant(tensor: Any, base_dir: Path | None) -> Any:
    """A constant's values as numpy, reading its external data alone if it has some."""
    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    if uses_external_data(tensor):
        if base_dir is None:
            raise ValueError("its values are in external data and no model path was given")
        copy = onnx.TensorProto()
        copy.CopyFrom(tensor)
        load_external_data_for_tensor(copy, str(base_dir))
        tensor = copy
    return numpy_helper.to_array(tensor)


class GraphView:
    """Every node of a model (main graph, subgraphs, local functions), its constants, producers, element types and
    static shapes (`None` for a dynamic axis), by tensor name."""

    def __init__(self, model: Any, base_dir: Path | None):
        self.model, self.base_dir = model, base_dir
        self.functions = {(f.domain, f.name) for f in model.functions}
        graphs = list(subgraphs(model))
        self.nodes = [n for g in graphs for n in g.node]
        self.consts: dict[str, Any] = {}
        self.types: dict[str, int] = {}
        self.shapes: dict[str, list[int | None]] = {}  # static lengths; None for a dynamic axis
        self.producer = {o: n for n in self.nodes for o in n.output}
        self._shape_memo: dict[str, bool] = {}
        for g in graphs:
            if hasattr(g, "initializer"):
                self.consts.update(constants(g))
                for v in (*g.input, *g.output, *g.value_info):
                    if v.type.HasField("tensor_type"):
                        self.types[v.name] = v.type.tensor_type.elem_type
                        if v.type.tensor_type.HasField("shape"):
                            self.shapes[v.name] = [d.dim_value if d.HasField("dim_value") else None
                                                   for d in v.type.tensor_type.shape.dim]
        self.types.update({name: t.data_type for name, t in self.consts.items()})
        self.shapes.update({name: list(t.dims) for name, t in self.consts.items()})

    def shape_computed(self, name: str, depth: int = 0) -> bool:
        """Whether `name` is computed from constants and tensor shapes only (a TensorRT shape tensor), not from
        data values or graph inputs."""
        if name in self.consts:
            return True
        if name not in self._shape_memo:
            n = self.producer.get(name)
            self._shape_memo[name] = False  # also ends a cycle in a malformed graph
            self._shape_memo[name] = n is not None and depth <= 64 and n.op_type in SHAPE_OPS and (
                n.op_type in ("Shape", "Size") or all(self.shape_computed(i, depth + 1) for i in n.input if i))
        return self._shape_memo[name]

    def name(self, n: Any) -> str:
        return n.name or f"{n.op_type}->{n.output[0] if n.output else '?'}"
