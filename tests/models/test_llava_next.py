"""LLaVA-NeXT: anyres geometry against HF's own functions and processor, packed image features and logits
against the HF model, static FastV against the independent reference, the checkpoint-directory path, and
the tiny twin recipe compiled end to end and answered through the runtime."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import ROOT, compile_recipe
from tokcompile.models import ADAPTERS, ReducedVLM
from tokcompile.models.llava_next import anyres_layout, best_pinpoint, unpad_window
from tokcompile.models.tiny import build_model, build_processor
from tokcompile.models.tiny.llava_next import PINPOINTS, SIZES
from tokcompile.parity import process, random_images
from tokcompile.reduce.base import Entering
from tokcompile.reduce.fastv import FastVConfig, keep_count
from tokcompile.reference import fastv_reference

IMAGE = 4  # "<image>" in the tiny tokenizer
TWIN = ROOT / "recipes" / "tiny" / "llava_next.yml"
# (height, width): the default square, a wide image whose feature map loses padded rows, a tall one on a
# 2x1 grid, and an odd size that lands on the 2x2 grid.
SIZES_TO_CHECK = [None, (40, 64), (64, 32), (50, 50)]


@pytest.fixture(scope="module")
def model():
    return build_model("llava_next", seed=0)


@pytest.fixture(scope="module")
def proc():
    return build_processor("llava_next")


@pytest.fixture(scope="module")
def adapter():
    return ADAPTERS.get("llava_next")()


def _batch(proc, adapter, geom, questions: list[str], seed: int = 0) -> dict:
    """Processor inputs for images of sizes other than the compiled one (resized on the way, as at runtime)."""
    images = random_images(np.random.default_rng(seed), len(questions), (geom.image_size[0] + 7, 53))
    return process(proc, adapter, geom, images, questions)


QUESTIONS = ["What is shown in this picture, in some detail?", "Hi?"]


# --- geometry -----------------------------------------------------------------------------------------
def _sweep() -> list[tuple[int, int]]:
    sides = [1, 7, 20, 31, 32, 33, 40, 50, 64, 65, 100, 200, 335, 336, 337, 500, 672, 700, 1008, 1500]
    return [(h, w) for h in sides for w in sides]


@pytest.mark.parametrize("size", ["tiny", "medium"])
def test_anyres_helpers_match_hf(size):
    from transformers.image_processing_utils import select_best_resolution
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches, unpad_image

    tile, patch = SIZES[size][9], SIZES[size][10]
    pins = PINPOINTS[size]
    proc = build_processor("llava_next", size)
    checked = rejected = 0
    for hw in _sweep():
        pinpoint = tuple(select_best_resolution(hw, pins))
        assert best_pinpoint(hw, tuple(map(tuple, pins))) == pinpoint
        side = tile // patch
        rows, cols = pinpoint[0] // tile * side, pinpoint[1] // tile * side
        cells = torch.arange(rows * cols).view(1, rows, cols)  # HF's unpad on a map of cell ids
        r0, r1, c0, c1 = unpad_window(hw, rows, cols)
        hf = unpad_image(cells, list(hw))
        assert torch.equal(hf, cells[:, r0:r1, c0:c1])
        try:
            layout = anyres_layout(hw, tuple(map(tuple, pins)), tile, patch)
        except ValueError:
            assert min(hf.shape[1:]) == 0  # rejected only when HF's unpadding leaves nothing
            rejected += 1
            continue
        assert layout.n_tiles == image_size_to_num_patches(hw, pins, tile)
        # the processor's own count of "<image>" tokens (CLS removed under the "default" strategy)
        assert layout.n_tokens == proc._get_number_of_features(hw[0], hw[1], tile, tile) - 1
        checked += 1
    assert checked > 250 and rejected > 0


def test_geometry_defaults_and_medium_token_count(adapter):
    from tokcompile.models.tiny import build_config

    tiny = adapter.geometry(build_config("llava_next", "tiny"), None)
    assert tiny.image_size == (64, 64) and tiny.vision_images == 5 and tiny.n_image_tokens == 336
    assert tiny.layout == (2, 2, 16, 16) and tiny.vision_tokens == 65
    medium = build_config("llava_next", "medium")
    g = adapter.geometry(medium, None)
    assert g.image_size == (672, 672) and g.vision_images == 5 and g.n_image_tokens == 576 + 48 * 49
    wide = adapter.geometry(medium, (336, 672))
    assert wide.vision_images == 3 and wide.n_image_tokens == 576 + 24 * 49


def test_impossible_sizes_are_rejected(adapter, model):
    for size in [(1, 64), (0, 64)]:
        with pytest.raises(ValueError, match="inputs.image_size") as e:
            adapter.geometry(model.config, size)
        assert "\n" not in str(e.value)


# --- packed image features and logits -----------------------------------------------------------------
@pytest.mark.parametrize("size", SIZES_TO_CHECK)
def test_encode_images_equals_hf_packed_features(model, proc, adapter, size):
    geom = adapter.geometry(model.config, size)
    batch = _batch(proc, adapter, geom, QUESTIONS)
    assert batch["pixel_values"].shape == (2, geom.vision_images, 3, 32, 32)
    assert batch["image_sizes"].tolist() == [list(geom.image_size)] * 2
    assert (batch["input_ids"] == IMAGE).sum(1).tolist() == [geom.n_image_tokens] * 2
    with torch.no_grad():
        ours = adapter.encode_images(model, batch, geom)
        hf = model.model.get_image_features(batch["pixel_values"], batch["image_sizes"]).pooler_output
    assert ours.shape == (2, geom.n_image_tokens, 128)
    for b in range(2):
        torch.testing.assert_close(ours[b], hf[b], atol=1e-5, rtol=1e-5)
    # the newline embedding really sits at the end of every unpadded row
    rows, cols = geom.layout[2], geom.layout[3]
    ends = 64 + (cols + 1) * torch.arange(1, rows + 1) - 1
    assert torch.equal(ours[0, ends], model.model.image_newline.expand(rows, -1))


def test_keep_everything_equals_hf_logits(model, proc, adapter):
    geom = adapter.geometry(model.config, (40, 64))
    batch = _batch(proc, adapter, geom, QUESTIONS)
    mask = batch["attention_mask"]
    assert not bool(mask[1].all())  # the batch really is left-padded
    vlm = ReducedVLM(model, adapter, geom, (), (), IMAGE).eval()
    with torch.no_grad():
        (logits,) = vlm(*[batch[n] for n in vlm.input_names])
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        hf_batch = model(**batch, position_ids=positions).logits[:, -1]
        for b in range(2):
            hf = model(**adapter.sample_inputs(batch, b, geom)).logits[0, -1]
            torch.testing.assert_close(logits[b], hf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, hf_batch, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("K,rate", [(1, 0.75), (2, 0.5), (3, 0.25)])
def test_static_fastv_matches_reference(model, proc, adapter, K, rate):
    geom = adapter.geometry(model.config, (40, 64))
    cfg = FastVConfig(pruning_loc=K, rate=rate)
    vlm = ReducedVLM(model, adapter, geom, cfg.plan(geom, "sparse.special", Entering.start(geom)), (cfg,), IMAGE).eval()
    batch = _batch(proc, adapter, geom, QUESTIONS, seed=K)
    k = keep_count(geom.n_image_tokens, rate)
    with torch.no_grad():
        logits, kept = vlm(*[batch[n] for n in vlm.input_names])
    assert kept.shape == (2, k)
    assert not torch.equal(kept[0], kept[1])
    for b in range(2):
        ref_logits, ref_kept = fastv_reference(
            model, adapter, adapter.sample_inputs(batch, b, geom), image_token_id=IMAGE, pruning_loc=K, keep=k
        )
        assert torch.equal(kept[b], ref_kept)
        torch.testing.assert_close(logits[b], ref_logits, atol=1e-5, rtol=1e-5)


# --- a checkpoint directory -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model, proc) -> Path:
    d = tmp_path_factory.mktemp("ckpt") / "llava-next-tiny-hf"
    model.save_pretrained(str(d), safe_serialization=True)
    proc.save_pretrained(str(d))
    return d


def test_directory_loads(checkpoint, model):
    from tokcompile.models.loading import load_config, load_model, load_processor, model_type_of

    assert model_type_of(str(checkpoint)) == "llava_next"
    loaded = load_processor(str(checkpoint), False)
    assert type(loaded.image_processor).__name__ == "LlavaNextImageProcessorPil"
    assert loaded.image_processor.image_grid_pinpoints == PINPOINTS["tiny"]
    config = load_config(str(checkpoint), False)
    reloaded = load_model(str(checkpoint), config, 0, False)
    assert type(reloaded).__name__ == "LlavaNextForConditionalGeneration"
    ours, theirs = model.state_dict(), reloaded.state_dict()
    assert set(ours) == set(theirs)
    for name, t in ours.items():
        assert torch.equal(t, theirs[name]), name


def _recipe(checkpoint: Path, tmp_path: Path, **overrides) -> Path:
    recipe = {
        "model": {"type": "LlavaNextHf", "path": str(checkpoint)},
        "inputs": {"batch_size": 1, "image_size": [64, 32]},
        "quant": {"method": "RTN", "weight": {"bit": 4, "granularity": "per_group", "group_size": 64}},
        "sparse": {"method": "TokenReduction", "special": {"method": "FastV", "pruning_loc": 2, "rate": 0.5}},
        "save": {"save_path": str(tmp_path / "out")},
    }
    for key, value in overrides.items():
        section, field = key.split("__")
        recipe[section][field] = value
    path = tmp_path / "llava_next_dir.yml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_plan_on_checkpoint_directory(checkpoint, tmp_path):
    cmd = [sys.executable, str(ROOT / "compile.py"), str(_recipe(checkpoint, tmp_path)), "--plan"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "image 64x32 -> 208 image tokens" in res.stdout
    assert "fastv at decoder_layer 2: 208 -> 104" in res.stdout
    assert "image_newline" in res.stdout  # skipped by quantization with the tower and projector


def test_plan_errors_name_the_key(checkpoint, tmp_path):
    from tokcompile.errors import RecipeError
    from tokcompile.pipeline import plan_recipe

    with pytest.raises(RecipeError) as e:
        plan_recipe(_recipe(checkpoint, tmp_path, model__type="Qwen2VL"))
    assert e.value.key == "model.type" and "'llava_next'" in str(e.value) and "LlavaNextHf" in str(e.value)
    with pytest.raises(RecipeError) as e:
        plan_recipe(_recipe(checkpoint, tmp_path, inputs__image_size=[1, 64]))
    assert e.value.key == "inputs.image_size" and "elongated" in str(e.value) and "\n" not in str(e.value)
    assert plan_recipe(_recipe(checkpoint, tmp_path, model__type="Llava")).geometry.n_image_tokens == 208


# --- the tiny twin, compiled and answered -----------------------------------------------------------------
def test_tiny_twin_compiles_and_answers_other_sizes(tmp_path):
    from PIL import Image

    from tokcompile.runtime import load

    out = tmp_path / "tiny_llava_next"
    # ONNX only keeps this file within a few minutes; the recipe's AOTInductor target adds about 2 minutes.
    res = compile_recipe(TWIN, out, "--targets", "onnx")
    assert res.returncode == 0, res.stderr + res.stdout
    assert "parity passed" in res.stdout and "independent eager reference agrees" in res.stdout
    m = json.loads((out / "manifest.json").read_text())
    assert m["media"]["fixed_inputs"] == {"image_sizes": [40, 64]}
    assert m["media"]["resize_to_compiled"] is True
    assert [i["name"] for i in m["graphs"]["vision"]["inputs"]] == ["pixel_values", "image_sizes"]
    assert [i["name"] for i in m["graphs"]["prefill"]["inputs"]] == ["input_ids", "attention_mask", "image_embeds",
                                                                    "image_source"]
    assert m["schedule"][0]["n_in"] == 234 and m["schedule"][0]["n_out"] == 117
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] and report["artifacts"]["prefill.onnx"]["max_abs_diff"] < 1e-4

    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(97, 61), (30, 200)]]
    gen = load(out, "onnxruntime")
    answer = gen.generate(images, ["What is in the picture?", "Describe it."], max_new_tokens=4)
    assert len(answer.texts) == 2 and all(isinstance(t, str) for t in answer.texts)
    assert all(1 <= len(ids) <= 4 for ids in answer.token_ids)
    assert list(answer.kept) == ["kept_0"]
    for row in answer.kept["kept_0"]:
        assert len(row) == 117 and row == sorted(set(row)) and 0 <= row[0] and row[-1] < 234
