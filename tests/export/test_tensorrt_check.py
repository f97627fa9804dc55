"""The static TensorRT check: one small ONNX graph per rule, each problem reported exactly; compatible graphs
pass, real INT4 graphs are judged by their grid, and the demo's exported graphs are recorded compatible."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tokcompile.export.tensorrt_check import check_onnx

F, I64 = TensorProto.FLOAT, TensorProto.INT64


def _model(nodes, inputs, outputs, inits=(), opset=21):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)  # every graph here is valid ONNX
    return model


def _out(name, dtype=F):
    return helper.make_tensor_value_info(name, dtype, ["d0", "d1"])


def _x(shape=("batch", 8)):
    return helper.make_tensor_value_info("x", F, list(shape))


def _topk(k_input: str, inits=(), extra_inputs=(), shape=("batch", 8)):
    node = helper.make_node("TopK", ["x", k_input], ["v", "i"], name="top")
    outs = [_out("v", F), _out("i", I64)]
    return _model([node], [_x(shape), *extra_inputs], outs, inits)


def _k(value: int):
    return numpy_helper.from_array(np.array([value], np.int64), "k")


def _problems(model) -> list[str]:
    result = check_onnx(model)
    assert result["tensorrt_version"] == "10.15" and result["compatible"] == (not result["problems"])
    return result["problems"]


def test_compatible_graph_passes():
    w = numpy_helper.from_array(np.ones((8, 4), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Relu", ["h"], ["y"], name="relu")]
    model = _model(nodes, [_x()], [helper.make_tensor_value_info("y", F, ["batch", 4])], [w])
    assert check_onnx(model) == {"tensorrt_version": "10.15", "compatible": True, "problems": [], "ops_checked": 2}
    assert _problems(_topk("k", [_k(4)])) == []


def test_unsupported_ops_reported_once_with_a_count():
    nodes = [helper.make_node("Unique", ["x"], [f"u{i}"], name=f"unique{i}") for i in range(3)]
    outs = [_out(f"u{i}", F) for i in range(3)]
    assert _problems(_model(nodes, [_x()], outs)) == [
        "op Unique (node unique0) is not supported by the TensorRT 10.15 ONNX parser (and 2 more like it)"]
    custom = helper.make_node("FusedGelu", ["x"], ["y"], name="fg", domain="com.microsoft")
    model = helper.make_model(helper.make_graph([custom], "g", [_x()], [_out("y", F)]),
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    assert _problems(model) == ["op com.microsoft::FusedGelu (node fg) is not a standard ONNX op; TensorRT's parser "
                                "needs a plugin for it"]


def test_topk_k_from_an_input_is_reported():
    k_in = helper.make_tensor_value_info("k", I64, [1])
    assert _problems(_topk("k", extra_inputs=[k_in])) == [
        "TopK top: K comes from 'k', which is neither a constant nor computed from tensor shapes; TensorRT needs K "
        "as an initializer (a Python int k in torch.topk)"]


def test_topk_k_over_3840_is_reported():
    assert _problems(_topk("k", [_k(4000)], shape=("batch", 5000))) == [
        "TopK top: K = 4000 exceeds TensorRT's limit of 3840; keep at most 3840 tokens per top-k step"]
    assert _problems(_topk("k", [_k(3840)], shape=("batch", 5000))) == []


def _sort_like(length):
    """torch.sort's export: TopK with K = the sorted axis' length, computed from Shape."""
    idx = numpy_helper.from_array(np.array([1], np.int64), "one")
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Gather", ["s", "one"], ["k"], name="gather", axis=0),
             helper.make_node("TopK", ["x", "k"], ["v", "i"], name="sort", largest=0)]
    outs = [_out("v", F), _out("i", I64)]
    return _model(nodes, [_x(("batch", length))], outs, [idx])


def test_topk_k_from_shapes_needs_a_static_bounded_axis():
    assert _problems(_sort_like(32)) == []
    assert _problems(_sort_like("n")) == [
        "TopK sort: K is computed from shapes and its axis has a dynamic length, so K <= 3840 (TensorRT's limit) is "
        "not guaranteed; use a constant k"]


def _dequantize(dtype, codes, zero=None, block=2):
    q = helper.make_tensor("q", dtype, [4, 2], codes.reshape(-1).tolist())
    scale = numpy_helper.from_array(np.full((2, 2), 0.5, np.float32), "s")
    inits, inputs = [q, scale], ["q", "s"]
    if zero is not None:
        inits.append(helper.make_tensor("zp", dtype, [2, 2], zero.reshape(-1).tolist()))
        inputs.append("zp")
    nodes = [helper.make_node("DequantizeLinear", inputs, ["w"], name="dq", axis=0, block_size=block),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    return _model(nodes, [_x(("batch", 4))], [helper.make_tensor_value_info("y", F, ["batch", 2])], inits)


def test_asymmetric_uint4_dequantize_is_reported():
    codes = np.arange(8).reshape(4, 2)
    assert _problems(_dequantize(TensorProto.UINT4, codes, zero=np.full((2, 2), 8))) == [
        "DequantizeLinear dq: UINT4 input (TensorRT dequantizes INT8, INT4, FP8 and FP4 only) and a non-zero zero "
        "point 'zp' (TensorRT quantization is symmetric); export symmetric weights (quant.weight.symmetric: true "
        "gives INT4 without zero points)"]


def test_symmetric_int4_dequantize_passes():
    codes = np.arange(-4, 4).reshape(4, 2)
    assert _problems(_dequantize(TensorProto.INT4, codes)) == []
    assert _problems(_dequantize(TensorProto.INT4, codes, zero=np.zeros((2, 2), np.int64))) == []  # all-zero point
    assert _problems(_dequantize(TensorProto.INT4, codes, zero=np.ones((2, 2), np.int64))) == [
        "DequantizeLinear dq: a non-zero zero point 'zp' (TensorRT quantization is symmetric); export symmetric "
        "weights (quant.weight.symmetric: true gives INT4 without zero points)"]


def test_float64_initializer_is_reported():
    w = numpy_helper.from_array(np.ones((8, 4), np.float64), "w64")
    nodes = [helper.make_node("Cast", ["x"], ["xd"], name="cast", to=TensorProto.DOUBLE),
             helper.make_node("MatMul", ["xd", "w64"], ["y"], name="mm")]
    model = _model(nodes, [_x()], [helper.make_tensor_value_info("y", TensorProto.DOUBLE, ["batch", 4])], [w])
    assert _problems(model) == [
        "initializer or constant 'w64' is DOUBLE; TensorRT only casts DOUBLE down to FLOAT (clamping to +-FLT_MAX); "
        "export float32",
        "Cast cast casts to DOUBLE; TensorRT only casts DOUBLE down to FLOAT (clamping to +-FLT_MAX); export float32",
        "graph output 'y' is DOUBLE; TensorRT only casts DOUBLE down to FLOAT (clamping to +-FLT_MAX); export float32"]


def test_unnamed_dynamic_dimension_is_reported():
    x = helper.make_tensor_value_info("x", F, ["batch", None])  # no dim_value, no dim_param
    model = _model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [x],
                   [_out("y", F)])
    assert _problems(model) == ["graph input 'x': dimension 1 is dynamic without a name; a TensorRT optimization "
                                "profile needs a named symbolic dimension to bound it"]


def test_external_zero_point_without_a_path_is_a_problem_not_an_exception(tmp_path):
    model = _dequantize(TensorProto.INT8, np.arange(8).reshape(4, 2), zero=np.zeros((2, 2), np.int64))
    zp = next(t for t in model.graph.initializer if t.name == "zp")
    zp.CopyFrom(numpy_helper.from_array(np.zeros((2, 2), np.int8), "zp"))  # raw bytes: stored externally below
    onnx.save(model, str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    assert _problems(tmp_path / "m.onnx") == []  # from the path: the zero point is read from m.onnx.data alone
    (line,) = _problems(onnx.load(str(tmp_path / "m.onnx"), load_external_data=False))
    assert line.startswith("DequantizeLinear dq: a zero point 'zp' that could not be read")


@pytest.mark.parametrize("symmetric", [True, False])
def test_real_int4_graphs(tmp_path, symmetric):
    from tests.export.test_int4 import _export
    from tokcompile.export.int4 import write_int4_onnx

    _, weights, _, src = _export(tmp_path, symmetric, 32)
    write_int4_onnx(src, tmp_path / "m.int4.onnx", weights)
    result = check_onnx(tmp_path / "m.int4.onnx")
    if symmetric:
        assert result["compatible"], result
    else:
        (line,) = result["problems"]
        assert line.startswith("DequantizeLinear dq_") and "UINT4 input" in line and "non-zero zero point" in line
        assert line.endswith("(and 1 more like it)")  # both Linear layers


def test_demo_export_graphs_are_tensorrt_compatible(demo_export):
    m = json.loads((demo_export / "manifest.json").read_text())
    for graph in ("vision", "prefill", "decode"):
        trt = m["graphs"][graph]["artifacts"]["onnx"]["tensorrt"]
        assert trt["compatible"] is True and trt["problems"] == [] and trt["ops_checked"] > 50, (graph, trt)
