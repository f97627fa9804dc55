"""Calibration sources: synthetic, the shapes task, a LightCompress-style folder with img_qa.json, and JSONL."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tokcompile.errors import RecipeError
from tokcompile.quant.calib import calibration_batches
from tokcompile.recipe import CalibConfig


def _images(folder, n):
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray((rng.random((40, 30 + 10 * i, 3)) * 255).astype("uint8")).save(folder / f"{i}.png")


def test_synthetic_is_seeded_and_batched(processor, adapter, geometry):
    a = calibration_batches(CalibConfig(n_samples=5), processor, adapter, geometry, seed=0, batch_size=2)
    b = calibration_batches(CalibConfig(n_samples=5), processor, adapter, geometry, seed=0, batch_size=2)
    assert [x["input_ids"].shape[0] for x in a] == [2, 2, 1]
    assert all((x["input_ids"] == y["input_ids"]).all() for x, y in zip(a, b))
    assert all(x["pixel_values"].shape[1:] == (3, 32, 32) for x in a)


def test_shapes_source_is_the_training_split(processor, adapter, geometry):
    from tokcompile.data import shapes
    from tokcompile.parity import format_prompt

    batches = calibration_batches(CalibConfig(name="shapes", n_samples=3), processor, adapter, geometry, seed=0)
    train = shapes.samples("train", 3)
    assert len(batches) == 3
    for batch, sample in zip(batches, train):  # each prompt is the training question, in the chat template
        want = processor(images=[sample.image], text=[format_prompt(processor, adapter, sample.question)],
                         return_tensors="pt")["input_ids"]
        assert batch["input_ids"].tolist() == want.tolist()


def test_folder_with_img_qa_json(processor, adapter, geometry, tmp_path):
    _images(tmp_path, 2)
    (tmp_path / "img_qa.json").write_text(json.dumps([{"image": "0.png", "question": "What is it?"},
                                                      {"image": "1.png", "question": "Colour?"}]))
    out = calibration_batches(CalibConfig(name="custom_mm", n_samples=3, path=str(tmp_path)),
        processor, adapter, geometry, 0)
    assert len(out) == 3  # cycles through the two samples
    text = processor.tokenizer.decode(out[1]["input_ids"][0], skip_special_tokens=True)
    assert "Colour?" in text


def test_jsonl_file(processor, adapter, geometry, tmp_path):
    _images(tmp_path, 1)
    path = tmp_path / "calib.jsonl"
    path.write_text(json.dumps({"image": "0.png", "prompt": "Describe it."}) + "\n")
    (batch,) = calibration_batches(CalibConfig(name="custom", n_samples=1, path=str(path)),
        processor, adapter, geometry, 0)
    assert "Describe it." in processor.tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True)


@pytest.mark.parametrize(
    "setup,match",
    [
        (lambda d: None, "has no img_qa.json"),
        (lambda d: (d / "img_qa.json").write_text('[{"image": "0.png"}]'), "needs 'image' and 'question'"),
        (lambda d: (d / "img_qa.json").write_text('[{"image": "nope.png", "question": "q"}]'), "cannot read image"),
    ],
)
def test_bad_calibration_folders(processor, adapter, geometry, tmp_path, setup, match):
    setup(tmp_path)
    with pytest.raises(RecipeError, match=match) as e:
        calibration_batches(CalibConfig(name="custom_mm", n_samples=1, path=str(tmp_path)),
            processor, adapter, geometry, 0)
    assert e.value.key == "quant.calib.path"


def test_unknown_source(processor, adapter, geometry):
    with pytest.raises(RecipeError, match="use one of synthetic, shapes, custom_mm, custom"):
        calibration_batches(CalibConfig(name="pileval", n_samples=1), processor, adapter, geometry, 0)
