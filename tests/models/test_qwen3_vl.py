"""Qwen3-VL: nothing pruned equals HF's forward (DeepStack included), FastV and DivPrune gather the DeepStack
features with the image tokens and equal independent references built on HF's own DeepStack step, merges before
the DeepStack layers are refused, the real loading path, and the tiny recipe compiled end to end."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import ROOT, compile_recipe
from tests.references.qwen3_vl import divprune_reference_qwen3, full_reference_qwen3
from tokcompile.errors import RecipeError
from tokcompile.models import ADAPTERS, ReducedVLM
from tokcompile.models.tiny import build_model, build_processor
from tokcompile.parity import process
from tokcompile.pipeline import plan_recipe
from tokcompile.reduce.base import Entering
from tokcompile.reduce.divprune import DivPruneConfig
from tokcompile.reduce.fastv import FastVConfig
from tokcompile.reference import fastv_reference

QUESTIONS = ["What is shown in this image, in great detail please?", "Hi?"]


@pytest.fixture(scope="module")
def qwen3() -> SimpleNamespace:
    model = build_model("qwen3_vl", seed=0)
    adapter = ADAPTERS.get("qwen3_vl")()
    geom = adapter.geometry(model.config, None)
    q = SimpleNamespace(model=model, adapter=adapter, geom=geom, processor=build_processor("qwen3_vl"),
                        image_id=adapter.image_token_id(model.config, geom))
    rng = np.random.default_rng(0)
    q.batch = process(q.processor, adapter, geom, adapter.random_media(rng, 2, geom), QUESTIONS)
    assert not bool(q.batch["attention_mask"][1].all())  # padded
    return q


def _run(q, schedule=(), reducers=()) -> dict:
    vlm = ReducedVLM(q.model, q.adapter, q.geom, schedule, reducers, q.image_id).eval()
    with torch.no_grad():
        return vlm.run(q.batch)


def test_geometry_has_three_side_streams(qwen3):
    g = qwen3.geom
    assert (g.layout, g.n_image_tokens, g.vision_tokens, g.side_streams, g.head_dim) == ((1, 8, 12), 24, 96, 3, 32)
    vlm = ReducedVLM(qwen3.model, qwen3.adapter, g, (), (), qwen3.image_id)
    assert vlm.layout.vision.outputs == ("image_embeds", "image_source", "image_side_0", "image_side_1",
                                         "image_side_2")
    assert vlm.layout.prefill.inputs[-3:] == ("image_side_0", "image_side_1", "image_side_2")


def test_host_constants_equal_hf_helpers():
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    from tokcompile.models.qwen3_vl import position_taps

    for (h, w), side in [((8, 12), 6), ((16, 16), 48), ((6, 10), 7), ((24, 32), 48)]:
        idx, weights = get_vision_interpolation_indices_and_weights(
            torch.tensor([[1, h, w]]), num_grid_per_side=side, mode="bilinear", align_corners=True,
            spatial_merge_size=2)
        taps, ours = position_taps(h, w, 2, side)
        assert np.array_equal(taps, idx.numpy()) and np.array_equal(ours, weights.numpy()), (h, w, side)


def test_nothing_pruned_equals_hf(qwen3):
    out = _run(qwen3)
    for b in range(2):
        sample = qwen3.adapter.sample_inputs(qwen3.batch, b, qwen3.geom)
        with torch.no_grad():
            ref = full_reference_qwen3(qwen3.model, sample, qwen3.image_id)
        torch.testing.assert_close(out["logits"][b], ref, atol=1e-5, rtol=1e-5)


def test_deepstack_matters(qwen3):
    """The side streams change the answer: without them the logits move (so the tests above can fail)."""
    vlm = ReducedVLM(qwen3.model, qwen3.adapter, qwen3.geom, (), (), qwen3.image_id).eval()
    with torch.no_grad():
        seen = vlm.vision.run({n: qwen3.batch[n] for n in vlm.layout.vision.inputs})
        feed = {n: qwen3.batch[n] if n in qwen3.batch else seen[n] for n in vlm.layout.prefill.inputs}
        with_side = vlm.prefill.run(feed)["logits"]
        feed.update({n: torch.zeros_like(seen[n]) for n in ("image_side_0", "image_side_1", "image_side_2")})
        without = vlm.prefill.run(feed)["logits"]
    assert (with_side - without).abs().max() > 1e-3


@pytest.mark.parametrize(("pruning_loc", "rate"), [(1, 0.5), (2, 0.75), (3, 0.5)])
def test_static_fastv_gathers_deepstack_and_matches_reference(qwen3, pruning_loc, rate):
    cfg = FastVConfig(pruning_loc=pruning_loc, rate=rate)
    schedule = cfg.plan(qwen3.geom, "sparse", Entering.start_for(qwen3.geom, qwen3.adapter))
    out = _run(qwen3, schedule, (cfg,))
    keep = schedule[0].n_out
    for b in range(2):
        sample = qwen3.adapter.sample_inputs(qwen3.batch, b, qwen3.geom)
        ref_logits, ref_kept = fastv_reference(qwen3.model, qwen3.adapter, sample, image_token_id=qwen3.image_id,
                                               pruning_loc=pruning_loc, keep=keep)
        assert torch.equal(out["kept_0"][b], ref_kept)
        torch.testing.assert_close(out["logits"][b], ref_logits, atol=1e-5, rtol=1e-5)


def test_fastv_reference_keeping_everything_equals_hf(qwen3):
    sample = qwen3.adapter.sample_inputs(qwen3.batch, 0, qwen3.geom)
    logits, kept = fastv_reference(qwen3.model, qwen3.adapter, sample, image_token_id=qwen3.image_id,
                                   pruning_loc=2, keep=qwen3.geom.n_image_tokens)
    assert kept.tolist() == list(range(qwen3.geom.n_image_tokens))
    torch.testing.assert_close(logits, full_reference_qwen3(qwen3.model, sample, qwen3.image_id), atol=1e-5,
                               rtol=1e-5)


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_static_divprune_gathers_deepstack_and_matches_reference(qwen3, ratio):
    cfg = DivPruneConfig(reduction_ratio=ratio)
    schedule = cfg.plan(qwen3.geom, "sparse", Entering.start_for(qwen3.geom, qwen3.adapter))
    out = _run(qwen3, schedule, (cfg,))
    for b in range(2):
        sample = qwen3.adapter.sample_inputs(qwen3.batch, b, qwen3.geom)
        ref_logits, ref_kept = divprune_reference_qwen3(qwen3.model, sample, image_token_id=qwen3.image_id,
                                                        reduction_ratio=ratio)
        assert torch.equal(out["kept_0"][b], ref_kept)
        torch.testing.assert_close(out["logits"][b], ref_logits, atol=1e-5, rtol=1e-5)


def _recipe(tmp_path, special: dict) -> object:
    recipe = {"model": {"path": "tiny-random:qwen3_vl"}, "inputs": {"batch_size": 2, "max_prompt_len": 64},
              "sparse": {"method": "TokenReduction", "special": special}}
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize("special", [
    {"method": "AIM", "merge_ratio": 0.5, "prune_scheduler": "piecewise", "prune_start_layer": 1,
     "prune_end_layer": 2},
    {"method": "SparseVLM", "pruning_loc": [1], "stage_tokens": [12]},
])
def test_merges_before_the_deepstack_layers_are_refused(tmp_path, special):
    with pytest.raises(RecipeError) as e:
        plan_recipe(_recipe(tmp_path, special), out=tmp_path / "o")
    assert e.value.key == "sparse.special" and "side features" in str(e.value) and "decoder layer 2" in str(e.value)


def test_a_merge_after_the_deepstack_layers_plans(tmp_path):
    # SparseVLM prunes after layer 2, so its step runs before layer 3: every DeepStack feature is added by then
    plan = plan_recipe(_recipe(tmp_path, {"method": "SparseVLM", "pruning_loc": [2], "stage_tokens": [12]}),
                       out=tmp_path / "o")
    assert [(s.method, s.layer) for s in plan.schedule] == [("sparsevlm", 3)]


def test_checkpoint_directory_round_trip(qwen3, tmp_path):
    from tokcompile.models.loading import load_config, load_model, load_processor, model_type_of

    d = tmp_path / "qwen3-vl-tiny"
    qwen3.model.save_pretrained(str(d), safe_serialization=True)
    qwen3.processor.tokenizer.save_pretrained(str(d))
    qwen3.processor.image_processor.save_pretrained(str(d))
    (d / "chat_template.json").write_text(json.dumps({"chat_template": qwen3.processor.chat_template}))
    path = str(d)
    assert model_type_of(path) == "qwen3_vl"
    model = load_model(path, load_config(path, False), 0, False)
    proc = load_processor(path, False)
    for (n, a), (_, b) in zip(model.state_dict().items(), qwen3.model.state_dict().items()):
        assert torch.equal(a, b), n
    rng = np.random.default_rng(0)
    got = process(proc, qwen3.adapter, qwen3.geom, qwen3.adapter.random_media(rng, 2, qwen3.geom), QUESTIONS)
    for name in qwen3.adapter.input_names:
        assert torch.equal(got[name], qwen3.batch[name]), name


@pytest.mark.slow
def test_tiny_recipe_compiles_to_onnx_and_aoti(tmp_path):
    res = compile_recipe(ROOT / "recipes/tiny/qwen3_vl.yml", tmp_path / "out")
    assert res.returncode == 0, res.stderr + res.stdout
    assert res.stdout.count("parity passed") == 2 and "independent eager reference agrees" in res.stdout
    print(res.stdout[-2500:])
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [i["name"] for i in m["graphs"]["vision"]["outputs"]][:5] == [
        "image_embeds", "image_source", "image_side_0", "image_side_1", "image_side_2"]
    assert m["plan"]["geometry"]["side_streams"] == 3
