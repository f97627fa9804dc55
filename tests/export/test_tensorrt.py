"""The TensorRT target where TensorRT is absent (as in CI): `--plan` refuses it in one line; the optimization
profile is computed from a manifest-like dict; the exporter reads dimension names from the ONNX graph.

Engine building, refitting and running need TensorRT and a CUDA GPU and are not tested here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tokcompile.errors import ExportError, RecipeError
from tokcompile.export.base import ExportRequest
from tokcompile.export.tensorrt import _external_files, _labelled_inputs, export_tensorrt
from tokcompile.export.tensorrt_profile import check_ranges, default_ranges, dim_range, input_profiles
from tokcompile.recipe import TensorRTConfig

ROOT = Path(__file__).resolve().parents[2]
NO_TENSORRT = importlib.util.find_spec("tensorrt") is None

# FastV-like: 64 image placeholders, layers 0-1 cache them all, layers 2-3 keep 32; prompts of 66..320 tokens.
MANIFEST = {
    "plan": {"text_len_range": [66, 320], "image_tokens_per_layer": [64, 64, 32, 32],
             "geometry": {"n_image_tokens": 64}},
    "cache_groups": [[0, 2], [2, 4]],
    "generation": {"batch_max": 2, "max_new_tokens": 32},
    "recipe": {"export": {"tensorrt": {"batch": None, "prompt_len": None, "cache_len": None}}},
}
DECODE_INPUTS = [
    {"name": "input_ids", "shape": ["batch", 1]},
    {"name": "attention_mask_1", "shape": ["batch", "past_len_1 + 1"]},
    {"name": "past_key_0", "shape": ["batch", 2, "past_len_0", 32]},
    {"name": "past_key_3", "shape": ["batch", 2, "past_len_1", 32]},
    {"name": "static", "shape": [1, 3]},
]


@pytest.mark.skipif(not NO_TENSORRT, reason="TensorRT is installed here")
def test_plan_refuses_tensorrt_when_it_is_not_installed(tmp_path, capsys):
    from tokcompile.cli import main

    code = main([str(ROOT / "recipes" / "demo.yml"), "--plan", "--out", str(tmp_path / "o"), "--targets",
                 "onnx,tensorrt"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: --targets: tensorrt needs TensorRT 10 or newer, which is not installed: "
                             "pip install tensorrt (NVIDIA's package")
    assert "pypi.nvidia.com" in err[0] and "static TensorRT check of the ONNX graphs" in err[0]
    recipe = tmp_path / "r.yml"
    recipe.write_text((ROOT / "recipes" / "demo.yml").read_text().replace("targets: [onnx]", "targets: [tensorrt]"))
    assert main([str(recipe), "--plan", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith("error: export.targets: tensorrt needs TensorRT 10 or newer")
    assert not (tmp_path / "o").exists()


def test_default_ranges_follow_the_plan():
    r = default_ranges(MANIFEST)
    assert r["batch"] == (1, 2, 2)
    assert r["prompt_len"] == (66, 193, 320)
    assert r["past_len_0"] == (66, 193 + 16, 320 + 31)  # the whole prompt, then up to 31 generated tokens cached
    assert r["past_len_1"] == (34, 161 + 16, 288 + 31)  # 32 of the 64 image tokens pruned
    assert r["cache_len_1"] == (34, 161, 288)


def test_recipe_ranges_replace_the_defaults():
    over = {"batch": [1, 1, 2], "prompt_len": [70, 100, 300], "cache_len": [1, 128, 512]}
    r = default_ranges({**MANIFEST, "recipe": {"export": {"tensorrt": over}}})
    assert r["batch"] == (1, 1, 2) and r["prompt_len"] == (70, 100, 300)
    assert r["past_len_0"] == r["past_len_1"] == (1, 128, 512)


def test_input_profiles_per_input():
    profiles = input_profiles(DECODE_INPUTS, default_ranges(MANIFEST))
    assert profiles["input_ids"] == ((1, 1), (2, 1), (2, 1))
    assert profiles["attention_mask_1"] == ((1, 35), (2, 178), (2, 320))  # past_len_1 + 1
    assert profiles["past_key_0"] == ((1, 2, 66, 32), (2, 2, 209, 32), (2, 2, 351, 32))
    assert profiles["past_key_3"] == ((1, 2, 34, 32), (2, 2, 177, 32), (2, 2, 319, 32))
    assert "static" not in profiles  # no dynamic axis: no profile entry
    assert dim_range("batch * 4", {"batch": (1, 2, 2)}) == (4, 8, 8)  # images flattened into rows
    with pytest.raises(ValueError, match="dimension 'seq' has no range"):
        input_profiles([{"name": "x", "shape": ["seq"]}], {"batch": (1, 1, 1)})


def test_recipe_ranges_must_fit_the_graphs():
    assert check_ranges(TensorRTConfig(), 2, (66, 320)) is None
    key, why = check_ranges(TensorRTConfig(batch=(1, 2, 4)), 2, (66, 320))
    assert key == "export.tensorrt.batch" and why.startswith("max 4 exceeds inputs.batch_size (2)")
    key, why = check_ranges(TensorRTConfig(prompt_len=(10, 100, 300)), 2, (66, 320))
    assert key == "export.tensorrt.prompt_len" and "66..320" in why
    from tokcompile.recipe import load_recipe_dict

    with pytest.raises(RecipeError, match=r"export.tensorrt.cache_len: \[9, 1, 5\] is not ordered"):
        load_recipe_dict({"model": {"path": "tiny-random:llava"}, "export": {"tensorrt": {"cache_len": [9, 1, 5]}}},
                         "r")


def _decode_like(tmp_path: Path) -> Path:
    """A graph whose inputs carry the exporter's opaque dimension names (s21, 's83 + 1')."""
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["s21", 1])
    mask = helper.make_tensor_value_info("attention_mask_0", TensorProto.INT64, ["s40", "s83 + 1"])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, ["s21", 1])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["input_ids"], ["y"])], "g",
                                                [ids, mask], [y]), opset_imports=[helper.make_opsetid("", 21)])
    onnx.save(model, str(tmp_path / "decode.onnx"))
    return tmp_path / "decode.onnx"


def test_exporter_names_dimensions_by_the_layout_labels(tmp_path):
    model = onnx.load(str(_decode_like(tmp_path)))
    labels = {"input_ids": {0: "batch"}, "attention_mask_0": {0: "batch", 1: "past_len_0 + 1"}}
    inputs = _labelled_inputs(model, labels, "decode")
    assert inputs == [{"name": "input_ids", "shape": ["batch", 1]},
                      {"name": "attention_mask_0", "shape": ["batch", "past_len_0 + 1"]}]
    assert input_profiles(inputs, default_ranges(MANIFEST))["attention_mask_0"] == ((1, 67), (2, 210), (2, 352))
    with pytest.raises(ExportError, match="attention_mask_0 has a dynamic axis 1 with no name"):
        _labelled_inputs(model, {**labels, "attention_mask_0": {0: "batch"}}, "decode")


def test_exporter_needs_the_onnx_graph_first(tmp_path):
    req = ExportRequest(None, tmp_path, "prefill", ["input_ids"], ["logits"], None)
    with pytest.raises(ExportError, match="builds from prefill.onnx, which the onnx target has not written"):
        export_tensorrt(req)
    assert not list(tmp_path.iterdir())  # nothing written


def test_engine_artifact_lists_the_weight_files(tmp_path):
    w = onnx.numpy_helper.from_array(np.ones((8, 8), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])], [w])
    onnx.save(helper.make_model(graph), str(tmp_path / "g.onnx"), save_as_external_data=True, location="weights.bin",
              size_threshold=0)
    assert _external_files(onnx.load(str(tmp_path / "g.onnx"), load_external_data=False)) == ["weights.bin"]
