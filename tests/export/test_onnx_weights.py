"""One copy of the weights for all ONNX graphs of an export: the pool, and the demo export's bytes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from tokcompile.export.onnx_weights import PAGE_ALIGN, WEIGHTS_FILE, WeightPool, session_options, stored_bytes

ROOT = Path(__file__).resolve().parents[2]


def _graph(path, weight_name: str, weight: np.ndarray, bias: np.ndarray) -> None:
    """y = x @ W + b, with W (and b when large) in the graph's own external-data file, as the exporter writes."""
    n_in, n_out = weight.shape
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n_in])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n_out])
    nodes = [helper.make_node("MatMul", ["x", weight_name], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])]
    inits = [numpy_helper.from_array(weight, weight_name), numpy_helper.from_array(bias, "b")]
    model = helper.make_model(helper.make_graph(nodes, path.stem, [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=1024)


def _run(path, x: np.ndarray, prepack: bool = True) -> np.ndarray:
    opts = session_options(ort.SessionOptions(), prepack)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_pool_stores_each_tensor_once_matched_by_content(tmp_path):
    rng = np.random.default_rng(0)
    shared = rng.standard_normal((512, 768)).astype(np.float32)  # 1.5 MiB: page-aligned in the pool
    other = rng.standard_normal((512, 768)).astype(np.float32)
    small_bias = rng.standard_normal(8).astype(np.float32)  # 32 bytes: stays inline in the .onnx
    big_bias = rng.standard_normal(768).astype(np.float32)
    # prefill and decode hold the same weight under different names (the optimizer renames folded weights)
    _graph(tmp_path / "prefill.onnx", "w_prefill", shared, big_bias)
    _graph(tmp_path / "decode.onnx", "w_decode_renamed", shared, big_bias)
    _graph(tmp_path / "vision.onnx", "w_vision", other[:, :8].copy(), small_bias)
    x = rng.standard_normal((3, 512)).astype(np.float32)
    before = {g: _run(tmp_path / f"{g}.onnx", x) for g in ("prefill", "decode", "vision")}

    pool = WeightPool(tmp_path)
    moved = {g: pool.add(tmp_path / f"{g}.onnx") for g in ("prefill", "decode", "vision")}

    assert moved["prefill"]["new_bytes"] == shared.nbytes + big_bias.nbytes
    assert moved["decode"] == {"tensors": 2, "bytes": shared.nbytes + big_bias.nbytes, "new_bytes": 0}
    assert moved["vision"]["tensors"] == 1  # the 32-byte bias stays inline
    assert pool.stats["unique"] == 3 and pool.stats["bytes_out"] == shared.nbytes + big_bias.nbytes + 512 * 8 * 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decode.onnx", "prefill.onnx", "vision.onnx", WEIGHTS_FILE]
    for g in ("prefill", "decode", "vision"):  # ordinary ONNX, read by onnxruntime from the one file
        model = onnx.load(str(tmp_path / f"{g}.onnx"), load_external_data=False)
        for init in model.graph.initializer:
            if init.data_location == TensorProto.EXTERNAL:
                ext = {e.key: e.value for e in init.external_data}
                assert ext["location"] == WEIGHTS_FILE
                if int(ext["length"]) >= 1 << 20:
                    assert int(ext["offset"]) % PAGE_ALIGN == 0
        np.testing.assert_array_equal(_run(tmp_path / f"{g}.onnx", x), before[g])
        # without pre-packing onnxruntime runs another MatMul kernel: the same values up to float rounding
        np.testing.assert_allclose(_run(tmp_path / f"{g}.onnx", x, prepack=False), before[g], rtol=1e-5, atol=1e-4)
    w = onnx.load(str(tmp_path / "decode.onnx"))  # loads external data through the pool
    got = {i.name: numpy_helper.to_array(i) for i in w.graph.initializer}
    np.testing.assert_array_equal(got["w_decode_renamed"], shared)
    assert stored_bytes(onnx.load(str(tmp_path / "vision.onnx"), load_external_data=False)) == 512 * 8 * 4 + 32


def test_a_new_pool_replaces_a_stale_weight_file(tmp_path):
    (tmp_path / WEIGHTS_FILE).write_bytes(b"left by an earlier attempt")
    pool = WeightPool(tmp_path)
    assert not pool.path.exists()


def _model_bytes(recipe_path) -> int:
    from tokcompile.models.loading import load_model
    from tokcompile.pipeline import plan_recipe

    plan = plan_recipe(recipe_path)
    model = load_model(plan.recipe.model.path, plan.config, plan.recipe.base.seed, False)
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}  # tied weights once
    return sum(t.numel() * t.element_size() for t in tensors.values())


def test_demo_export_holds_one_copy_of_the_weights(demo_export):
    m = json.loads((demo_export / "manifest.json").read_text())
    graphs = {g: m["graphs"][g]["artifacts"]["onnx"] for g in ("vision", "prefill", "decode")}
    for art in graphs.values():
        assert art["files"][1] == WEIGHTS_FILE
    inline = sum(stored_bytes(onnx.load(str(demo_export / f"{g}.onnx"), load_external_data=False))
                 for g in graphs) - sum(art["weights"]["bytes"] for art in graphs.values())
    onnx_bytes = (demo_export / WEIGHTS_FILE).stat().st_size + inline
    model_bytes = _model_bytes(ROOT / "recipes" / "demo.yml")  # the recipe demo_export compiles
    shared = graphs["decode"]["weights"]
    print(f"ONNX weights {onnx_bytes} bytes for a {model_bytes}-byte model ({onnx_bytes / model_bytes:.3f}x); "
          f"decode added {shared['new_bytes']} of its {shared['bytes']} bytes")
    assert onnx_bytes <= 1.05 * model_bytes
    assert shared["new_bytes"] < 0.05 * shared["bytes"]  # decode reads prefill's weights


def test_runtime_answers_the_same_with_and_without_prepacking(demo_export):
    from PIL import Image

    from tokcompile.runtime import load

    image = Image.fromarray((np.random.default_rng(1).random((40, 50, 3)) * 255).astype("uint8"))
    answers = [load(demo_export, "onnxruntime", prepack=prepack).generate(
        [image], ["What is this?"], max_new_tokens=6, stop_at_eos=False) for prepack in (True, False)]
    assert answers[0].token_ids == answers[1].token_ids and answers[0].kept == answers[1].kept
