"""Static RandomPrune against the independent LightCompress-style reference (tiny LLaVA, tiny Qwen2.5-VL with
M-RoPE) at a padded batch of two, the constant kept set, padding, plan counts and errors, `--plan`, and one full
compile to ONNX and AOTInductor."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch
import yaml

from tests.conftest import ROOT, compile_recipe, padded_family_case
from tests.references.randomprune import draw_rand_idx, num_keep, randomprune_reference
from tokcompile.errors import RecipeError
from tokcompile.models import ADAPTERS, ReducedVLM
from tokcompile.models.tiny import build_config
from tokcompile.reduce.base import Entering, config_from_params
from tokcompile.reduce.randomprune import RandomPruneConfig, keep_count, random_kept
from tokcompile.reduce.schedule import Output, Positions, Site

KEY = "sparse.special"


@pytest.fixture(scope="module", params=["llava", "qwen2_5_vl"])
def fam(request) -> SimpleNamespace:
    return padded_family_case(request.param)


def _vlm(f, **params) -> ReducedVLM:
    cfg = RandomPruneConfig(**params)
    schedule = cfg.plan(f.geom, KEY, Entering.start(f.geom))
    return ReducedVLM(f.model, f.adapter, f.geom, schedule, (cfg,), f.image_id).eval()


def _run(f, vlm, batch):
    with torch.no_grad():
        return vlm(*[batch[n] for n in f.adapter.input_names_for(f.geom)])


@pytest.mark.parametrize("K,R,seed", [(0, 0.5, 0), (2, 0.5, 0), (2, 0.778, 3), (3, 0.25, 11)])
def test_static_randomprune_matches_reference(fam, K, R, seed):
    out = _run(fam, _vlm(fam, pruning_loc=K, prune_ratio=R, seed=seed), fam.batch)
    kept = out["kept_0"]
    N = fam.geom.n_image_tokens
    assert kept.shape == (2, num_keep(N, R)) and kept.dtype == torch.int64
    assert torch.equal(kept[0], kept[1])  # one constant set for the whole batch
    worst = 0.0
    for b in range(2):
        sample = fam.adapter.sample_inputs(fam.batch, b, fam.geom)
        ref_logits, ref_kept = randomprune_reference(fam.model, fam.adapter, sample, image_token_id=fam.image_id,
                                                     pruning_loc=K, prune_ratio=R, seed=seed)
        assert torch.equal(kept[b], ref_kept)
        torch.testing.assert_close(out["logits"][b], ref_logits, atol=1e-5, rtol=1e-5)
        worst = max(worst, float((out["logits"][b] - ref_logits).abs().max()))
    print(f"{fam.family} K={K} R={R} seed={seed}: max |dlogit| vs reference {worst:.2e}")


def test_padding_changes_nothing_and_every_call_keeps_the_same_set(fam):
    vlm = _vlm(fam, pruning_loc=2, prune_ratio=0.5)
    out = _run(fam, vlm, fam.batch)
    again = _run(fam, vlm, fam.batch)
    assert torch.equal(out["kept_0"], again["kept_0"]) and torch.equal(out["logits"], again["logits"])
    for b in range(2):
        one = _run(fam, vlm, fam.adapter.sample_inputs(fam.batch, b, fam.geom))
        assert torch.equal(one["kept_0"][0], out["kept_0"][b])
        torch.testing.assert_close(one["logits"][0], out["logits"][b], atol=1e-5, rtol=1e-5)


def test_cache_groups_after_pruning(fam):
    """Pattern C1: layers >= K cache T - N + k entries; layers < K cache all T."""
    cfg = RandomPruneConfig(pruning_loc=2, prune_ratio=0.5)
    schedule = cfg.plan(fam.geom, KEY, Entering.start(fam.geom))
    vlm = ReducedVLM(fam.model, fam.adapter, fam.geom, schedule, (cfg,), fam.image_id, with_cache=True).eval()
    out = _run(fam, vlm, fam.batch)
    T, N = fam.batch["input_ids"].shape[1], fam.geom.n_image_tokens
    assert out["present_key_1"].shape[2] == T and out["present_key_2"].shape[2] == T - N + N // 2


def test_kept_set_is_the_seeded_draw():
    for n, R, seed in [(64, 0.5, 0), (576, 0.778, 0), (576, 0.9444, 5), (7, 0.5, 2)]:
        k = keep_count(n, R)
        assert k == num_keep(n, R)
        assert list(random_kept(n, k, seed)) == draw_rand_idx(n, R, seed).sort().values.tolist()
    assert random_kept(64, 32, 0) != random_kept(64, 32, 1)


# --- plan ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl"])
def test_plan_counts_on_every_family(family):
    adapter = ADAPTERS.get(family)()
    geom = adapter.geometry(build_config(family), None)
    assert Site.DECODER_LAYER in adapter.sites
    (step,) = RandomPruneConfig(pruning_loc=1, prune_ratio=0.5).plan(geom, KEY, Entering.start(geom))
    N = geom.n_image_tokens
    assert (step.method, step.site, step.layer, step.n_in, step.n_out) == (
        "randomprune", Site.DECODER_LAYER, 1, N, round(N * 0.5))
    assert step.positions is Positions.KEEP and step.output is Output.KEPT


@pytest.mark.parametrize(
    "params,key,text",
    [
        ({"pruning_loc": -1, "prune_ratio": 0.5}, "pruning_loc", "outside the decoder's layers 0..3"),
        ({"pruning_loc": 4, "prune_ratio": 0.5}, "pruning_loc", "outside the decoder's layers 0..3"),
        ({"pruning_loc": 2.0, "prune_ratio": 0.5}, "pruning_loc", "expected an integer"),
        ({"prune_ratio": 0.5}, "pruning_loc", "required"),
        ({"pruning_loc": 2}, "prune_ratio", "required"),
        ({"pruning_loc": 2, "prune_ratio": 1.0}, "prune_ratio", "outside [0, 1)"),
        ({"pruning_loc": 2, "prune_ratio": -0.1}, "prune_ratio", "outside [0, 1)"),
        ({"pruning_loc": 2, "prune_ratio": 0.995}, "prune_ratio", "keeps 0 of 64"),
        ({"pruning_loc": 2, "prune_ratio": 0.5, "metric": "holitom_merge"}, "metric", "not a random choice"),
        ({"pruning_loc": 2, "prune_ratio": 0.5, "metric": "attention"}, "metric", "unknown metric"),
        ({"pruning_loc": 2, "prune_ratio": 0.5, "seed": -1}, "seed", "negative"),
        ({"pruning_loc": 2, "prune_ratio": 0.5, "rate": 0.5}, "rate", "unknown parameter"),
    ],
)
def test_plan_errors_name_the_key(geometry, params, key, text):
    with pytest.raises(RecipeError) as e:
        cfg = config_from_params(RandomPruneConfig, params, KEY)
        cfg.plan(geometry, KEY, Entering.start(geometry))
    assert e.value.key == f"{KEY}.{key}" and text in str(e.value)
    assert "\n" not in str(e.value)


def _recipe(special: dict) -> dict:
    data = yaml.safe_load((ROOT / "recipes/tiny/randomprune.yml").read_text())
    data["sparse"]["special"] = {"method": "RandomPrune", **special}
    return data


def test_plan_cli(tmp_path):
    res = compile_recipe(ROOT / "recipes/tiny/randomprune.yml", tmp_path / "out", "--plan")
    assert res.returncode == 0, res.stderr + res.stdout
    assert "randomprune at decoder_layer 2: 64 -> 32 image tokens; selects nothing from the data" in res.stdout
    assert "L0:64 L1:64 L2:32 L3:32" in res.stdout
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump(_recipe({"pruning_loc": 2, "prune_ratio": 0.5, "metric": "holitom_merge"})))
    res = compile_recipe(bad, tmp_path / "out", "--plan")
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "sparse.special.metric" in lines[0] and "holitom_merge" in lines[0], res.stderr


# --- compile -------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_recipe_compiles_to_onnx_with_parity(tmp_path):
    # ONNX only, for CI time: AOTInductor at this site (one decoder step) is compiled by FastV's demo and VTW.
    res = compile_recipe(ROOT / "recipes/tiny/randomprune.yml", tmp_path / "out", "--targets", "onnx")
    assert res.returncode == 0, res.stderr + res.stdout
    assert "parity passed" in res.stdout
    print("\n".join(line for line in res.stdout.splitlines() if re.search(r"max|parity|Δ", line)))
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["cache_groups"] == [[0, 2], [2, 4]]
    assert [(s["method"], s["layer"], s["n_in"], s["n_out"], s["positions"]) for s in m["schedule"]] == [
        ("randomprune", 2, 64, 32, "keep")]
    assert m["recipe"]["sparse"]["special"]["seed"] == 0  # the draw's seed travels with the artefact
    assert m["parity"]["passed"] is True
