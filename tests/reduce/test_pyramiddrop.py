"""Static PyramidDrop against the independent LightCompress-style reference (tiny LLaVA with renumbered
positions, tiny Qwen2.5-VL with original M-RoPE ids), padding, plan errors and one full compile."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import ROOT, compile_recipe, padded_family_case
from tests.references.pyramiddrop import last_token_scores, pyramiddrop_reference
from tokcompile.errors import RecipeError
from tokcompile.models import ReducedVLM
from tokcompile.models.reduced import LayerOps
from tokcompile.reduce.base import Entering
from tokcompile.reduce.context import DecoderContext
from tokcompile.reduce.pyramiddrop import PyramidDropConfig, keep_count
from tokcompile.reduce.schedule import Positions


@pytest.fixture(scope="module", params=["llava", "qwen2_5_vl"])
def fam(request) -> SimpleNamespace:
    return padded_family_case(request.param)


def _vlm(f, layers, ratios):
    cfg = PyramidDropConfig(layer_list=list(layers), image_token_ratio_list=list(ratios))
    schedule = cfg.plan(f.geom, "sparse.special", Entering.start(f.geom))
    return ReducedVLM(f.model, f.adapter, f.geom, schedule, (cfg,) * len(schedule), f.image_id).eval()


def _run(f, vlm, batch):
    with torch.no_grad():
        return vlm(*[batch[n] for n in f.adapter.input_names_for(f.geom)])


@pytest.mark.parametrize("layers,ratios", [([1, 2, 3], [0.5, 0.25, 0.125]), ([0, 3], [0.3, 0.3]), ([2], [0.75])])
def test_static_pyramiddrop_matches_reference(fam, layers, ratios):
    vlm = _vlm(fam, layers, ratios)
    out = _run(fam, vlm, fam.batch)
    N = fam.geom.n_image_tokens
    worst = 0.0
    for b in range(2):
        sample = fam.adapter.sample_inputs(fam.batch, b, fam.geom)
        ref_logits, ref_kept = pyramiddrop_reference(
            fam.model, fam.adapter, sample, image_token_id=fam.image_id, layer_list=layers,
            image_token_ratio_list=ratios, renumber_positions=(fam.geom.rope == "1d"),
        )
        for j, (r, kept_ref) in enumerate(zip(ratios, ref_kept)):
            assert out[f"kept_{j}"].shape == (2, keep_count(N, r))
            assert torch.equal(out[f"kept_{j}"][b], kept_ref), (b, j)
        torch.testing.assert_close(out["logits"][b], ref_logits, atol=1e-5, rtol=1e-5)
        worst = max(worst, float((out["logits"][b] - ref_logits).abs().max()))
    print(f"{fam.family} {layers} {ratios}: max |dlogit| vs reference {worst:.2e}")


def test_current_scores_equal_reference_scoring(fam):
    """`last_token_attention("current")` is the reference's row (layer l's own norm, q/k, RoPE, GQA mapping)."""
    sample = fam.adapter.sample_inputs(fam.batch, 0, fam.geom)
    vlm = _vlm(fam, [3], [1.0])
    lm = fam.adapter.language_model(fam.model)
    with torch.no_grad():
        state = vlm.initial_state(sample)
        h = fam.model(**sample, output_hidden_states=True).hidden_states[2]  # (1, T, D) entering layer 2
        state = type(state)(h, state.positions, state.valid, state.image_start, state.n_image, state.last)
        ctx = DecoderContext(2, LayerOps(fam.adapter, fam.model), state, None, None)
        ours = ctx.last_token_attention("current")[0]  # (T,)
        ref = last_token_scores(lm.layers[2], lm.rotary_emb, h, fam.adapter.hf_position_ids(fam.model, sample))
    assert fam.geom.n_kv_heads < fam.geom.n_heads  # GQA is exercised
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)


def test_padding_changes_nothing_and_samples_keep_their_own(fam):
    vlm = _vlm(fam, [1, 2, 3], [0.5, 0.25, 0.125])
    out = _run(fam, vlm, fam.batch)
    assert not torch.equal(out["kept_0"][0], out["kept_0"][1])
    for b in range(2):
        one = _run(fam, vlm, fam.adapter.sample_inputs(fam.batch, b, fam.geom))
        for j in range(3):
            assert torch.equal(one[f"kept_{j}"][0], out[f"kept_{j}"][b])
        torch.testing.assert_close(one["logits"][0], out["logits"][b], atol=1e-5, rtol=1e-5)


def test_plan_counts_and_positions(fam):
    steps = PyramidDropConfig(layer_list=[1, 2, 3], image_token_ratio_list=[0.5, 0.25, 0.125]).plan(
        fam.geom, "k", Entering.start(fam.geom))
    N = fam.geom.n_image_tokens
    assert [(s.layer, s.n_in, s.n_out) for s in steps] == [(1, N, N // 2), (2, N // 2, N // 4), (3, N // 4, N // 8)]
    assert {s.positions for s in steps} == {Positions.RENUMBER if (fam.geom.rope == "1d") else Positions.KEEP}
    assert keep_count(576, 0.5) == 288 and keep_count(576, 0.125) == 72 and keep_count(64, 0.3) == 19  # floor


@pytest.mark.parametrize(
    "kwargs,key,text",
    [
        ({"layer_list": [2, 1, 3]}, "layer_list", "not strictly increasing"),
        ({"layer_list": [1, 1, 3]}, "layer_list", "not strictly increasing"),
        ({"layer_list": [1, 2, 4]}, "layer_list", "0..3"),
        ({"layer_list": [-1, 2, 3]}, "layer_list", "0..3"),
        ({"layer_list": "1,2,3"}, "layer_list", "list of decoder layer"),
        ({"layer_list": [1, 2]}, "image_token_ratio_list", "has 3 entries but layer_list has 2"),
        ({"image_token_ratio_list": [0.5, 0.75, 0.125]}, "image_token_ratio_list", "increases"),
        ({"image_token_ratio_list": [1.5, 0.25, 0.125]}, "image_token_ratio_list", "outside (0, 1]"),
        ({"image_token_ratio_list": [0.5, 0.25, 0.0]}, "image_token_ratio_list", "outside (0, 1]"),
        ({"image_token_ratio_list": [0.5, 0.25, 0.01]}, "image_token_ratio_list", "keeps 0 of 64"),
    ],
)
def test_plan_errors_name_the_key(geometry, kwargs, key, text):
    params = {"layer_list": [1, 2, 3], "image_token_ratio_list": [0.5, 0.25, 0.125], **kwargs}
    with pytest.raises(RecipeError) as e:
        PyramidDropConfig(**params).plan(geometry, "sparse.special", Entering.start(geometry))
    assert e.value.key == f"sparse.special.{key}" and text in str(e.value)
    assert "\n" not in str(e.value)


def test_plan_cli_shows_the_stages(tmp_path):
    res = compile_recipe(ROOT / "recipes/tiny/pyramiddrop.yml", tmp_path / "out", "--plan")
    assert res.returncode == 0, res.stderr + res.stdout
    assert "L0:64 L1:32 L2:16 L3:8" in res.stdout and res.stdout.count("positions renumbered") == 3


@pytest.mark.slow
def test_tiny_recipe_compiles_with_one_cache_group_per_stage(tmp_path):
    # AOTInductor in CI: the demo and Qwen2.5-VL
    res = compile_recipe(ROOT / "recipes/tiny/pyramiddrop.yml", tmp_path / "out", "--targets", "onnx")
    assert res.returncode == 0, res.stderr + res.stdout
    assert "parity passed" in res.stdout
    print("\n".join(line for line in res.stdout.splitlines() if re.search(r"max|parity|Δ", line)))
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["cache_groups"] == [[0, 1], [1, 2], [2, 3], [3, 4]]  # pattern C2: one cache length per stage
    assert [(s["layer"], s["n_in"], s["n_out"], s["positions"]) for s in m["schedule"]] == [
        (1, 64, 32, "renumber"), (2, 32, 16, "renumber"), (3, 16, 8, "renumber")]
