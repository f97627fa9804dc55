"""Static VTW against the independent reference (tiny LLaVA, tiny Qwen2.5-VL with M-RoPE), padding, plan errors,
PACT's equivalent-layer keys and one full compile of the zero-kept step (ONNX)."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import ROOT, compile_recipe, padded_family_case
from tests.references.vtw import vtw_equivalent_layer, vtw_reference
from tokcompile.errors import RecipeError
from tokcompile.models import ADAPTERS, ReducedVLM
from tokcompile.models.tiny import build_config
from tokcompile.plan import resolve
from tokcompile.recipe import load_recipe_dict
from tokcompile.reduce.base import Entering, config_from_params
from tokcompile.reduce.schedule import Positions, Site
from tokcompile.reduce.vtw import VTWConfig, equivalent_layer

KEY = "sparse.special"


@pytest.fixture(scope="module", params=["llava", "qwen2_5_vl"])
def fam(request) -> SimpleNamespace:
    return padded_family_case(request.param)


def _vlm(f, **params):
    cfg = VTWConfig(**params)
    schedule = cfg.plan(f.geom, KEY, Entering.start(f.geom))
    return ReducedVLM(f.model, f.adapter, f.geom, schedule, (cfg,), f.image_id).eval()


def _run(f, vlm, batch):
    with torch.no_grad():
        return vlm(*[batch[n] for n in f.adapter.input_names_for(f.geom)])


@pytest.mark.parametrize("K", [1, 2, 3])
def test_static_vtw_matches_reference(fam, K):
    out = _run(fam, _vlm(fam, pruning_loc=K), fam.batch)
    kept = out["kept_0"]
    assert kept.shape == (2, 0) and kept.dtype == torch.int64
    worst = 0.0
    for b in range(2):
        sample = fam.adapter.sample_inputs(fam.batch, b, fam.geom)
        ref_logits, ref_kept = vtw_reference(fam.model, fam.adapter, sample, image_token_id=fam.image_id,
                                             pruning_loc=K)
        assert torch.equal(kept[b], ref_kept)
        torch.testing.assert_close(out["logits"][b], ref_logits, atol=1e-5, rtol=1e-5)
        worst = max(worst, float((out["logits"][b] - ref_logits).abs().max()))
    print(f"{fam.family} K={K}: max |dlogit| vs reference {worst:.2e}")


def test_pact_keys_run_the_equivalent_layer(fam):
    """PACT's keys give the same graph as pruning_loc at the layer its rule picks (L=4, K0=1, p=0.5 -> 2)."""
    pact = _run(fam, _vlm(fam, withdraw_visual_tokens=True, VTW_equivalant_layer_for_reduction=1,
                          equivalent_reduc_percentage_vtw=0.5), fam.batch)
    direct = _run(fam, _vlm(fam, pruning_loc=2), fam.batch)
    assert torch.equal(pact["logits"], direct["logits"])


def test_padding_changes_nothing(fam):
    vlm = _vlm(fam, pruning_loc=2)
    out = _run(fam, vlm, fam.batch)
    for b in range(2):
        one = _run(fam, vlm, fam.adapter.sample_inputs(fam.batch, b, fam.geom))
        assert one["kept_0"].shape == (1, 0)
        torch.testing.assert_close(one["logits"][0], out["logits"][b], atol=1e-5, rtol=1e-5)


def test_cache_after_withdrawal_holds_only_text(fam):
    """Pattern C1: layers >= K cache T - N entries, every real one a text token; layers < K cache all T."""
    cfg = VTWConfig(pruning_loc=2)
    schedule = cfg.plan(fam.geom, KEY, Entering.start(fam.geom))
    vlm = ReducedVLM(fam.model, fam.adapter, fam.geom, schedule, (cfg,), fam.image_id, with_cache=True).eval()
    out = _run(fam, vlm, fam.batch)
    T, N = fam.batch["input_ids"].shape[1], fam.geom.n_image_tokens
    assert vlm.groups == [(0, 2), (2, 4)]
    assert out["present_key_1"].shape[2] == T
    assert out["present_key_2"].shape[2] == out["present_key_3"].shape[2] == T - N
    assert torch.equal(out["cache_mask_0"], fam.batch["attention_mask"].long())
    text_valid = fam.batch["attention_mask"].bool() & (fam.batch["input_ids"] != fam.image_id)
    assert torch.equal(out["cache_mask_1"].sum(1), text_valid.sum(1))


# --- plan ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl"])
def test_plan_counts_on_every_family(family):
    adapter = ADAPTERS.get(family)()
    geom = adapter.geometry(build_config(family), None)
    assert Site.DECODER_LAYER in adapter.sites
    (step,) = VTWConfig(pruning_loc=3).plan(geom, KEY, Entering.start(geom))
    assert (step.method, step.site, step.layer, step.n_in, step.n_out) == (
        "vtw", Site.DECODER_LAYER, 3, geom.n_image_tokens, 0)
    assert step.positions is Positions.KEEP


def test_equivalent_layer_equals_reference_rule():
    for L in (4, 24, 28, 32, 40):
        for k0 in range(L + 1):
            for p in np.linspace(0, 1, 21):
                assert equivalent_layer(L, k0, float(p)) == vtw_equivalent_layer(L, k0, float(p))
    assert equivalent_layer(28, 4, 0.353) == 12 and equivalent_layer(4, 1, 0.5) == 2  # PACT's script; half->even


@pytest.mark.parametrize(
    "params,key,text",
    [
        ({"pruning_loc": 0}, "pruning_loc", "outside 1..3"),
        ({"pruning_loc": 4}, "pruning_loc", "outside 1..3"),
        ({"pruning_loc": 2.0}, "pruning_loc", "expected an integer"),
        ({}, "pruning_loc", "required"),
        ({"pruning_loc": 2, "withdraw_visual_tokens": True}, "withdraw_visual_tokens", "not both"),
        ({"pruning_loc": 2, "equivalent_reduc_percentage_vtw": 0.5}, "equivalent_reduc_percentage_vtw", "not both"),
        ({"withdraw_visual_tokens": False}, "withdraw_visual_tokens", "must be true"),
        ({"VTW_equivalant_layer_for_reduction": 1, "equivalent_reduc_percentage_vtw": 0.5},
         "withdraw_visual_tokens", "must be true"),
        ({"withdraw_visual_tokens": True, "equivalent_reduc_percentage_vtw": 0.5},
         "VTW_equivalant_layer_for_reduction", "required"),
        ({"withdraw_visual_tokens": True, "VTW_equivalant_layer_for_reduction": 1},
         "equivalent_reduc_percentage_vtw", "required"),
        ({"withdraw_visual_tokens": True, "VTW_equivalant_layer_for_reduction": -1,
          "equivalent_reduc_percentage_vtw": 0.5}, "VTW_equivalant_layer_for_reduction", "0..4"),
        ({"withdraw_visual_tokens": True, "VTW_equivalant_layer_for_reduction": 1,
          "equivalent_reduc_percentage_vtw": 1.5}, "equivalent_reduc_percentage_vtw", "outside [0, 1]"),
        ({"withdraw_visual_tokens": True, "VTW_equivalant_layer_for_reduction": 3,
          "equivalent_reduc_percentage_vtw": 0.5}, "equivalent_reduc_percentage_vtw", "nothing would be withdrawn"),
        ({"withdraw_visual_tokens": True, "VTW_equivalant_layer_for_reduction": 0,
          "equivalent_reduc_percentage_vtw": 0.0}, "equivalent_reduc_percentage_vtw", "no image"),
    ],
)
def test_plan_errors_name_the_key(geometry, params, key, text):
    cfg = config_from_params(VTWConfig, params, KEY)
    with pytest.raises(RecipeError) as e:
        cfg.plan(geometry, KEY, Entering.start(geometry))
    assert e.value.key == f"{KEY}.{key}" and text in str(e.value)
    assert "\n" not in str(e.value)


def _recipe(special: dict) -> dict:
    data = yaml.safe_load((ROOT / "recipes/tiny/vtw.yml").read_text())
    data["sparse"]["special"] = {"method": "VTW", **special}
    return data


def test_pact_recipe_keys_resolve():
    plan = resolve(load_recipe_dict(_recipe({"withdraw_visual_tokens": True, "VTW_equivalant_layer_for_reduction": 1,
                                             "equivalent_reduc_percentage_vtw": 0.5}), "pact"))
    assert [(s.layer, s.n_in, s.n_out) for s in plan.schedule] == [(2, 64, 0)]
    assert plan.image_tokens_per_layer() == [64, 64, 0, 0]


def test_plan_cli(tmp_path):
    res = compile_recipe(ROOT / "recipes/tiny/vtw.yml", tmp_path / "out", "--plan")
    assert res.returncode == 0, res.stderr + res.stdout
    assert "vtw at decoder_layer 2: 64 -> 0 image tokens" in res.stdout and "L0:64 L1:64 L2:0 L3:0" in res.stdout
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump(_recipe({"pruning_loc": 4})))
    res = compile_recipe(bad, tmp_path / "out", "--plan")
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "sparse.special.pruning_loc" in lines[0] and "1..3" in lines[0], res.stderr


# --- compile -------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_recipe_compiles_with_an_empty_kept_output(tmp_path):
    # AOTInductor in CI: the demo and Qwen2.5-VL
    res = compile_recipe(ROOT / "recipes/tiny/vtw.yml", tmp_path / "out", "--targets", "onnx")
    assert res.returncode == 0, res.stderr + res.stdout
    assert "parity passed" in res.stdout
    print("\n".join(line for line in res.stdout.splitlines() if re.search(r"max|parity|Δ", line)))
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["cache_groups"] == [[0, 2], [2, 4]]  # pattern C1: layers >= 2 cache only the text
    assert [(s["method"], s["layer"], s["n_in"], s["n_out"]) for s in m["schedule"]] == [("vtw", 2, 64, 0)]
