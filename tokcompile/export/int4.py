"""INT4 weights in ONNX: the fake-quant graph rewritten so each quantized weight is stored as 4-bit integers
plus scales, and dequantized in the graph by `DequantizeLinear` (block quantization, opset 21).

The dynamo exporter stores a Linear's weight as a MatMul initializer `Ŵᵀ (I, O)` (or `Ŵ` for a Gemm with
transB). Each initializer equal to a quantized weight is replaced by
`DequantizeLinear(codes (I, O) int4|uint4, scale (I/g, O), zero (I/g, O), axis=0, block_size=g)` (per-channel:
`scale (O,)`, `axis=1`), whose output keeps the initializer's name, so no consumer changes. The
dequantized values equal the fake-quant weights exactly: `(codes - zero) · scale` in fp32.

Symmetric weights use INT4 without a zero point, which is what TensorRT's dequantize layer accepts;
asymmetric weights use UINT4 with zero points. onnxruntime fuses DequantizeLinear + MatMul into
MatMulNBits; at its default accuracy level that kernel computes in int8 and drifts, so parity runs with
`session.qdq_matmulnbits_accuracy_level = 0` and with graph optimisations off.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MIN_OPSET = 21


@dataclass
class IntWeight:
    """One quantized Linear weight in the project's grid (see quant/primitives.py).

    Args:
        codes: (O, I) integers; symmetric in [-2^(b-1), 2^(b-1)-1] (both `sym_grid`s: "full" uses every code,
            -8..7 at 4 bits; "narrow" RTN stays in -7..7), asymmetric in [0, 2^b-1].
        scale: (O, G) float32.
        zero: (O, G) integers (0 when symmetric).
        symmetric: grid kind.
        group_size: columns per group, or None for per-channel.
        weight: (O, I) float32 dequantized weight (what the fake-quant graph holds).
    """

    codes: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    symmetric: bool
    group_size: int | None
    weight: np.ndarray


def _key(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a, dtype=np.float32)
    return hashlib.sha1(a.tobytes()).hexdigest() + str(a.shape)


def _pack4(values: np.ndarray) -> bytes:
    """Pack 4-bit values (two's complement for INT4: -8 → 0b1000, -1 → 0b1111) two per byte, the first in
    the low nibble."""
    v = (values.astype(np.int16).reshape(-1) & 0x0F).astype(np.uint8)
    if v.size % 2:
        v = np.concatenate([v, np.zeros(1, np.uint8)])
    return (v[0::2] | (v[1::2] << 4)).tobytes()


def _int4_tensor(name: str, values: np.ndarray, signed: bool) -> Any:
    from onnx import TensorProto, helper

    dtype = TensorProto.INT4 if signed else TensorProto.UINT4
    return helper.make_tensor(name, dtype, list(values.shape), _pack4(values), raw=True)


def write_int4_onnx(src: Path, dst: Path, weights: dict[str, IntWeight]) -> dict[str, Any]:
    """Rewrite the ONNX graph at `src` into `dst` (external data `dst.name + ".data"`). Returns statistics."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src), load_external_data=True)
    by_value: dict[str, tuple[str, bool]] = {}
    for fqn, w in weights.items():
        by_value[_key(w.weight.T)] = (fqn, True)  # MatMul: Ŵᵀ (I, O)
        by_value[_key(w.weight)] = (fqn, False)  # Gemm transB: Ŵ (O, I)
    keep, new_nodes, replaced = [], [], {}
    for init in model.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or len(init.dims) != 2:
            keep.append(init)
            continue
        hit = by_value.get(_key(numpy_helper.to_array(init)))
        if hit is None or hit[0] in replaced.values():
            keep.append(init)
            continue
        fqn, transposed = hit
        w = weights[fqn]
        codes, scale, zero = (w.codes.T, w.scale.T, w.zero.T) if transposed else (w.codes, w.scale, w.zero)
        axis_in = 0 if transposed else 1  # the input-feature axis of the stored tensor
        q = _int4_tensor(f"{init.name}_q4", codes, w.symmetric)
        inputs = [q.name, f"{init.name}_scale"]
        tensors = [q]
        attrs: dict[str, Any] = {}
        if w.group_size:
            tensors.append(numpy_helper.from_array(np.ascontiguousarray(scale, np.float32), inputs[1]))
            attrs = {"axis": axis_in, "block_size": int(w.group_size)}
            zp = zero
        else:
            tensors.append(numpy_helper.from_array(np.ascontiguousarray(scale.reshape(-1), np.float32), inputs[1]))
            attrs = {"axis": 1 - axis_in}  # one scale per output feature
            zp = zero.reshape(-1)
        if not w.symmetric:
            tensors.append(_int4_tensor(f"{init.name}_zp4", zp, signed=False))
            inputs.append(tensors[-1].name)
        keep.extend(tensors)
        new_nodes.append(helper.make_node("DequantizeLinear", inputs, [init.name], name=f"dq_{init.name}", **attrs))
        replaced[init.name] = fqn
    missing = sorted(set(weights) - set(replaced.values()))
    if missing:
        raise ValueError(f"{len(missing)} quantized weights were not found in {src.name} (first: {missing[0]})")
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes + nodes)
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx") and op.version < MIN_OPSET:
            op.version = MIN_OPSET
    data = dst.with_name(dst.name + ".data")
    for p in (dst, data):
        if p.exists():
            p.unlink()  # onnx.save appends to an existing external-data file
    onnx.save(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
              size_threshold=1024)
    return {"replaced": len(replaced), "opset": max(MIN_OPSET, min(o.version for o in model.opset_import))}


# What parity validates and the runtime's "onnxruntime-int4" backend runs: MatMulNBits computing in fp32.
EXACT_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "0"}


def _load(files: list[str], input_names: list[str]) -> Any:
    """The loader of an INT4 graph: onnxruntime with `EXACT_CONFIG`."""
    from tokcompile.export import onnx as onnx_target

    return onnx_target._load(files, input_names, EXACT_CONFIG)


def int4_artifact(graph: str, files: list[str], input_names: list[str], meta: dict[str, Any]) -> Any:
    """The INT4 graph as an artifact of target "onnx_int4" (runtime backend "onnxruntime-int4")."""
    from tokcompile.export.base import Artifact

    return Artifact(target="onnx_int4", graph=graph, files=files, backend="onnxruntime-int4", meta=meta,
                    loader=_load(files, input_names))


def ort_session(path: Path, mode: str) -> Any:
    """mode: "default" (MatMulNBits fusion at onnxruntime's default accuracy), "exact" (fusion with
    accuracy level 0, fp32 compute) or "unfused" (graph optimisations off: DequantizeLinear + MatMul)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if mode == "exact":
        for key, value in EXACT_CONFIG.items():
            opts.add_session_config_entry(key, value)
    elif mode == "unfused":
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
