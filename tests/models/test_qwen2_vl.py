"""Qwen2-VL and Qwen2.5-VL: the static vision tower, M-RoPE positions, FastV, the real loading path (no
torchvision) and both tiny twins compiled end to end, each checked against HF's own code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import ROOT
from tokcompile.models import ADAPTERS, ReducedVLM
from tokcompile.models.tiny import build_model, build_processor
from tokcompile.parity import process, random_images
from tokcompile.reduce.base import Entering
from tokcompile.reduce.fastv import FastVConfig
from tokcompile.reference import fastv_reference

FAMILIES = ("qwen2_vl", "qwen2_5_vl")
QUESTIONS = ["What is shown in this image, in great detail please?", "Hi?"]


def _batch(q: SimpleNamespace, questions: list[str], seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return process(q.processor, q.adapter, q.geom, random_images(rng, len(questions), q.geom.image_size), questions)


@pytest.fixture(scope="module", params=FAMILIES)
def qwen(request) -> SimpleNamespace:
    family = request.param
    model = build_model(family, seed=0)
    adapter = ADAPTERS.get(family)()
    q = SimpleNamespace(family=family, model=model, processor=build_processor(family), adapter=adapter,
                        geom=adapter.geometry(model.config, None), image_id=adapter.image_token_id(model.config, None))
    q.batch = _batch(q, QUESTIONS)
    assert not bool(q.batch["attention_mask"][1].all())  # the batch really is (left) padded
    assert not bool(q.batch["attention_mask"][:, -1].eq(0).any())
    return q


def _run(q: SimpleNamespace, vlm: ReducedVLM, batch: dict) -> tuple:
    with torch.no_grad():
        return vlm(*[batch[n] for n in q.adapter.input_names])


# --- geometry ------------------------------------------------------------------------------------------------------


def test_geometry_matches_processor(qwen):
    g, b = qwen.geom, qwen.batch
    assert g.layout == (1, 8, 12) and g.n_image_tokens == 24 and g.vision_tokens == 96
    assert [row.tolist() for row in b["image_grid_thw"]] == [list(g.layout)] * 2
    assert b["pixel_values"].shape[0] == 2 * g.vision_tokens
    assert ((b["input_ids"] == qwen.image_id).sum(1) == g.n_image_tokens).all()
    assert torch.equal(b["mm_token_type_ids"].bool(), b["input_ids"] == qwen.image_id)
    assert g.n_kv_heads < g.n_heads  # GQA


@pytest.mark.parametrize("size,hint", [((450, 448), "[448, 448]"), ((28, 28), "[56, 56]"),
                                       ((4480, 4480), "[3584, 3584]")])
def test_geometry_rejects_sizes_the_processor_would_change(size, hint):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    from tokcompile.models.qwen2_vl import MAX_PIXELS, MIN_PIXELS
    from tokcompile.models.tiny import build_config

    config = build_config("qwen2_5_vl", "medium")  # patch 14, merge 2: the released checkpoints' factor 28
    with pytest.raises(ValueError, match=r"set inputs\.image_size to " + hint.replace("[", r"\[")) as e:
        ADAPTERS.get("qwen2_5_vl")().geometry(config, size)
    assert "\n" not in str(e.value)
    assert list(smart_resize(*size, 28, MIN_PIXELS, MAX_PIXELS)) == json.loads(hint)  # the hint is what HF does
    g = ADAPTERS.get("qwen2_5_vl")().geometry(config, None)
    assert g.image_size == (448, 448) and g.n_image_tokens == 256  # the default for real checkpoints


def test_processor_that_would_resize_is_a_recipe_error(qwen):
    """A processor whose max_pixels excludes the compiled size would change the grid: one line on image_size."""
    from transformers import Qwen2VLImageProcessorPil

    from tokcompile.errors import RecipeError
    from tokcompile.models.qwen2_vl import images_only_processor_class

    small = Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, min_pixels=32 * 32, max_pixels=64 * 64)
    proc = images_only_processor_class(qwen.family)(small, qwen.processor.tokenizer, qwen.processor.chat_template)
    q = SimpleNamespace(**{**vars(qwen), "processor": proc})
    with pytest.raises(RecipeError, match=r"^inputs\.image_size: .*\[1, 8, 12\].*1024\.\.4096") as e:
        _batch(q, ["Hi?"])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("family", FAMILIES)
def test_medium_size_for_benchmarks(family):
    """The benchmark size: 150-300M parameters and Qwen's real 448x448 -> 256 image tokens by default."""
    from tokcompile.models.tiny import build_config
    from tokcompile.models.tiny.qwen2_vl import model_class

    config = build_config(family, "medium")
    with torch.device("meta"):
        n = sum(p.numel() for p in model_class(family)(config).parameters())
    assert 150e6 <= n <= 300e6, n
    g = ADAPTERS.get(family)().geometry(config, None)
    assert g.image_size == (448, 448) and g.n_image_tokens == 256 and g.layout == (1, 32, 32)


# --- 1. keep everything == HF ----------------------------------------------------------------------------------------


def test_keep_everything_equals_hf(qwen):
    vlm = ReducedVLM(qwen.model, qwen.adapter, qwen.geom, (), (), qwen.image_id).eval()
    (logits,) = _run(qwen, vlm, qwen.batch)  # left-padded batch of 2
    worst = 0.0
    with torch.no_grad():
        for b in range(2):
            sample = qwen.adapter.sample_inputs(qwen.batch, b, qwen.geom)
            hf = qwen.model(**sample).logits[0, -1]
            (alone,) = _run(qwen, vlm, sample)
            torch.testing.assert_close(logits[b], hf, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(alone[0], hf, atol=1e-5, rtol=1e-5)
            worst = max(worst, float((logits[b] - hf).abs().max()))
    print(f"{qwen.family} keep-everything max |dlogit| {worst:.2e}")


# --- 2. M-RoPE positions == get_rope_index ---------------------------------------------------------------------------


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_mrope_positions_match_get_rope_index(qwen, padding_side):
    tok = qwen.processor.tokenizer
    old, tok.padding_side = tok.padding_side, padding_side
    try:
        batch = _batch(qwen, QUESTIONS, seed=3)
    finally:
        tok.padding_side = old
    a, g = qwen.adapter, qwen.geom
    start = (batch["input_ids"] == qwen.image_id).int().argmax(1)
    pos = a.initial_positions(batch, start, g)  # (B, T, 3)
    hf, deltas = qwen.model.model.get_rope_index(
        batch["input_ids"], batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"],
        attention_mask=batch["attention_mask"])  # (3, B, T)
    valid = batch["attention_mask"].bool()
    assert not bool(valid.all()) and bool(valid[:, -1].all()) == (padding_side == "left")
    vlm = ReducedVLM(qwen.model, a, g, (), (), qwen.image_id, with_cache=True).eval()
    next_position = _run(qwen, vlm, batch)[2]  # (B, 1) after logits and one cache mask
    for b in range(2):
        got = pos[b][valid[b]]  # (T_b, 3)
        assert torch.equal(got, hf[:, b][:, valid[b]].T)
        unpadded = a.hf_position_ids(qwen.model, a.sample_inputs(batch, b, g))  # (3, 1, T_b)
        assert torch.equal(got, unpadded[:, 0].T)
        assert int(next_position[b]) == int(hf[:, b][:, valid[b]].max()) + 1 == int(deltas[b]) + int(valid[b].sum())
    # The image really spans a non-square (h, w) grid: rows differ inside it and text after it jumps.
    img = pos[0][batch["input_ids"][0] == qwen.image_id]  # (N, 3)
    assert not torch.equal(img[:, 1], img[:, 2]) and int(img[:, 1].max() - img[:, 1].min()) == 3
    assert int(img[:, 2].max() - img[:, 2].min()) == 5


def test_cached_decode_equals_hf_generate(qwen):
    """Prefill plus cached decode steps (positions continuing from the M-RoPE maximum) give HF generate's logits."""
    from tokcompile.generation import GenerationConfig, generate
    from tokcompile.graphs import eager_runners
    from tokcompile.models import DecodeStep

    a, g = qwen.adapter, qwen.geom
    vlm = ReducedVLM(qwen.model, a, g, (), (), qwen.image_id, with_cache=True).eval()
    step = DecodeStep(qwen.model, a, g, vlm.layout).eval()
    sample = a.sample_inputs(qwen.batch, 1, g)
    with torch.no_grad():
        ours = generate(*eager_runners(vlm, step), sample, layout=vlm.layout, cfg=GenerationConfig(max_new_tokens=5),
                        keep_logits=True)
        hf = qwen.model.generate(**sample, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
    assert torch.equal(ours.tokens[0], hf.sequences[0, sample["input_ids"].shape[1]:])
    for t, logits in enumerate(hf.logits):
        torch.testing.assert_close(ours.step_logits[t][0], logits[0], atol=1e-5, rtol=1e-5)


def test_decode_positions_repeat_the_text_position(qwen):
    p = torch.tensor([[7], [11]])
    assert qwen.adapter.decode_positions(p).tolist() == [[[7, 7, 7]], [[11, 11, 11]]]


# --- 3. static FastV == the independent reference --------------------------------------------------------------------


@pytest.mark.parametrize("pruning_loc,rate", [(1, 0.5), (3, 0.75)])
def test_static_fastv_matches_reference(qwen, pruning_loc, rate):
    cfg = FastVConfig(pruning_loc=pruning_loc, rate=rate)
    schedule = cfg.plan(qwen.geom, "sparse.special", Entering.start(qwen.geom))
    vlm = ReducedVLM(qwen.model, qwen.adapter, qwen.geom, schedule, (cfg,), qwen.image_id).eval()
    logits, kept = _run(qwen, vlm, qwen.batch)
    assert kept.shape == (2, schedule[0].n_out)
    for b in range(2):
        ref_logits, ref_kept = fastv_reference(
            qwen.model, qwen.adapter, qwen.adapter.sample_inputs(qwen.batch, b, qwen.geom),
            image_token_id=qwen.image_id, pruning_loc=pruning_loc, keep=schedule[0].n_out)
        assert torch.equal(kept[b], ref_kept)
        torch.testing.assert_close(logits[b], ref_logits, atol=1e-5, rtol=1e-5)
        print(f"{qwen.family} FastV K={pruning_loc} R={rate} row {b}: max |dlogit| "
              f"{float((logits[b] - ref_logits).abs().max()):.2e}")


# --- 4. the static vision tower == HF's get_image_features ------------------------------------------------------------


def test_vision_features_equal_hf(qwen):
    b = qwen.batch
    with torch.no_grad():
        ours = qwen.adapter.vision_features(qwen.model, b["pixel_values"], 2, qwen.geom)[0]  # (2, N, D)
        hf = qwen.model.model.get_image_features(b["pixel_values"], b["image_grid_thw"]).pooler_output
    assert len(hf) == 2 and not torch.allclose(hf[0], hf[1])
    for i in range(2):
        torch.testing.assert_close(ours[i], hf[i], atol=1e-5, rtol=1e-5)


def test_host_constants_equal_hf_helpers():
    """Vision rotary positions and the window permutation equal HF's own grid helpers (uneven windows here)."""
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    from tokcompile.models.qwen2_vl import vision_positions, window_layout

    for grid in [(1, 8, 12), (1, 10, 6), (1, 32, 32)]:
        thw = torch.tensor([grid])
        assert np.array_equal(vision_positions(*grid, 2), get_vision_position_ids(thw, 2).numpy())
        for window_px, patch in [(48, 8), (112, 14)]:
            order, ids = window_layout(*grid, 2, window_px // 2 // patch)
            hf_order, cu = get_vision_window_index(thw, 2, window_px, patch)
            assert np.array_equal(order, hf_order.numpy())
            sizes = np.bincount(ids) * 4  # patches per window, in order
            assert np.array_equal(np.cumsum(sizes), cu.numpy()[1:])
    assert len(set(np.bincount(window_layout(1, 8, 12, 2, 3)[1]).tolist())) > 1  # the tiny grid's windows differ


# --- 5. the real loading path -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, qwen) -> Path:
    """The tiny model laid out like a released checkpoint: safetensors, config.json, tokenizer files,
    preprocessor_config.json and chat_template.json."""
    d = tmp_path_factory.mktemp("ckpt") / f"{qwen.family}-tiny"
    qwen.model.save_pretrained(str(d), safe_serialization=True)
    qwen.processor.tokenizer.save_pretrained(str(d))
    qwen.processor.image_processor.save_pretrained(str(d))
    (d / "chat_template.json").write_text(json.dumps({"chat_template": qwen.processor.chat_template}))
    assert (d / "preprocessor_config.json").is_file() and not (d / "processor_config.json").exists()
    return d


@pytest.mark.parametrize("autoprocessor_fails", [False, True])
def test_checkpoint_directory_loads_without_torchvision(checkpoint, qwen, monkeypatch, autoprocessor_fails):
    import transformers

    from tokcompile.models.loading import load_config, load_model, load_processor, model_type_of

    if autoprocessor_fails:  # what a machine without torchvision sees, whatever this one has
        def fail(*args, **kwargs):
            raise ImportError("Qwen2VLVideoProcessor requires the Torchvision library")

        monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", fail)
    path = str(checkpoint)
    assert model_type_of(path) == qwen.family
    proc = load_processor(path, False)
    assert type(proc.image_processor).__name__.endswith("Pil") or not autoprocessor_fails
    assert proc.image_processor.patch_size == qwen.processor.image_processor.patch_size
    assert proc.chat_template == qwen.processor.chat_template
    q2 = SimpleNamespace(**{**vars(qwen), "processor": proc})
    got, want = _batch(q2, QUESTIONS), qwen.batch
    for name in qwen.adapter.input_names:
        assert torch.equal(got[name], want[name]), name
    model = load_model(path, load_config(path, False), 0, False)
    assert type(model).__name__ == qwen.adapter.model_class_name
    for (n, a), (_, b) in zip(model.state_dict().items(), qwen.model.state_dict().items()):
        assert torch.equal(a, b), n


def test_plan_on_checkpoint_and_wrong_type(checkpoint, qwen, tmp_path, capsys):
    from tokcompile.cli import main

    recipe = {
        "model": {"type": qwen.adapter.lightcompress_types[0], "path": str(checkpoint)},
        "inputs": {"image_size": [64, 128]},
        "sparse": {"method": "TokenReduction", "special": {"method": "FastV", "pruning_loc": 2, "rate": 0.5}},
    }
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump(recipe))
    assert main([str(path), "--plan"]) == 0
    out = capsys.readouterr().out
    assert f"[{qwen.family}]" in out and "image 64x128 -> 32 image tokens" in out and "32 -> 16" in out

    other = "Qwen2_5VL" if qwen.family == "qwen2_vl" else "Qwen2VL"
    for bad, key in [({"model": {**recipe["model"], "type": other}}, "model.type"),
                     ({"inputs": {"image_size": [64, 100]}}, "inputs.image_size")]:
        path.write_text(yaml.safe_dump({**recipe, **bad}))
        assert main([str(path), "--plan"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {key}: ") and len(err.splitlines()) == 1, err


def test_wrong_type_and_vision_site_messages(checkpoint, qwen, tmp_path, monkeypatch):
    """A wrong model.type names the accepted types; a vision-side method gets the plan's "does not support"."""
    from dataclasses import dataclass
    from typing import ClassVar

    from tokcompile.errors import RecipeError
    from tokcompile.pipeline import plan_recipe
    from tokcompile.reduce import REDUCERS
    from tokcompile.reduce.schedule import Site

    path = tmp_path / "r.yml"
    other = "Qwen2_5VL" if qwen.family == "qwen2_vl" else "Qwen2VL"
    path.write_text(yaml.safe_dump({"model": {"type": other, "path": str(checkpoint)}}))
    with pytest.raises(RecipeError) as e:
        plan_recipe(path)
    msg = str(e.value)
    assert msg.startswith("model.type: ") and f"model_type '{qwen.family}'" in msg
    assert qwen.adapter.lightcompress_types[0] in msg

    @dataclass(frozen=True)
    class VisionSide:
        method: ClassVar[str] = "ToMeVision"
        sites: ClassVar[frozenset[Site]] = frozenset({Site.VISION_BLOCK})

    monkeypatch.setitem(REDUCERS._entries, "tomevision", VisionSide)
    path.write_text(yaml.safe_dump({"model": {"path": str(checkpoint)},
                                    "sparse": {"method": "TokenReduction", "special": {"method": "ToMeVision"}}}))
    with pytest.raises(RecipeError) as e:
        plan_recipe(path)
    assert str(e.value) == (f"sparse.special.method: ToMeVision runs inside the vision blocks, which {qwen.family} "
                            "does not support: Qwen's 2x2 patch merger needs the full patch grid (and Qwen2.5-VL's "
                            "window attention a fixed window layout), so tokens cannot leave inside the vision tower")


# --- 6. end to end ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compiles(tmp_path_factory):
    """Both tiny twins compiling at once, in two processes: Qwen2-VL to ONNX, Qwen2.5-VL to ONNX and AOTInductor.
    Yields family -> (export dir, process, log files)."""
    root = tmp_path_factory.mktemp("qwen_e2e")
    extra = {"qwen2_vl": ["--targets", "onnx"], "qwen2_5_vl": []}
    running = {}
    for family in FAMILIES:
        out, logs = root / family, (root / f"{family}.out", root / f"{family}.err")
        cmd = [sys.executable, str(ROOT / "compile.py"), str(ROOT / "recipes" / "tiny" / f"{family}.yml"),
               "--out", str(out), *extra[family]]
        with open(logs[0], "w") as so, open(logs[1], "w") as se:  # files, not pipes: nobody reads them meanwhile
            running[family] = (out, subprocess.Popen(cmd, cwd=ROOT, stdout=so, stderr=se, text=True), logs)
    yield running
    for _, p, _ in running.values():
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.fixture(scope="module", autouse=True)
def _compile_early(request):
    """Start the end-to-end compiles with this module's first test when they are selected, so that the two
    subprocesses overlap the in-process tests."""
    if any("compiles" in item.fixturenames for item in request.session.items if item.module is request.module):
        request.getfixturevalue("compiles")


def _finished(compiles, family: str) -> tuple[Path, int, str, str]:
    out, p, (so, se) = compiles[family]
    code = p.wait(timeout=900)
    return out, code, so.read_text(), se.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_twin_compiles_and_answers(compiles, family):
    import onnx
    from PIL import Image

    from tokcompile.runtime import load

    out, code, stdout, stderr = _finished(compiles, family)
    assert code == 0, stderr + stdout
    assert "parity passed" in stdout and "independent eager reference agrees" in stdout
    m = json.loads((out / "manifest.json").read_text())
    assert m["media"]["fixed_inputs"] == {"image_grid_thw": [1, 8, 12]} and m["media"]["resize_to_compiled"]
    vision, prefill = m["graphs"]["vision"]["inputs"], m["graphs"]["prefill"]["inputs"]
    assert [i["name"] for i in vision] == ["pixel_values", "image_grid_thw"]
    assert [i["name"] for i in prefill] == ["input_ids", "attention_mask", "mm_token_type_ids", "image_embeds",
                                            "image_source"]
    assert {i["name"]: i["shape"] for i in vision}["pixel_values"] == ["batch * 96", 384]
    for name, io in (("vision", vision), ("prefill", prefill)):  # unused inputs are kept
        graph = onnx.load(str(out / f"{name}.onnx"), load_external_data=False)
        assert [i.name for i in graph.graph.input] == [i["name"] for i in io]
    p = json.loads((out / "parity.json").read_text())
    targets = ["onnx"] if family == "qwen2_vl" else ["onnx", "aoti"]
    assert set(p["artifacts"]) == {f"{g}.{t}" for g in ("vision", "prefill", "decode") for t in targets}
    for name, rep in p["artifacts"].items():
        assert rep["passed"] and rep["max_abs_diff"] < 1e-4, name
    print(f"{family} parity: " + ", ".join(f"{k} {v['max_abs_diff']:.2e}" for k, v in p["artifacts"].items())
          + f"; reference {p['reference']['max_abs_diff']:.2e}")

    rng = np.random.default_rng(5)
    image = Image.fromarray(rng.integers(0, 256, (150, 210, 3)).astype("uint8"))  # not the compiled 64x96
    answers = {}
    for backend in ["onnxruntime"] + (["aoti"] if "aoti" in targets else []):
        ans = load(out, backend, trust_export=True).generate([image], ["What is in this picture?"], max_new_tokens=6)
        assert isinstance(ans.texts[0], str) and len(ans.token_ids[0]) >= 1
        kept = ans.kept["kept_0"][0]
        assert len(kept) == 12 and kept == sorted(set(kept)) and 0 <= kept[0] and kept[-1] < 24
        answers[backend] = (ans.token_ids, ans.kept)
    assert len({json.dumps(v) for v in answers.values()}) == 1  # every backend answers alike
