"""INT4 ONNX rewrite: block DequantizeLinear with exactly the fake-quant weights, symmetric (both grids) and
asymmetric."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from tokcompile.export.int4 import IntWeight, _pack4, ort_session, write_int4_onnx
from tokcompile.quant.primitives import compute_qparams, dequantize, quantize


def _export(tmp_path, symmetric: bool, group: int | None, sym_grid: str = "narrow"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 16, bias=False)).eval()
    weights = {}
    for name, lin in (("0", model[0]), ("2", model[2])):
        w = lin.weight.detach()
        g = group if group and w.shape[1] % group == 0 else None
        scale, zero = compute_qparams(w, 4, symmetric, g, sym_grid)  # (O, G) each
        codes = quantize(w, scale, zero, 4, symmetric, g)
        with torch.no_grad():
            lin.weight.copy_(dequantize(codes, scale, zero, g))
        weights[name] = IntWeight(codes.numpy().astype(np.int8), scale.numpy(), zero.numpy().astype(np.int8),
                                  symmetric, g, lin.weight.detach().numpy().copy())
    x = torch.randn(3, 64)
    src = tmp_path / "m.onnx"
    torch.onnx.export(model, (x,), str(src), dynamo=True, external_data=True, input_names=["x"], output_names=["y"])
    return model, weights, x, src


@pytest.mark.parametrize("symmetric,group", [(True, 32), (False, 32), (True, None), (False, None)])
def test_int4_graph_equals_fake_quant(tmp_path, symmetric, group):
    model, weights, x, src = _export(tmp_path, symmetric, group)
    dst = tmp_path / "m.int4.onnx"
    stats = write_int4_onnx(src, dst, weights)
    assert stats["replaced"] == 2
    m = onnx.load(str(dst), load_external_data=False)
    dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 2 and all(o.version >= 21 for o in m.opset_import if o.domain in ("", "ai.onnx"))
    inits = {i.name: i for i in m.graph.initializer}
    q = inits[dq[0].input[0]]
    assert q.data_type == (onnx.TensorProto.INT4 if symmetric else onnx.TensorProto.UINT4)
    assert (len(dq[0].input) == 3) == (not symmetric)  # zero points only when asymmetric (TensorRT: symmetric)
    if group:
        assert {a.name: a.i for a in dq[0].attribute}["block_size"] == group
    with torch.no_grad():
        ref = model(x).numpy()
    for mode in ("unfused", "exact"):
        (y,) = ort_session(dst, mode).run(None, {"x": x.numpy()})
        np.testing.assert_allclose(y, ref, atol=1e-5, rtol=1e-5)
    assert dst.stat().st_size + (tmp_path / "m.int4.onnx.data").stat().st_size < src.stat().st_size + (
        tmp_path / "m.onnx.data"
    ).stat().st_size


def test_missing_weight_is_an_error(tmp_path):
    _, weights, _, src = _export(tmp_path, True, 32)
    weights["0"].weight = weights["0"].weight + 1  # no initializer holds this any more
    with pytest.raises(ValueError, match="not found"):
        write_int4_onnx(src, tmp_path / "x.onnx", weights)


def test_pack4_twos_complement() -> None:
    assert _pack4(np.array([-8, 7, -1, 0, 1, -7], np.int8)) == bytes([0x78, 0x0F, 0x91])  # low nibble first


@pytest.mark.parametrize("group", [32, None])
def test_int4_full_grid_round_trips(tmp_path, group):
    """Codes -8..7 of the full symmetric grid: each DequantizeLinear output equals the fake-quant weight."""
    model, weights, x, src = _export(tmp_path, True, group, sym_grid="full")
    assert any(int(w.codes.min()) == -8 for w in weights.values())  # the code the narrow grid never uses
    for w in weights.values():
        per_col = np.repeat(w.scale, w.weight.shape[1] // w.scale.shape[1], axis=1)  # (O, I)
        assert np.array_equal(w.weight, w.codes.astype(np.float32) * per_col)  # codes · scale, no zero point
    dst = tmp_path / "m.int4.onnx"
    assert write_int4_onnx(src, dst, weights)["replaced"] == 2
    m = onnx.load(str(dst), load_external_data=True)
    dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
    assert all(len(n.input) == 2 for n in dq)  # INT4 without zero point
    m.graph.output.extend(onnx.helper.make_tensor_value_info(n.output[0], onnx.TensorProto.FLOAT, None) for n in dq)
    probe = tmp_path / "probe.onnx"
    onnx.save(m, str(probe), save_as_external_data=True, location="probe.onnx.data")
    _, *dequantized = ort_session(probe, "unfused").run(None, {"x": x.numpy()})
    stored = {a.shape: a for w in weights.values() for a in (w.weight, w.weight.T)}  # Gemm (O, I), MatMul (I, O)
    assert len(dequantized) == 2
    for out in dequantized:
        np.testing.assert_array_equal(out, stored[out.shape])  # bitwise
    with torch.no_grad():
        ref = model(x).numpy()
    for mode in ("unfused", "exact"):
        (y,) = ort_session(dst, mode).run(None, {"x": x.numpy()})
        np.testing.assert_allclose(y, ref, atol=1e-5, rtol=1e-5)
