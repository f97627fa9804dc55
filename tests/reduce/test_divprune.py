"""Static DivPrune against the independent LightCompress-style reference (tiny LLaVA and Qwen2.5-VL), the other
families' selections, batching and padding, plan counts and errors, export, and one full compile."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import ROOT, assert_no_data_dependent_ops, compile_recipe, export_matching_eager, make_batch
from tests.references.divprune import divprune_reference
from tests.references.divprune import divprune_select as reference_select
from tokcompile.errors import RecipeError
from tokcompile.models import ADAPTERS, ReducedVLM, tiny
from tokcompile.parity import process, random_images
from tokcompile.pipeline import plan_recipe
from tokcompile.reduce.base import Entering, config_from_params
from tokcompile.reduce.divprune import DivPruneConfig, divprune_select, keep_count
from tokcompile.reduce.schedule import Output, Site

QUESTIONS = ["What is shown in this image, in great detail please?", "Hi?"]
KEY = "sparse.special"


def _vlm(model, adapter, geom, ratio: float) -> ReducedVLM:
    cfg = DivPruneConfig(reduction_ratio=ratio)
    schedule = cfg.plan(geom, KEY, Entering.start(geom))
    return ReducedVLM(model, adapter, geom, schedule, (cfg,), adapter.image_token_id(model.config, geom)).eval()


def _run(vlm: ReducedVLM, inputs: dict):
    with torch.no_grad():
        return vlm(*[inputs[n] for n in vlm.input_names])


@pytest.fixture(scope="module", params=["llava", "qwen2_5_vl"])
def fam(request) -> SimpleNamespace:
    model = tiny.build_model(request.param, seed=0).eval()
    adapter = ADAPTERS.get(request.param)()
    geom = adapter.geometry(model.config, None)
    if request.param == "llava":
        batch = make_batch(tiny.build_processor("llava"), QUESTIONS)
    else:
        images = random_images(np.random.default_rng(0), len(QUESTIONS), geom.image_size)
        batch = process(tiny.build_processor(request.param), adapter, geom, images, QUESTIONS)
    assert not bool(batch["attention_mask"][1].all())  # the batch really is padded
    return SimpleNamespace(name=request.param, model=model, adapter=adapter, geom=geom, batch=batch,
                           image_id=adapter.image_token_id(model.config, geom))


# --- the static version equals the reference -----------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.9444, 0.7778, 0.5])
def test_static_divprune_equals_the_reference(fam, ratio):
    vlm = _vlm(fam.model, fam.adapter, fam.geom, ratio)
    out = _run(vlm, fam.batch)
    k = keep_count(fam.geom.n_image_tokens, ratio)
    assert out["kept_0"].shape == (2, k)
    for b in range(2):
        sample = fam.adapter.sample_inputs(fam.batch, b, fam.geom)
        ref_logits, ref_kept = divprune_reference(fam.model, fam.adapter, sample, image_token_id=fam.image_id,
                                                  reduction_ratio=ratio)
        assert torch.equal(out["kept_0"][b], ref_kept)
        torch.testing.assert_close(out["logits"][b], ref_logits, atol=1e-5, rtol=1e-5)


def test_samples_pick_their_own_tokens_and_padding_changes_nothing(fam):
    vlm = _vlm(fam.model, fam.adapter, fam.geom, 0.7778)
    out = _run(vlm, fam.batch)
    assert not torch.equal(out["kept_0"][0], out["kept_0"][1])
    for b in range(2):
        one = _run(vlm, fam.adapter.sample_inputs(fam.batch, b, fam.geom))
        assert torch.equal(one["kept_0"][0], out["kept_0"][b])
        torch.testing.assert_close(one["logits"][0], out["logits"][b], atol=1e-5, rtol=1e-5)


def test_vision_graph_gathers_the_kept_features_in_order(fam):
    vlm = _vlm(fam.model, fam.adapter, fam.geom, 0.5)
    inputs = {n: fam.batch[n] for n in vlm.vision.input_names}
    with torch.no_grad():
        full = vlm.without_reduction().vision.run(inputs)["image_embeds"]  # (B, N, D)
        got = vlm.vision.run(inputs)
    kept = got["kept_0"]
    assert torch.equal(kept, kept.sort(dim=1).values) and torch.equal(got["image_source"], kept)
    torch.testing.assert_close(got["image_embeds"], full.gather(1, kept[..., None].expand(-1, -1, full.shape[-1])),
                               atol=0, rtol=0)


# --- the selection itself ------------------------------------------------------------------------------------------


def test_selection_matches_the_reference_on_random_batches_and_ties():
    x = torch.randn(3, 48, 16, generator=torch.Generator().manual_seed(0))
    for k in (1, 5, 24, 48):
        got = divprune_select(x, k)
        assert [got[b].tolist() for b in range(3)] == [reference_select(x[b], k).tolist() for b in range(3)]
    axes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])  # every distance ties
    assert divprune_select(axes[None], 3).tolist() == [[0, 1, 2]]
    dup = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])  # duplicates are never picked twice
    assert divprune_select(dup[None], 4).tolist() == [[0, 1, 2, 3]]
    assert divprune_select(dup[None], 2).tolist() == [[0, 3]] == [reference_select(dup, 2).tolist()]


def test_every_pick_ranks_on_the_scores_decide_returns():
    """`ctx.decision` sees each of the k picks' distances, unmasked, and the picks follow what it returns: a
    replay handing back other scores moves the pick, while the distances computed stay eager's own."""
    x = torch.randn(2, 12, 8, generator=torch.Generator().manual_seed(1))
    seen = []
    assert divprune_select(x, 4, lambda s: seen.append(s) or s).tolist() == divprune_select(x, 4).tolist()
    assert len(seen) == 4 and all(s.shape == (2, 12) and bool(s.isfinite().all()) for s in seen)
    base = divprune_select(x, 4)
    other = next(j for j in range(12) if j not in base[0].tolist())  # a token eager does not keep

    def favour_other(s):  # the first pick's scores with `other` made the largest, the later ones unchanged
        if favour_other.calls == 0:
            s = s.clone()
            s[0, other] = s[0].max() + 1
        favour_other.calls += 1
        return s

    favour_other.calls = 0
    got = divprune_select(x, 4, favour_other)
    assert other in got[0].tolist() and got[1].tolist() == base[1].tolist()


# --- every family ----------------------------------------------------------------------------------------------------


def _recipe(tmp_path, family: str, **special) -> SimpleNamespace:
    recipe = {
        "model": {"path": f"tiny-random:{family}"},
        "inputs": {"batch_size": 2, "max_prompt_len": 64},
        "sparse": {"method": "TokenReduction", "special": {"method": "DivPrune", **special}},
    }
    path = tmp_path / f"{family}.yml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision", "qwen2_vl"])
def test_other_families_select_per_sample_on_the_projected_features(tmp_path, family):
    plan = plan_recipe(_recipe(tmp_path, family, reduction_ratio=0.7778), out=tmp_path / "out")
    g, a = plan.geometry, plan.adapter
    (step,) = plan.schedule
    assert (step.site, step.n_in, step.n_out) == (Site.PROJECTOR_OUT, g.n_image_tokens,
                                                  keep_count(g.n_image_tokens, 0.7778))
    model = tiny.build_model(family, seed=0).eval()
    batch = process(tiny.build_processor(family), a, g, a.random_media(np.random.default_rng(0), 2, g), QUESTIONS)
    vlm = ReducedVLM(model, a, g, plan.schedule, plan.reducers, plan.image_token_id).eval()
    out = _run(vlm, batch)
    full = vlm.without_reduction()
    for b in range(2):
        sample = a.sample_inputs(batch, b, g)
        with torch.no_grad():
            feats = full.vision.run({n: sample[n] for n in full.vision.input_names})["image_embeds"][0]  # (N, D)
        assert torch.equal(out["kept_0"][b], reference_select(feats, step.n_out))
        one = _run(vlm, sample)
        torch.testing.assert_close(one["logits"][0], out["logits"][b], atol=1e-5, rtol=1e-5)


# --- plan: counts and errors ------------------------------------------------------------------------------------------


def test_plan_counts(geometry):
    (step,) = DivPruneConfig().plan(geometry, KEY, Entering.start(geometry))
    assert (step.method, step.site, step.layer, step.n_in, step.n_out, step.output) == (
        "divprune", Site.PROJECTOR_OUT, 0, 64, 4, Output.KEPT)
    assert step.scored == 4  # one score vector per greedy pick
    assert [keep_count(576, r) for r in (0.9444, 0.8889, 0.7778)] == [32, 64, 128]
    assert keep_count(24, 0.9444) == 1 and keep_count(25, 0.5) == 12 and keep_count(64, 0.0) == 64
    cfg = config_from_params(DivPruneConfig, {"reduction_ratio": 0.5}, KEY)  # LightCompress's name
    assert cfg.plan(geometry, KEY, Entering(48, 65))[0].n_in == 48  # counts what earlier steps leave


@pytest.mark.parametrize(
    "params,key,text",
    [
        ({"reduction_ratio": 1.0}, "sparse.special.reduction_ratio", "outside [0, 1)"),
        ({"reduction_ratio": -0.1}, "sparse.special.reduction_ratio", "outside [0, 1)"),
        ({"reduction_ratio": 0.995}, "sparse.special.reduction_ratio", "keeps 0 of 64"),
        ({"reduction_ratio": "high"}, "sparse.special.reduction_ratio", "expected a number"),
        ({"rate": 0.5}, "sparse.special.rate", "unknown parameter for DivPrune"),
    ],
)
def test_plan_errors_name_the_key(geometry, params, key, text):
    with pytest.raises(RecipeError) as e:
        config_from_params(DivPruneConfig, params, KEY).plan(geometry, KEY, Entering.start(geometry))
    assert e.value.key == key and text in str(e.value)


def test_cli_plan_error_is_one_line(tmp_path):
    recipe = _recipe(tmp_path, "llava", reduction_ratio=1.2)
    res = subprocess.run([sys.executable, str(ROOT / "compile.py"), str(recipe), "--plan"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "sparse.special.reduction_ratio" in lines[0] and "[0, 1)" in lines[0]


# --- export ----------------------------------------------------------------------------------------------------------


def test_vision_graph_exports_with_no_data_dependent_ops(tiny_model, adapter, geometry, batch):
    vlm = _vlm(tiny_model, adapter, geometry, 0.9444)
    args = tuple(batch[n] for n in vlm.vision.input_names)
    ep = export_matching_eager(vlm.vision, args)
    ops = assert_no_data_dependent_ops(ep)
    assert "topk" in ops and "gather" in ops


@pytest.mark.slow
def test_tiny_recipe_compiles_to_onnx_with_parity(tmp_path):
    # ONNX only, for CI time (its AOTInductor package compiled with parity when the method landed; the README gives
    # the figures).
    res = compile_recipe(ROOT / "recipes/tiny/divprune.yml", tmp_path / "out", "--targets", "onnx")
    assert res.returncode == 0, res.stderr + res.stdout
    assert "parity passed" in res.stdout
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [(s["method"], s["site"], s["n_in"], s["n_out"]) for s in manifest["schedule"]] == [
        ("divprune", "projector_out", 64, 4)]
    assert manifest["parity"]["passed"] is True
