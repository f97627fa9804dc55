"""Static SparseVLM against the independent LightCompress-style reference (tiny LLaVA and tiny Qwen2.5-VL,
padded batches of two), the replay of a recorded result, batching and padding, DPC-kNN, LightCompress's tables,
plan errors, export, and one full compile."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import (
    ROOT,
    assert_no_data_dependent_ops,
    compile_recipe,
    export_matching_eager,
    make_batch,
    padded_family_case,
)
from tests.references.sparsevlm import cluster_and_merge, sparsevlm_reference
from tests.test_flops import LLAVA_7B
from tokcompile.errors import RecipeError
from tokcompile.generation import GenerationConfig, generate, no_cache_logits
from tokcompile.graphs import build_modules, eager_runners
from tokcompile.models import ReducedVLM
from tokcompile.pipeline import plan_recipe
from tokcompile.reduce.base import Entering, config_from_params
from tokcompile.reduce.dpc_knn import dpc_knn, merge_clusters
from tokcompile.reduce.schedule import Output, Site
from tokcompile.reduce.sparsevlm import SparseVLMConfig, stage_counts

KEY = "sparse.special"
CASES = [
    dict(pruning_loc=[1], reduction_ratio=0.6667),  # LightCompress's one-stage table: 0.3125 of the tokens
    dict(pruning_loc=[0, 2], stage_tokens=[0.5, 12]),  # two stages, recycling at both
    dict(pruning_loc=[0, 1, 2], stage_tokens=[40, 20, 10], merge_flag=False),  # pruning only
]


@pytest.fixture(scope="module", params=["llava", "qwen2_5_vl"])
def case(request):
    return padded_family_case(request.param)


def _vlm(case, **params) -> ReducedVLM:
    cfg = SparseVLMConfig(**params)
    schedule = cfg.plan(case.geom, KEY, Entering.start(case.geom))
    return ReducedVLM(case.model, case.adapter, case.geom, schedule, (cfg,) * len(schedule), case.image_id).eval()


def _run(vlm: ReducedVLM, inputs: dict, forced=None):
    with torch.no_grad():
        return vlm.run({n: inputs[n] for n in vlm.input_names}, forced=forced)


@pytest.mark.parametrize("params", CASES)
def test_static_sparsevlm_equals_the_reference(case, params):
    vlm = _vlm(case, **params)
    out = _run(vlm, case.batch)
    names = vlm.layout.step_outputs
    worst = 0.0
    for b in range(2):
        sample = case.adapter.sample_inputs(case.batch, b, case.geom)
        ref_logits, ref_slots = sparsevlm_reference(case.model, case.adapter, sample, image_token_id=case.image_id,
                                                    **params)
        assert len(ref_slots) == len(names)
        for name, step, ref in zip(names, vlm.schedule, ref_slots):
            got = out[name][b]
            if step.output is Output.KEPT:  # kept indices: the reference's kept slots
                ref = torch.nonzero(ref >= 0).flatten()
            assert torch.equal(got, ref), (name, got, ref)
        torch.testing.assert_close(out["logits"][b], ref_logits, atol=1e-5, rtol=1e-5)
        worst = max(worst, (out["logits"][b] - ref_logits).abs().max().item())
    print(f"{case.geom.family} {params}: {[(s.n_in, s.n_out) for s in vlm.schedule]}, max |dlogit| {worst:.2e}")


def test_a_recorded_result_replays_exactly(case):
    vlm = _vlm(case, **CASES[1])
    out = _run(vlm, case.batch)
    names = vlm.layout.step_outputs
    again = _run(vlm, case.batch, forced={n: out[n] for n in names})
    assert all(torch.equal(again[n], out[n]) for n in names)
    torch.testing.assert_close(again["logits"], out["logits"], atol=0, rtol=0)


def test_samples_pick_their_own_tokens_and_padding_changes_nothing(case):
    vlm = _vlm(case, **CASES[1])
    out = _run(vlm, case.batch)
    assert not torch.equal(out["assign_0"][0], out["assign_0"][1])
    for b in range(2):
        one = _run(vlm, case.adapter.sample_inputs(case.batch, b, case.geom))
        assert all(torch.equal(one[n][0], out[n][b]) for n in vlm.layout.step_outputs)
        torch.testing.assert_close(one["logits"][0], out["logits"][b], atol=1e-5, rtol=1e-5)


def test_dpc_knn_matches_lightcompress_clustering():
    torch.manual_seed(0)
    for m, c in [(14, 2), (9, 1), (31, 4), (1, 1)]:
        x = torch.randn(2, m, 16)
        centre, slot = dpc_knn(x, c)
        merged = merge_clusters(x, slot, c)
        for b in range(2):
            ref_merged, ref_centres, ref_cluster = cluster_and_merge(x[b], c)
            assert centre[b].tolist() == ref_centres and slot[b].tolist() == ref_cluster
            torch.testing.assert_close(merged[b], ref_merged, atol=1e-6, rtol=1e-6)


def test_lightcompress_tables_give_the_published_counts():
    geom = LLAVA_7B
    for ratio, kept in [(0.6667, (300, 200, 110)), (0.7778, (303, 110, 36)), (0.8889, (66, 30, 17))]:
        steps = SparseVLMConfig(reduction_ratio=ratio).plan(geom, KEY, Entering.start(geom))
        assert [s.layer for s in steps] == [3, 7, 16] and all(s.site is Site.DECODER_LAYER for s in steps)
        assert tuple(s.detail[0] for s in steps) == kept
    steps = SparseVLMConfig(reduction_ratio=0.6667).plan(geom, KEY, Entering.start(geom))
    # 576 -> 300 kept + (83 recycled -> 9 clusters) -> 200 + (33 -> 4) -> 110 + (29 -> 3)
    assert [(s.n_in, s.n_out, s.detail) for s in steps] == [(576, 309, (300, 83, 9)), (309, 204, (200, 33, 4)),
                                                            (204, 113, (110, 29, 3))]
    # decision scores per stage: the image scores, then DPC-kNN's density, γ and point-to-centre distances
    assert [s.scored for s in steps] == [4, 4, 4]
    plain = SparseVLMConfig(reduction_ratio=0.6667, merge_flag=False).plan(geom, KEY, Entering.start(geom))
    assert [s.scored for s in plain] == [1, 1, 1] and all(s.output is Output.KEPT for s in plain)
    assert stage_counts(64, (0.3125,), True) == [(64, 20, 14, 2)]
    retained = SparseVLMConfig(retained_tokens=128).plan(geom, KEY, Entering.start(geom))
    assert [s.detail[0] for s in retained] == [303, 110, 36]


@pytest.mark.parametrize("params, key, text", [
    ({"pruning_loc": [3]}, "pruning_loc", "ascending decoder layers in 0..2"),
    ({"pruning_loc": [2, 1], "stage_tokens": [9, 9]}, "pruning_loc", "ascending"),
    ({"pruning_loc": [2, 6, 15]}, "pruning_loc", "0..2"),
    ({"pruning_loc": 0.0001, "stage_tokens": [0.5]}, "pruning_loc", "ascending decoder layers"),  # a float scalar
    ({"pruning_loc": {"a": 1}, "stage_tokens": [0.5]}, "pruning_loc", "ascending decoder layers"),
    ({"pruning_loc": [1]}, "reduction_ratio", "needs reduction_ratio"),
    ({"pruning_loc": [1], "reduction_ratio": 1.0}, "reduction_ratio", "not a fraction in [0, 1)"),
    ({"pruning_loc": [1], "reduction_ratio": "0.5"}, "reduction_ratio", "not a fraction in [0, 1)"),
    ({"pruning_loc": [1], "retained_tokens": 19.2}, "retained_tokens", "expected an integer"),
    ({"pruning_loc": [1, 2], "reduction_ratio": 0.6667}, "reduction_ratio", "give stage_tokens instead"),
    ({"pruning_loc": [1], "reduction_ratio": 0.5}, "reduction_ratio", "settings 192, 128, 64, 960"),
    ({"pruning_loc": [1], "stage_tokens": [9, 9]}, "stage_tokens", "one count"),
    ({"pruning_loc": [1], "stage_tokens": [2.5]}, "stage_tokens", "one count"),
    ({"pruning_loc": [1], "stage_tokens": [9], "prune_flag": False}, "prune_flag", "not supported"),
    ({"rate": 0.5}, "rate", "unknown parameter for SparseVLM"),
])
def test_plan_errors_name_the_key(geometry, params, key, text):
    with pytest.raises(RecipeError) as e:
        config_from_params(SparseVLMConfig, params, KEY).plan(geometry, KEY, Entering.start(geometry))
    assert e.value.key == f"{KEY}.{key}" and text in str(e.value)


def test_prefill_exports_with_no_data_dependent_ops():
    case = padded_family_case("llava")
    vlm = _vlm(case, **CASES[1])
    with torch.no_grad():
        feed = {**case.batch, **vlm.vision.run({n: case.batch[n] for n in vlm.vision.input_names})}
    args = tuple(feed[n] for n in vlm.prefill.input_names)
    ep = export_matching_eager(vlm.prefill, args, exact=False)
    assert "gather" in assert_no_data_dependent_ops(ep)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_cached_decode_equals_the_no_cache_reference(tiny_model, processor, batch_size):
    """Greedy generation over three cache groups (64, 34 and 13 image tokens): every step's logits equal the
    whole reduced prompt re-run with the prefill's recorded selections and clusters."""
    plan = plan_recipe(ROOT / "recipes/tiny/sparsevlm.yml")
    reduced, decode = build_modules(plan, tiny_model)
    questions = ["What is shown here in this picture, in detail?", "Hi?"][:batch_size]
    batch = make_batch(processor, questions)
    run = generate(*eager_runners(reduced, decode), batch, layout=reduced.layout,
                   cfg=GenerationConfig(max_new_tokens=5), keep_logits=True)
    assert reduced.layout.groups == ((0, 1), (1, 3), (3, 4))
    for got, want in zip(run.step_logits, no_cache_logits(reduced, batch, run)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_tiny_recipe_compiles_with_parity(tmp_path):
    # ONNX only, for CI time (the README gives the recipe's AOTInductor figures, from one compile outside CI)
    res = compile_recipe(ROOT / "recipes/tiny/sparsevlm.yml", tmp_path / "out", "--targets", "onnx")
    assert res.returncode == 0, res.stderr + res.stdout
    assert "onnx: vision, prefill and decode parity passed; greedy generation equals eager" in res.stdout
    assert "eager generation with KV cache equals the no-cache reference" in res.stdout
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [(s["layer"], s["n_in"], s["n_out"], s["output"]) for s in manifest["schedule"]] == [
        (1, 64, 34, "assign"), (3, 34, 13, "assign")]
    assert manifest["parity"]["passed"] is True
