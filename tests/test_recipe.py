"""Tests for tokcompile.recipe: the seed examples load, defaults resolve, and every error names its key
and the fix on one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tokcompile.errors import RecipeError
from tokcompile.recipe import (
    DEFAULT_TARGETS,
    CalibConfig,
    ExportConfig,
    GPTQSpecial,
    InputsConfig,
    ParityConfig,
    Recipe,
    SaveConfig,
    load_recipe,
    load_recipe_dict,
)

# The two examples of the seed file (LightCompress docs), with the placeholders filled in.
SPARSE_SEED = """\
base:
    seed: &seed 42
model:
    type: Llava
    path: tiny-random:llava
    torch_dtype: auto
eval:
    eval_pos: [pretrain, transformed]
    type: vqa
    name: [gqa, mmbench_en_dev, mme]
    bs: 1
    inference_per_block: False
sparse:
    method: TokenReduction
    special:
        method: FastV
        pruning_loc: 3
        rate: 0.778
save:
    save_trans: False
    save_fake: False
    save_path: SAVE_PATH
"""

QUANT_SEED = """\
model:
    type: Llava
    path: tiny-random:llava
quant:
    method: RTN
    weight:
        bit: 4
        symmetric: False
        granularity: per_group
        group_size: 128
    special:
        actorder: True
        static_groups: True
        percdamp: 0.01
        blocksize: 128
        true_sequential: True
    quant_out: True
    token_reduction:    
        method: FastV
        special:
            pruning_loc: 3
            rate: 0.778
"""

MODEL = {"path": "tiny-random:llava"}


def write(tmp_path: Path, text: str, name: str = "recipe.yml") -> Path:
    path = tmp_path / name
    path.write_text(text.replace("SAVE_PATH", str(tmp_path / "out")), encoding="utf-8")
    return path


def error(data: Any) -> str:
    """The one-line message `load_recipe_dict` raises for `data`."""
    with pytest.raises(RecipeError) as info:
        load_recipe_dict(data, "t")
    message = str(info.value)
    assert "\n" not in message
    return message


def with_quant(**quant: Any) -> dict[str, Any]:
    return {"model": MODEL, "quant": {"method": "RTN", "weight": {"bit": 4}, **quant}}


def with_weight(**weight: Any) -> dict[str, Any]:
    return {"model": MODEL, "quant": {"method": "GPTQ", "weight": {"bit": 4, **weight}}}


# ------------------------------------------------------------------------------------------- loading
def test_sparse_seed_loads(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, SPARSE_SEED, "llava_fastv.yml"))
    assert recipe.name == "llava_fastv"
    assert recipe.source == str(tmp_path / "llava_fastv.yml")
    assert recipe.model.path == "tiny-random:llava" and recipe.model.type == "Llava"
    assert recipe.base.seed == 42
    assert recipe.quant is None
    assert recipe.sparse is not None and recipe.sparse.method == "TokenReduction"
    red = recipe.reduction
    assert red is not None and red.method == "FastV"
    assert dict(red.params) == {"pruning_loc": 3, "rate": 0.778}
    assert (red.key, red.method_key) == ("sparse.special", "sparse.special.method")
    assert recipe.eval is not None
    assert recipe.eval.positions == ("pretrain", "transformed")
    assert recipe.eval.datasets == ("gqa", "mmbench_en_dev", "mme") and recipe.eval.batch_size == 1
    assert recipe.save == SaveConfig(save_path=str(tmp_path / "out"), save_fake=False, save_trans=False)
    assert any(w.startswith("eval.inference_per_block is accepted but not acted on") for w in recipe.warnings)
    assert recipe.raw["sparse"]["special"]["method"] == "FastV"


def test_quant_seed_loads_with_rtn_special_warning(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, QUANT_SEED))
    quant = recipe.quant
    assert quant is not None and recipe.sparse is None
    assert quant.method == "RTN"
    assert (quant.weight.bit, quant.weight.symmetric) == (4, False)
    assert (quant.weight.granularity, quant.weight.group_size) == ("per_group", 128)
    assert quant.special == GPTQSpecial(actorder=True, static_groups=True, percdamp=0.01, blocksize=128,
                                        true_sequential=True)
    assert quant.quant_out is True
    red = recipe.reduction
    assert red is quant.token_reduction and red is not None
    assert red.method == "FastV" and dict(red.params) == {"pruning_loc": 3, "rate": 0.778}
    assert red.key == "quant.token_reduction.special"
    assert red.method_key == "quant.token_reduction.method"
    assert "quant.special is GPTQ-only; RTN ignores it" in recipe.warnings
    assert any(w.startswith("quant.quant_out") for w in recipe.warnings)
    assert all("\n" not in w for w in recipe.warnings)


def test_defaults() -> None:
    recipe = load_recipe_dict({"model": MODEL}, "minimal")
    assert isinstance(recipe, Recipe)
    assert recipe.name == "minimal" and recipe.source == "<dict>"
    assert recipe.base.seed == 42
    assert recipe.model.torch_dtype == "auto" and recipe.model.type is None
    assert recipe.model.trust_remote_code is False
    assert recipe.inputs == InputsConfig(batch_size=1, image_size=None, max_prompt_len=None, max_new_tokens=32)
    assert recipe.quant is None and recipe.sparse is None and recipe.eval is None
    assert recipe.reduction is None
    assert recipe.save == SaveConfig()
    assert recipe.export == ExportConfig(targets=DEFAULT_TARGETS, dtype="float32", opset=None, weight_format="float")
    assert recipe.parity == ParityConfig(atol=1e-4, rtol=1e-3, samples=3, reference=True)
    assert recipe.warnings == ()


def test_quant_defaults_and_normalisation() -> None:
    recipe = load_recipe_dict({"model": {**MODEL, "torch_dtype": "BFloat16"},
                               "quant": {"method": "gptq", "weight": {"bit": 8}}}, "q")
    assert recipe.model.torch_dtype == "bfloat16"
    quant = recipe.quant
    assert quant is not None and quant.method == "GPTQ"
    assert (quant.weight.symmetric, quant.weight.granularity, quant.weight.group_size) == (True, "per_channel", -1)
    assert quant.special == GPTQSpecial()
    assert quant.calib == CalibConfig()
    assert quant.ignore is None and quant.token_reduction is None
    assert recipe.warnings == ()


def test_image_size_forms() -> None:
    def size(value: Any) -> Any:
        return load_recipe_dict({"model": MODEL, "inputs": {"image_size": value}}, "t").inputs.image_size

    assert size(336) == (336, 336)
    assert size([336, 448]) == (336, 448)
    assert size(None) is None


def test_export_targets_normalised() -> None:
    recipe = load_recipe_dict({"model": MODEL, "export": {"targets": ["AOTI", "onnx", "aoti"], "opset": 18}}, "t")
    assert recipe.export.targets == ("aoti", "onnx")
    assert recipe.export.opset == 18


def test_integers_accepted_for_floats_and_exponent_strings() -> None:
    recipe = load_recipe_dict({"model": MODEL, "parity": {"atol": 1, "rtol": "1e-3"}}, "t")
    assert recipe.parity.atol == 1.0 and isinstance(recipe.parity.atol, float)
    assert recipe.parity.rtol == 1e-3


def test_warnings_for_accepted_but_ignored_keys() -> None:
    data = {"model": {**MODEL, "tokenizer_mode": "slow"},
            "quant": {"method": "GPTQ", "weight": {"bit": 4, "need_pack": True, "calib_algo": "MinMax"},
                      "calib": {"name": "synthetic", "preproc": "vlm_general"}},
            "save": {"save_vllm": True, "save_trans": True, "trtllm_cfg": {"tp_size": 1}}}
    warnings = load_recipe_dict(data, "t").warnings
    assert "model.tokenizer_mode is accepted but not acted on" in warnings
    for key in ("quant.weight.need_pack", "quant.calib.preproc", "save.save_vllm", "save.save_trans",
                "save.trtllm_cfg"):
        assert any(w.startswith(key) for w in warnings), key
    assert any("export.targets" in w for w in warnings if w.startswith("save.save_vllm"))


def test_to_dict_is_json_and_round_trips(tmp_path: Path) -> None:
    for text in (SPARSE_SEED, QUANT_SEED):
        recipe = load_recipe(write(tmp_path, text))
        resolved = json.loads(json.dumps(recipe.to_dict()))
        assert set(resolved) == {"base", "model", "inputs", "quant", "sparse", "eval", "save", "export", "parity"}
        assert resolved["export"]["targets"] == ["onnx", "aoti"]
        assert load_recipe_dict(resolved, recipe.name, recipe.source) == recipe
    resolved = load_recipe(write(tmp_path, QUANT_SEED)).to_dict()
    assert resolved["quant"]["token_reduction"] == {"method": "FastV", "special": {"pruning_loc": 3, "rate": 0.778}}
    assert resolved["quant"]["calib"]["n_samples"] == 32


def test_recipe_is_frozen_and_params_read_only() -> None:
    recipe = load_recipe_dict({"model": MODEL, "sparse": {"special": {"method": "FastV", "rate": 0.5}}}, "t")
    with pytest.raises(AttributeError):
        recipe.name = "x"  # type: ignore[misc]
    assert recipe.reduction is not None
    with pytest.raises(TypeError):
        recipe.reduction.params["rate"] = 0.1  # type: ignore[index]


def test_import_does_not_load_torch() -> None:
    code = "import sys, tokcompile.recipe; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1]).returncode == 0


# -------------------------------------------------------------------------------------------- errors
def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yml"
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.key == str(path)
    assert "does not exist" in str(info.value) and "check the path" in str(info.value)


def test_malformed_yaml_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  path: x\n  type: a: b\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.key == str(path)
    assert "not valid YAML (line 3: mapping values are not allowed here); fix the syntax" in str(info.value)


@pytest.mark.parametrize("text", ["- model\n- quant\n", "", "just a string\n"])
def test_top_level_not_a_mapping(tmp_path: Path, text: str) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, text))
    assert "model: {path: ...}" in str(info.value)


def test_missing_model_section() -> None:
    assert error({"sparse": {"special": {"method": "FastV"}}}) == "model: missing section; add model: {path: ...}"
    assert error({"model": {}}).startswith("model.path: missing; add path: tiny-random:<family>")


@pytest.mark.parametrize("data, expected", [
    ({"model": {"pathh": "x"}},
     "model.pathh: unknown key (did you mean 'path'?); known keys: path, type, torch_dtype"),
    ({"model": MODEL, "parity": {"fail_on_drift": True}}, "parity.fail_on_drift: unknown key; known keys: atol"),
    ({"model": MODEL, "exports": {}}, "exports: unknown key (did you mean 'export'?)"),
    ({"model": MODEL, "calib": {}}, "calib: move this section under quant (as quant.calib)"),
    (with_weight(head_num=8), "quant.weight.head_num: unknown key"),
])
def test_unknown_keys(data: dict[str, Any], expected: str) -> None:
    assert error(data).startswith(expected)


def test_wrong_types() -> None:
    assert error(with_weight(bit="four")) == "quant.weight.bit: expected an integer, got str 'four'"
    assert error(with_weight(bit=True)) == "quant.weight.bit: expected an integer, got bool True"
    assert error(with_weight(bit=4.0)) == "quant.weight.bit: expected an integer, got float 4.0"
    assert error(with_weight(symmetric="yes")).startswith("quant.weight.symmetric: expected true or false")
    assert error({"model": MODEL, "parity": {"atol": "tight"}}).startswith("parity.atol: expected a number")
    assert error({"model": MODEL, "inputs": {"batch_size": None}}).startswith(
        "inputs.batch_size: expected an integer, got null")
    assert error({"model": {"path": 3}}).startswith("model.path: expected a non-empty string, got int 3")
    assert error({"model": MODEL, "sparse": []}).startswith("sparse: expected a mapping, got list")


def test_enumerations() -> None:
    message = error({"model": {**MODEL, "torch_dtype": "flaot16"}})
    assert message.startswith("model.torch_dtype: 'flaot16' is not supported (did you mean 'float16'?)")
    assert "choose one of auto, float32, float16, bfloat16" in message
    assert "choose one of RTN, GPTQ" in error({"model": MODEL, "quant": {"method": "Awq", "weight": {"bit": 4}}})
    assert "(did you mean 'GPTQ'?)" in error({"model": MODEL, "quant": {"method": "GPTQQ", "weight": {"bit": 4}}})


def test_ranges() -> None:
    assert error(with_weight(bit=9)) == "quant.weight.bit: 9 is outside 2..8; use a bit width from 2 to 8"
    assert error(with_weight(bit=1)).startswith("quant.weight.bit: 1 is outside 2..8")
    assert error({"model": MODEL, "inputs": {"batch_size": 0}}).startswith("inputs.batch_size: 0 is below")
    assert error({"model": MODEL, "inputs": {"max_prompt_len": 1}}).startswith("inputs.max_prompt_len: 1 is")
    assert error({"model": MODEL, "inputs": {"image_size": [336, 0]}}).startswith("inputs.image_size: 0 is")
    assert "[height, width]" in error({"model": MODEL, "inputs": {"image_size": [1, 2, 3]}})
    assert error({"model": MODEL, "export": {"opset": 17}}).startswith("export.opset: 17 is below the minimum 18")
    assert "must be > 0" in error({"model": MODEL, "parity": {"atol": 0}})
    assert "must be >= 0" in error({"model": MODEL, "parity": {"rtol": -0.1}})
    assert error({"model": MODEL, "parity": {"samples": 0}}).startswith("parity.samples: 0 is below the minimum 1")
    assert "(0, 1]" in error(with_quant(special={"percdamp": 1.5}))
    assert error(with_quant(calib={"bs": 0})).startswith("quant.calib.bs: 0 is not a batch size")


def test_group_size_rules() -> None:
    message = error(with_weight(granularity="per_group"))
    assert message.startswith("quant.weight.group_size: per_group needs a positive group_size")
    assert "add group_size: 128" in message
    assert error(with_weight(granularity="per_group", group_size=0)).startswith("quant.weight.group_size:")
    message = error(with_weight(group_size=128))
    assert message.startswith("quant.weight.group_size: group_size 128 needs granularity: per_group")
    assert "per_group or drop group_size" in message
    assert load_recipe_dict(with_weight(granularity="per_channel", group_size=-1), "t").quant is not None


def test_sym_grid() -> None:
    assert load_recipe_dict(with_weight(), "t").quant.weight.sym_grid == "narrow"
    for given, parsed in (("narrow", "narrow"), ("full", "full"), ("Full", "full")):
        assert load_recipe_dict(with_weight(sym_grid=given), "t").quant.weight.sym_grid == parsed
    assert load_recipe_dict(with_weight(symmetric=False, sym_grid="narrow"), "t").quant.weight.sym_grid == "narrow"
    assert error(with_weight(sym_grid="fulll")) == (
        "quant.weight.sym_grid: 'fulll' is not supported (did you mean 'full'?); choose one of narrow, full")
    assert error(with_weight(sym_grid=16)) == "quant.weight.sym_grid: expected one of narrow, full, got int 16"
    assert error(with_weight(symmetric=False, sym_grid="full")) == (
        "quant.weight.sym_grid: full is a symmetric grid; set symmetric: true or sym_grid: narrow")


@pytest.mark.parametrize("granularity", ["per_tensor", "per_head", "per_block"])
def test_unsupported_granularity(granularity: str) -> None:
    message = error(with_weight(granularity=granularity))
    assert message.startswith("quant.weight.granularity:")
    assert "only per_channel and per_group are supported" in message


def test_unsupported_quant_features() -> None:
    assert error(with_quant(act={"bit": 8})) == (
        "quant.act: activation/KV-cache quantization is not supported; remove quant.act")
    assert error(with_quant(kvcache={"bit": 8})).startswith("quant.kvcache: activation/KV-cache quantization")
    message = error({"model": MODEL, "quant": {"language": {"method": "RTN"}}})
    assert message.startswith("quant.language:") and "directly under quant" in message
    assert error(with_quant(special={"owq": True})).startswith("quant.special.owq: OWQ is not supported")
    assert "choose one of minmax" in error(with_weight(calib_algo="mse"))
    assert "choose one of int-quant" in error(with_weight(quant_type="float-quant"))
    assert error({"model": MODEL, "quant": {"method": "RTN"}}).startswith("quant.weight: missing; add weight:")


def test_sparse_errors() -> None:
    message = error({"model": MODEL, "sparse": {"method": "TokenReduction", "vision": {"method": "ToMe"}}})
    assert message.startswith("sparse.vision.method: 'ToMe' is not supported; choose one of TokenReduction")
    message = error({"model": MODEL, "sparse": {"vision": {"method": "TokenReduction"}}})
    assert message.startswith("sparse.vision.special: missing; add special:")
    both = {"special": {"method": "FastV"}, "language": {"special": {"method": "FastV"}}}
    assert error({"model": MODEL, "sparse": both}).startswith("sparse.language: give the decoder-side method once")
    assert error({"model": MODEL, "sparse": {"special": {"rate": 0.5}}}).startswith(
        "sparse.special.method: missing; add")
    assert "choose one of TokenReduction" in error({"model": MODEL, "sparse": {"method": "Quant"}})


def test_both_reductions_rejected() -> None:
    data = with_quant(token_reduction={"method": "FastV", "special": {"rate": 0.5}})
    data["sparse"] = {"method": "TokenReduction", "special": {"method": "FastV", "rate": 0.5}}
    message = error(data)
    assert message.startswith("quant.token_reduction:") and "give one of the two" in message


def test_export_errors() -> None:
    message = error({"model": MODEL, "export": {"targets": ["onxx"]}})
    assert message == ("export.targets: unknown target 'onxx' (did you mean 'onnx'?); choose from onnx, aoti, eager, "
                       "torch_compile, tensorrt")
    assert "name at least one" in error({"model": MODEL, "export": {"targets": []}})
    assert error({"model": MODEL, "export": {"dtype": "float64"}}).startswith(
        "export.dtype: 'float64' is not supported (did you mean 'float16'?); choose one of float32, float16, bfloat16")


def test_non_string_keys() -> None:
    assert error({"model": MODEL, True: 1}).startswith("True: keys must be strings")


def test_prompts_beyond_an_active_sliding_window_are_a_plan_error(tmp_path, monkeypatch):
    from tokcompile.models import tiny
    from tokcompile.pipeline import plan_recipe

    real = tiny.build_config

    def windowed(family, size="tiny"):
        config = real(family, size)
        config.text_config.sliding_window = 128
        return config

    monkeypatch.setattr(tiny, "build_config", windowed)
    path = tmp_path / "r.yml"
    path.write_text("model: {path: 'tiny-random:llava_next'}\ninputs: {image_size: [40, 64], max_prompt_len: 64}\n")
    with pytest.raises(RecipeError, match=r"inputs.max_prompt_len.*sliding window of 128"):
        plan_recipe(path)
    path.write_text("model: {path: 'tiny-random:llava'}\ninputs: {max_prompt_len: 32}\n")
    assert plan_recipe(path).text_len_range == (66, 96)  # 64 image tokens + 32 fit in a window of 128
