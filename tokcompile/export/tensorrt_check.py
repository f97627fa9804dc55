"""Static TensorRT compatibility check of one ONNX graph: what TensorRT's ONNX parser would refuse, found
without TensorRT, so every compile records it (manifest: `graphs.<name>.artifacts.onnx.tensorrt`).

Rules, each from TensorRT's documentation (`tensorrt_ops` holds the data and its source):
- every operator is in the parser's supported list (standard domain; local functions are checked through their
  bodies, subgraphs of If/Loop/Scan too) and the default-domain opset is in the parser's range;
- every TopK has sorted=1 and a K <= 3840: a constant, or (TensorRT >= 8.6) a K computed from shapes over a
  static axis of at most 3840 (torch.sort exports so); inputs the parser needs as constants (CumSum's axis, the
  reductions' axes) are initializers or Constant outputs;
- DequantizeLinear is symmetric: INT8/INT4/FP8/FP4 input, zero point absent or all zero, constant scale, blocks
  on the last or second-to-last axis;
- initializers, constants, Cast targets and graph inputs/outputs have element types TensorRT has;
- every dynamic dimension of a graph input is a named symbolic dimension, which an optimization profile bounds.

Only the graph is read (`load_external_data=False`); a zero point stored as external data is read alone. A
valid model never makes `check_onnx` raise: a rule that fails is reported as a problem.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokcompile.export import tensorrt_ops as trt_ops
from tokcompile.export.onnx_graph import STANDARD_DOMAINS, GraphView, read_constant, type_name


class _Problems:
    """One-line problems; repeats of one kind collapse into the first, with a count."""

    def __init__(self) -> None:
        self.first: dict[Any, list] = {}

    def add(self, kind: Any, line: str) -> None:
        self.first.setdefault(kind, [line, 0])[1] += 1

    def lines(self) -> list[str]:
        return [line + (f" (and {n - 1} more like it)" if n > 1 else "") for line, n in self.first.values()]


def _check_opset(g: GraphView, out: _Problems) -> None:
    lo, hi = trt_ops.OPSET_RANGE
    for o in g.model.opset_import:
        if o.domain in STANDARD_DOMAINS and not lo <= o.version <= hi:
            out.add("opset", f"opset {o.version} is outside the {lo}..{hi} that TensorRT "
                             f"{trt_ops.SOURCE['tensorrt_version']} imports; export with export.opset in that range")


def _check_ops(g: GraphView, out: _Problems) -> None:
    version = trt_ops.SOURCE["tensorrt_version"]
    for n in g.nodes:
        if (n.domain, n.op_type) in g.functions:
            continue  # a local function: its body's nodes are checked
        if n.domain not in STANDARD_DOMAINS:
            out.add(("op", n.domain, n.op_type), f"op {n.domain}::{n.op_type} (node {g.name(n)}) is not a standard "
                                                 "ONNX op; TensorRT's parser needs a plugin for it")
        elif n.op_type in trt_ops.UNSUPPORTED:
            out.add(("op", n.op_type), f"op {n.op_type} (node {g.name(n)}) is not supported by the TensorRT "
                                       f"{version} ONNX parser")
        elif n.op_type not in trt_ops.SUPPORTED:
            out.add(("op", n.op_type), f"op {n.op_type} (node {g.name(n)}) is not in the TensorRT {version} ONNX "
                                       "parser's supported-operator list")


def _check_topk(g: GraphView, out: _Problems) -> None:
    limit = trt_ops.TOPK_MAX_K
    for n in g.nodes:
        if n.op_type != "TopK" or n.domain not in STANDARD_DOMAINS:
            continue
        attrs = {a.name: a.i for a in n.attribute}
        if attrs.get("sorted", 1) != 1:
            out.add("topk_sorted", f"TopK {g.name(n)} has sorted=0; TensorRT's TopK needs sorted=1")
        k_name = n.input[1] if len(n.input) > 1 else ""
        if k_name in g.consts:
            k = int(read_constant(g.consts[k_name], g.base_dir).reshape(-1)[0])
            if k > limit:
                out.add("topk_k_limit", f"TopK {g.name(n)}: K = {k} exceeds TensorRT's limit of {limit}; keep at "
                                        f"most {limit} tokens per top-k step")
            continue
        # TensorRT >= 8.6 takes a K computed from shapes (torch.sort exports so: K = the axis length); K <= the
        # axis length, so a static axis of at most `limit` bounds it.
        shape = g.shapes.get(n.input[0])
        axis = next((a.i for a in n.attribute if a.name == "axis"), -1)
        length = shape[axis] if shape and -len(shape) <= axis < len(shape) else None
        if not g.shape_computed(k_name):
            out.add("topk_k_dynamic", f"TopK {g.name(n)}: K comes from '{k_name}', which is neither a constant nor "
                                      "computed from tensor shapes; TensorRT needs K as an initializer (a Python "
                                      "int k in torch.topk)")
        elif length is None or length > limit:
            got = "a dynamic length" if length is None else f"length {length}"
            out.add("topk_k_unbounded", f"TopK {g.name(n)}: K is computed from shapes and its axis has {got}, so "
                                        f"K <= {limit} (TensorRT's limit) is not guaranteed; use a constant k")


def _check_const_inputs(g: GraphView, out: _Problems) -> None:
    for n in g.nodes:
        for i in trt_ops.CONST_INPUTS.get(n.op_type, ()) if n.domain in STANDARD_DOMAINS else ():
            if len(n.input) > i and n.input[i] and n.input[i] not in g.consts:
                out.add(("const", n.op_type, i), f"{n.op_type} {g.name(n)}: input {i} ('{n.input[i]}') is not a "
                                                 "constant; TensorRT needs it as an initializer")


def _check_dequantize(g: GraphView, out: _Problems) -> None:
    for n in g.nodes:
        if n.op_type != "DequantizeLinear" or n.domain not in STANDARD_DOMAINS:
            continue
        reasons: dict[str, str] = {}  # kind -> text
        x = n.input[0]
        x_type = type_name(g.types[x]) if x in g.types else None
        if x_type is not None and x_type not in trt_ops.DEQUANTIZE_TYPES:
            reasons["type"] = f"{x_type} input (TensorRT dequantizes INT8, INT4, FP8 and FP4 only)"
        zp = n.input[2] if len(n.input) > 2 else ""
        if zp and zp not in g.consts:
            reasons["zero_point"] = f"a zero point '{zp}' that is not a constant"
        elif zp:
            try:
                if (read_constant(g.consts[zp], g.base_dir).astype("int64") != 0).any():
                    reasons["zero_point"] = f"a non-zero zero point '{zp}' (TensorRT quantization is symmetric)"
            except Exception as e:  # unreadable external data: report, do not raise
                reasons["zero_point"] = f"a zero point '{zp}' that could not be read ({e})"
        if len(n.input) > 1 and n.input[1] not in g.consts:
            reasons["scale"] = f"a scale '{n.input[1]}' that is not a constant"
        attrs = {a.name: a.i for a in n.attribute}
        if attrs.get("block_size", 0) > 0 and x in g.consts:
            rank = len(g.consts[x].dims)
            axis = attrs.get("axis", 1) % max(rank, 1)
            if axis < rank - 2:
                reasons["block_axis"] = (f"blocks along axis {axis} of a rank-{rank} input (TensorRT blocks the last "
                                         "or second-to-last axis)")
        if reasons:
            asym = x_type == "UINT4" or "non-zero" in reasons.get("zero_point", "")
            fix = ("export symmetric weights (quant.weight.symmetric: true gives INT4 without zero points)" if asym
                   else "TensorRT cannot import it")
            out.add(("dq", *reasons), f"DequantizeLinear {g.name(n)}: {' and '.join(reasons.values())}; {fix}")


def _check_types(g: GraphView, out: _Problems) -> None:
    def fix(t: str) -> str:
        if t == "DOUBLE":
            return "TensorRT only casts DOUBLE down to FLOAT (clamping to +-FLT_MAX); export float32"
        return "TensorRT has no such type"

    dq_fed = {i for n in g.nodes if n.op_type == "DequantizeLinear" for i in list(n.input)[:1] + list(n.input)[2:3]}
    for name, t in g.consts.items():
        tn = type_name(t.data_type)
        if name in dq_fed:
            continue  # checked with its DequantizeLinear
        if tn not in trt_ops.DATA_TYPES:
            out.add(("const_type", tn), f"initializer or constant '{name}' is {tn}; {fix(tn)}")
        elif tn in trt_ops.QUANTIZED_TYPES:
            out.add(("const_quant", tn), f"initializer or constant '{name}' is {tn}, a quantized type TensorRT "
                                         "reads only through DequantizeLinear")
    for n in g.nodes:
        if n.op_type == "Cast" and n.domain in STANDARD_DOMAINS:
            to = type_name(next((a.i for a in n.attribute if a.name == "to"), 1))
            if to not in trt_ops.DATA_TYPES | trt_ops.IO_ONLY_TYPES:
                out.add(("cast", to), f"Cast {g.name(n)} casts to {to}; {fix(to)}")
    io = [("input", v) for v in g.model.graph.input] + [("output", v) for v in g.model.graph.output]
    for kind, v in io:
        if v.type.HasField("tensor_type") and v.name not in g.consts:
            tn = type_name(v.type.tensor_type.elem_type)
            if tn not in trt_ops.DATA_TYPES | trt_ops.IO_ONLY_TYPES:
                out.add(("io_type", tn), f"graph {kind} '{v.name}' is {tn}; {fix(tn)}")


def _check_dims(g: GraphView, out: _Problems) -> None:
    for v in g.model.graph.input:
        if v.name in g.consts:
            continue  # an initializer listed as an input (older exporters)
        if not v.type.HasField("tensor_type"):
            out.add("not_tensor", f"graph input '{v.name}' is not a tensor; TensorRT takes tensor inputs only")
            continue
        if not v.type.tensor_type.HasField("shape"):
            out.add("no_shape", f"graph input '{v.name}' has no shape (unknown rank); TensorRT needs the rank and a "
                                "named symbolic dimension for each dynamic axis")
            continue
        for axis, d in enumerate(v.type.tensor_type.shape.dim):
            if not d.HasField("dim_value") and not d.dim_param.strip():
                out.add("unnamed_dim", f"graph input '{v.name}': dimension {axis} is dynamic without a name; a "
                                       "TensorRT optimization profile needs a named symbolic dimension to bound it")


RULES: tuple[tuple[str, Callable[[GraphView, _Problems], None]], ...] = (
    ("opset", _check_opset), ("operator", _check_ops), ("TopK", _check_topk), ("constant-input", _check_const_inputs),
    ("DequantizeLinear", _check_dequantize), ("data-type", _check_types), ("dynamic-dimension", _check_dims),
)


def check_onnx(model_or_path: Any) -> dict[str, Any]:
    """Check one ONNX graph (a ModelProto or a path) against TensorRT's ONNX parser.

    Returns `{"tensorrt_version", "compatible", "problems": [one line each], "ops_checked"}`.
    """
    import onnx

    if isinstance(model_or_path, (str, Path)):
        model = onnx.load(str(model_or_path), load_external_data=False)
        base_dir: Path | None = Path(model_or_path).parent
    else:
        model, base_dir = model_or_path, None
    out = _Problems()
    g = GraphView(model, base_dir)
    for what, rule in RULES:
        try:
            rule(g, out)
        except Exception as e:  # a rule must not stop the compile; what it could not decide is a problem
            out.add(("rule", what), f"the {what} check could not run ({type(e).__name__}: {e}); the graph is not "
                                    "known to be TensorRT-compatible")
    problems = out.lines()
    return {"tensorrt_version": trt_ops.SOURCE["tensorrt_version"], "compatible": not problems,
            "problems": problems, "ops_checked": len(g.nodes)}
