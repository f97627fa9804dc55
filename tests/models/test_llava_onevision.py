"""LLaVA-OneVision: anyres image packing and pooled video features as static graphs, against HF's own model,
processor and the independent FastV reference; the real loading path; both tiny twins end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tokcompile.errors import RecipeError
from tokcompile.models import ADAPTERS, ReducedVLM
from tokcompile.models.llava_onevision import anyres_layout, video_pixels, video_settings
from tokcompile.models.tiny import build_model, build_processor
from tokcompile.parity import process, random_images
from tokcompile.reduce.base import Entering
from tokcompile.reduce.fastv import FastVConfig
from tokcompile.reference import fastv_reference

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "tiny"
IMAGE_SIZE = (40, 56)  # the tiny image recipe's resolution: 2x2 grid, unpadded, then downsampled
QUESTIONS = ["What is shown here in this picture, in detail?", "Hi?"]


E2E_TEST = "test_tiny_twins_compile_and_answer"


@pytest.fixture(scope="module", autouse=True)
def compiles(request, tmp_path_factory):
    """Both tiny twins compile in the background (one process each) while the in-process tests run, when the
    end-to-end test is selected; whatever still runs at teardown is stopped."""
    root = tmp_path_factory.mktemp("ov_e2e")
    jobs: dict[str, subprocess.Popen] = {}
    if any(item.name == E2E_TEST for item in request.session.items):
        for name in ("llava_onevision", "llava_onevision_video"):
            # ONNX only, for CI time: AOTInductor is compiled in CI on LLaVA-1.5, Qwen2.5-VL and the methods'
            # twins (the recipe itself asks for both)
            cmd = [sys.executable, str(ROOT / "compile.py"), str(TINY / f"{name}.yml"), "--out", str(root / name),
                   "--targets", "onnx"]
            with open(root / f"{name}.log", "w") as log:
                jobs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    yield root, jobs
    for job in jobs.values():
        if job.poll() is None:
            job.kill()
            job.wait()


@pytest.fixture(scope="module")
def exports(compiles) -> dict[str, Path]:
    root, jobs = compiles
    for name, job in jobs.items():
        job.wait(timeout=900)
        log = (root / f"{name}.log").read_text()
        assert job.returncode == 0, log
        assert "parity passed" in log
    return {name: root / name for name in jobs}


@pytest.fixture(scope="module")
def model():
    return build_model("llava_onevision", seed=0)


@pytest.fixture(scope="module")
def processor():
    return build_processor("llava_onevision")


@pytest.fixture(scope="module")
def adapter():
    return ADAPTERS.get("llava_onevision")()


def image_batch(processor, adapter, geom, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random images of other sizes than the compiled one (resized by `prepare_images`), two prompt lengths."""
    images = random_images(np.random.default_rng(seed), len(QUESTIONS), (geom.image_size[0] + 9, geom.image_size[1]))
    return process(processor, adapter, geom, images, QUESTIONS)


def video_batch(processor, adapter, geom, seed: int = 0) -> dict[str, torch.Tensor]:
    videos = adapter.random_media(np.random.default_rng(seed), len(QUESTIONS), geom)
    return process(processor, adapter, geom, videos, QUESTIONS)


@pytest.fixture(scope="module")
def image_case(model, processor, adapter):
    geom = adapter.geometry(model.config, IMAGE_SIZE)
    return geom, image_batch(processor, adapter, geom)


@pytest.fixture(scope="module")
def video_case(model, processor, adapter):
    geom = adapter.geometry(model.config, None, video_frames=4)
    return geom, video_batch(processor, adapter, geom)


@pytest.fixture(params=["image", "video"])
def case(request, image_case, video_case):
    return image_case if request.param == "image" else video_case


# --- geometry and features ---------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(40, 56), (56, 40), (32, 32), (30, 90), (64, 64)])
def test_geometry_and_features_equal_hf(model, processor, adapter, size):
    geom = adapter.geometry(model.config, size)
    batch = image_batch(processor, adapter, geom)
    n = (batch["input_ids"] == model.config.image_token_id).sum(1)
    assert n.tolist() == [geom.n_image_tokens] * 2  # the processor's own placeholder expansion
    assert batch["pixel_values"].shape[1] == geom.vision_images  # base tile + grid tiles
    assert batch["image_sizes"].tolist() == [list(size)] * 2
    with torch.no_grad():
        ours = adapter.encode_images(model, batch, geom)  # (B, N, D)
        hf = model.model.get_image_features(batch["pixel_values"], batch["image_sizes"]).pooler_output
    assert ours.shape[1] == geom.n_image_tokens
    for b in range(2):
        torch.testing.assert_close(ours[b], hf[b], atol=1e-5, rtol=1e-5)


def test_layouts_cover_both_packing_paths(model):
    down = anyres_layout(model.config, (40, 56))
    assert down.grid == (2, 2) and down.rows == (2, 14) and down.cols == (0, 16)  # 16x16 map, rows unpadded
    assert down.downsample and down.out == (9, 13) and down.n_tokens == 64 + 9 * 14
    plain = anyres_layout(model.config, (32, 32))
    assert plain.grid == (1, 1) and not plain.downsample and plain.n_tokens == 64 + 8 * 9


def test_video_geometry_and_features_equal_hf(model, adapter, video_case):
    geom, batch = video_case
    assert geom.media == "video" and geom.vision_images == 4 and geom.layout == (4, 4, 4)
    assert adapter.input_names_for(geom) == ("input_ids", "attention_mask", "pixel_values_videos")
    vid = adapter.image_token_id(model.config, geom)
    assert vid == model.config.video_token_id != model.config.image_token_id
    assert (batch["input_ids"] == vid).sum(1).tolist() == [geom.n_image_tokens] * 2 == [4 * 16 + 1] * 2
    assert tuple(batch["pixel_values_videos"].shape) == (2, 4, 3, 32, 32)
    with torch.no_grad():
        ours = adapter.encode_images(model, batch, geom)
        hf = model.model.get_video_features(batch["pixel_values_videos"]).pooler_output
    torch.testing.assert_close(ours, hf, atol=1e-5, rtol=1e-5)


def test_video_pixels_follow_the_video_processor_math(processor):
    """HF's video processor (torchvision, not installed here) maps each uint8 frame x, resized to its size, to
    (x - mean/rescale_factor) / (std/rescale_factor) in float32; frames at that size are not resampled."""
    s = video_settings(processor)
    assert s["size"] == {"height": 32, "width": 32} and s["resample"] == 3  # bicubic, as the video processor
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    got = video_pixels(processor, [Image.fromarray(a) for a in arrays])  # (F, 3, 32, 32)
    mean = torch.tensor(s["image_mean"], dtype=torch.float32)[:, None, None] / s["rescale_factor"]
    std = torch.tensor(s["image_std"], dtype=torch.float32)[:, None, None] / s["rescale_factor"]
    want = (torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() - mean) / std
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    # Another frame size: resized with PIL's kernel of the same resampling filter, then the same affine map.
    big = Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8))
    resized = np.asarray(big.resize((32, 32), resample=Image.Resampling(s["resample"])))
    want = (torch.from_numpy(resized).permute(2, 0, 1).float() - mean) / std
    torch.testing.assert_close(video_pixels(processor, [big])[0], want, atol=1e-5, rtol=1e-6)
    # A frame and a tile-size image go through the PIL backend identically (the image's base tile).
    tile = processor.image_processor([Image.fromarray(arrays[0])], return_tensors="pt")["pixel_values"][0, 0]
    assert torch.equal(video_pixels(processor, [Image.fromarray(arrays[0])])[0], tile)


# --- ReducedVLM against HF ---------------------------------------------------------------------------------
def test_keep_everything_equals_hf_forward(model, adapter, case):
    geom, batch = case
    vlm = ReducedVLM(model, adapter, geom, (), (), adapter.image_token_id(model.config, geom)).eval()
    names = vlm.input_names
    assert not bool(batch["attention_mask"][1].all())  # the batch is left-padded
    with torch.no_grad():
        (logits,) = vlm(*[batch[n] for n in names])
        for b in range(2):
            sample = adapter.sample_inputs(batch, b, geom)
            hf = model(**sample).logits[0, -1]
            torch.testing.assert_close(logits[b], hf, atol=1e-5, rtol=1e-5)
            (alone,) = vlm(*[sample[n] for n in names])
            torch.testing.assert_close(alone[0], hf, atol=1e-5, rtol=1e-5)


def test_static_fastv_matches_reference(model, adapter, case):
    geom, batch = case
    cfg = FastVConfig(pruning_loc=2, rate=0.5)
    schedule = cfg.plan(geom, "sparse.special", Entering.start(geom))
    token = adapter.image_token_id(model.config, geom)
    vlm = ReducedVLM(model, adapter, geom, schedule, (cfg,), token).eval()
    with torch.no_grad():
        logits, kept = vlm(*[batch[n] for n in vlm.input_names])
    assert kept.shape == (2, schedule[0].n_out) and schedule[0].n_out < geom.n_image_tokens
    for b in range(2):
        ref_logits, ref_kept = fastv_reference(model, adapter, adapter.sample_inputs(batch, b, geom),
                                               image_token_id=token, pruning_loc=2, keep=schedule[0].n_out)
        assert torch.equal(kept[b], ref_kept)
        torch.testing.assert_close(logits[b], ref_logits, atol=1e-5, rtol=1e-5)


# --- loading, plan and errors ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model, processor) -> Path:
    d = tmp_path_factory.mktemp("ov_ckpt") / "llava-onevision-tiny-hf"
    model.save_pretrained(str(d), safe_serialization=True)
    processor.save_pretrained(str(d))
    return d


def test_checkpoint_directory_loads_and_plans(checkpoint, model, processor, tmp_path, capsys):
    from tokcompile.cli import main
    from tokcompile.models.loading import load_config, load_model, load_processor, model_type_of

    path = str(checkpoint)
    assert model_type_of(path) == "llava_onevision"
    proc = load_processor(path, False)
    assert type(proc.image_processor).__name__ == "LlavaOnevisionImageProcessorPil"
    assert video_settings(proc) == video_settings(processor)
    loaded = load_model(path, load_config(path, False), 0, False)
    for (n, a), (_, b) in zip(loaded.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), n
    recipe = {"model": {"type": "Llava_OneVision", "path": path}, "inputs": {"image_size": [40, 56]},
              "sparse": {"method": "TokenReduction", "special": {"method": "FastV", "pruning_loc": 2, "rate": 0.5}}}
    (tmp_path / "ov.yml").write_text(yaml.safe_dump(recipe))
    assert main([str(tmp_path / "ov.yml"), "--plan"]) == 0
    assert "image 40x56 -> 190 image tokens" in capsys.readouterr().out


def test_hf_layout_processor_directory_loads(checkpoint, processor, adapter, image_case, tmp_path):
    """A directory as HF's LlavaOnevisionProcessor saves it (separate image and video preprocessor configs)."""
    d = tmp_path / "hf"
    d.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (d / f).write_bytes((checkpoint / f).read_bytes())
    image_cfg = {**processor.image_processor.to_dict(), "image_processor_type": "LlavaOnevisionImageProcessor"}
    (d / "preprocessor_config.json").write_text(json.dumps(image_cfg))
    (d / "processor_config.json").write_text(json.dumps({
        "processor_class": "LlavaOnevisionProcessor", "num_image_tokens": 64, "vision_feature_select_strategy": "full",
        "vision_aspect_ratio": "anyres_max_2", "image_token": "<image>", "video_token": "<video>"}))
    (d / "video_preprocessor_config.json").write_text(json.dumps({
        "video_processor_type": "LlavaOnevisionVideoProcessor", "size": {"height": 32, "width": 32},
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 3}))
    proc = adapter.load_processor(str(d))
    assert video_settings(proc)["image_mean"] == [0.5, 0.5, 0.5]
    geom, batch = image_case
    again = image_batch(proc, adapter, geom)
    assert all(torch.equal(again[n], batch[n]) for n in adapter.input_names_for(geom))


def _plan(tmp_path: Path, model: dict, inputs: dict):
    from tokcompile.plan import resolve
    from tokcompile.recipe import load_recipe

    (tmp_path / "r.yml").write_text(yaml.safe_dump({"model": model, "inputs": inputs}))
    return resolve(load_recipe(tmp_path / "r.yml"))


def test_clear_errors(tmp_path, model, adapter):
    with pytest.raises(RecipeError, match="^model.type: 'Qwen2VL' does not match .*Llava_OneVision"):
        _plan(tmp_path, {"type": "Qwen2VL", "path": "tiny-random:llava_onevision"}, {})
    with pytest.raises(RecipeError, match="^inputs.video_frames: llava takes images only"):
        _plan(tmp_path, {"path": "tiny-random:llava"}, {"video_frames": 4})
    with pytest.raises(RecipeError, match="^inputs.image_size: a video export runs at .* 32x32"):
        _plan(tmp_path, {"path": "tiny-random:llava_onevision"}, {"video_frames": 4, "image_size": [40, 56]})
    plan = _plan(tmp_path, {"type": "LlavaOnevision", "path": "tiny-random:llava_onevision"}, {"video_frames": 2})
    assert plan.geometry.n_image_tokens == 2 * 16 + 1 and plan.image_token_id == model.config.video_token_id
    cfg = build_model("llava_onevision").config
    cfg.vision_feature_select_strategy = "default"
    with pytest.raises(ValueError, match="only 'full' checkpoints compile"):
        adapter.geometry(cfg, None)


# --- end to end ----------------------------------------------------------------------------------------------
def test_tiny_twins_compile_and_answer(exports):
    from tokcompile.runtime import load

    m = json.loads((exports["llava_onevision"] / "manifest.json").read_text())
    assert m["media"]["fixed_inputs"] == {"image_sizes": [40, 56]}
    assert set(m["backends"]) == {"onnxruntime"}
    gen = load(exports["llava_onevision"], "onnxruntime")
    rng = np.random.default_rng(3)
    other = random_images(rng, 1, (70, 50))[0]  # resized to 40x56 by the runtime
    ans = gen.generate([other], ["What is this?"], max_new_tokens=4, stop_at_eos=False)
    assert len(ans.token_ids[0]) == 4 and len(ans.kept["kept_0"][0]) == 95

    vm = json.loads((exports["llava_onevision_video"] / "manifest.json").read_text())
    assert vm["media"]["kind"] == "video" and vm["media"]["fixed_inputs"] == {}
    assert [i["name"] for i in vm["graphs"]["vision"]["inputs"]] == ["pixel_values_videos"]
    assert [i["name"] for i in vm["graphs"]["prefill"]["inputs"]] == ["input_ids", "attention_mask", "image_embeds",
                                                                       "image_source"]
    vgen = load(exports["llava_onevision_video"], "onnxruntime")
    array = rng.integers(0, 256, (4, 20, 30, 3), dtype=np.uint8)  # frames resized to 32x32 by `process`
    frames = [Image.fromarray(f) for f in array]
    ans = vgen.generate([frames, array], ["What happens?"] * 2, max_new_tokens=3, stop_at_eos=False)
    kept = ans.kept["kept_0"]
    assert [len(t) for t in ans.token_ids] == [3, 3] and [len(k) for k in kept] == [32, 32]
    assert ans.token_ids[0] == ans.token_ids[1] and kept[0] == kept[1]  # array == its PIL frames
    with pytest.raises(RecipeError, match="exactly 4 frames, got one of 3"):
        vgen.generate([random_images(rng, 3, (48, 40))], ["Too short?"], max_new_tokens=1)
