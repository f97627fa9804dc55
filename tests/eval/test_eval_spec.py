"""The recipe's eval section: LightCompress's keys, one-line errors that name the key, and --plan checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from tokcompile.errors import RecipeError
from tokcompile.eval.datasets import load_dataset
from tokcompile.recipe import load_recipe_dict

MODEL = {"path": "tiny-random:llava"}


def recipe_with(eval_section: dict) -> dict:
    return {"model": MODEL, "export": {"targets": ["onnx"]}, "eval": eval_section}


def test_lightcompress_keys_parse_and_passive_keys_warn():
    r = load_recipe_dict(recipe_with({"eval_pos": ["pretrain", "fake_quant", "transformed"], "type": "vqa",
                                      "name": ["shapes"], "bs": 4, "inference_per_block": False,
                                      "download": False}), "t")
    assert r.eval.positions == ("pretrain", "fake_quant", "transformed") and r.eval.batch_size == 4
    assert r.eval.datasets == ("shapes",) and r.eval.backend == "onnxruntime"
    assert sum(w.startswith("eval.") and "not acted on" in w for w in r.warnings) == 2


@pytest.mark.parametrize("section, key, text", [
    ({"eval_pos": ["pretrain", "fake_quant_wo_kv"], "name": "shapes"}, "eval.eval_pos", "not supported"),
    ({"eval_pos": ["pretrained"], "name": "shapes"}, "eval.eval_pos", "unknown position"),
    ({"eval_pos": ["pretrain", "pretrain"], "name": "shapes"}, "eval.eval_pos", "twice"),
    ({"type": "ppl", "name": "shapes"}, "eval.type", "not supported"),
    ({"eval_pos": ["pretrain"]}, "eval.name", "missing"),
    ({"name": "shapes", "bs": 0}, "eval.bs", "at least 1"),
    ({"name": "shapes", "backend": "tensorrt"}, "eval.backend", "unknown backend"),
    ({"name": "shapes", "split": "dev"}, "eval.split", "unknown split"),
    ({"name": "shapes", "nmae": 1}, "eval.nmae", "unknown key"),
])
def test_bad_keys_name_themselves(section, key, text):
    with pytest.raises(RecipeError) as e:
        load_recipe_dict(recipe_with(section), "t")
    assert e.value.key == key and text in str(e.value)


def _plan(tmp_path: Path, section: dict, *extra: str) -> subprocess.CompletedProcess:
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump(recipe_with(section)))
    return subprocess.run([sys.executable, str(ROOT / "compile.py"), str(recipe), "--plan", *extra],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_plan_shows_eval_and_refuses_what_cannot_run(tmp_path):
    ok = _plan(tmp_path, {"eval_pos": ["pretrain", "exported"], "name": "shapes", "num_samples": 50})
    assert ok.returncode == 0, ok.stderr
    assert "eval        pretrain, exported on shapes (first 50, batches of 8)" in ok.stdout
    missing = _plan(tmp_path, {"name": ["gqa"]})
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.count("\n") == 1 and "eval.name" in missing.stderr and "'gqa'" in missing.stderr
    assert _plan(tmp_path, {"name": ["gqa"]}, "--no-eval").returncode == 0
    wrong = _plan(tmp_path, {"eval_pos": ["exported"], "name": "shapes", "backend": "aoti"})
    assert wrong.returncode == 2 and "eval.backend" in wrong.stderr and "aoti target" in wrong.stderr


def test_local_datasets_in_both_layouts(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "red.png")
    (tmp_path / "folder").mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "folder" / "red.png")
    (tmp_path / "folder" / "img_qa.json").write_text(json.dumps(
        [{"image": "red.png", "question": "What color?", "answer": ["red", "red", "crimson"]}]))
    (tmp_path / "qa.jsonl").write_text(json.dumps({"image": "red.png", "question": "What color?",
                                                   "answer": "red", "type": "color"}) + "\n")
    folder = load_dataset(str(tmp_path / "folder"), None, None)
    assert folder[0].answers == ("red", "red", "crimson") and folder[0].image.size == (8, 8)
    named = load_dataset("qa", str(tmp_path), None)  # a name looked up under eval.path
    assert named[0].answers == ("red",) and named[0].qtype == "color"
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "red.png", "question": "What?"}) + "\n")
    with pytest.raises(RecipeError, match="needs 'image', 'question' and 'answer'"):
        load_dataset(str(tmp_path / "bad.jsonl"), None, None)


def test_video_compiles_refuse_image_datasets():
    from tokcompile.plan import resolve

    data = {"model": {"path": "tiny-random:llava_onevision"}, "inputs": {"video_frames": 4},
            "export": {"targets": ["onnx"]}, "eval": {"name": "shapes"}}
    with pytest.raises(RecipeError) as e:
        resolve(load_recipe_dict(data, "t"))
    assert e.value.key == "eval" and "video" in str(e.value)


def test_a_question_longer_than_the_export_fails_before_any_work(tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32), (0, 0, 255)).save(tmp_path / "blue.png")
    (tmp_path / "long.jsonl").write_text(json.dumps({"image": "blue.png", "question": "Why? " * 60,
                                                     "answer": "blue"}) + "\n")
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"model": MODEL, "inputs": {"batch_size": 1, "max_prompt_len": 128},
                                      "export": {"targets": ["onnx"]},
                                      "eval": {"eval_pos": ["exported"], "name": [str(tmp_path / "long.jsonl")]}}))
    res = subprocess.run([sys.executable, str(ROOT / "compile.py"), str(recipe), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 2 and "inputs.max_prompt_len" in res.stderr and "Traceback" not in res.stderr
    assert "[quantize]" not in res.stdout and not (tmp_path / "out").exists()
