"""Static DART against the independent LightCompress-style reference (tiny LLaVA and tiny Qwen2.5-VL, padded
batches of two), batching and padding, plan counts and errors, export, and one full compile."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import ROOT, assert_no_data_dependent_ops, compile_recipe, export_matching_eager, padded_family_case
from tests.references.dart import dart_reference
from tokcompile.errors import RecipeError
from tokcompile.models import ReducedVLM
from tokcompile.reduce.base import Entering, config_from_params
from tokcompile.reduce.dart import DARTConfig, counts
from tokcompile.reduce.schedule import Site

KEY = "sparse.special"


@pytest.fixture(scope="module", params=["llava", "qwen2_5_vl"])
def case(request):
    return padded_family_case(request.param)


def _vlm(case, **params) -> ReducedVLM:
    cfg = DARTConfig(**params)
    schedule = cfg.plan(case.geom, KEY, Entering.start(case.geom))
    return ReducedVLM(case.model, case.adapter, case.geom, schedule, (cfg,), case.image_id).eval()


def _run(vlm: ReducedVLM, inputs: dict):
    with torch.no_grad():
        return vlm(*[inputs[n] for n in vlm.input_names])


@pytest.mark.parametrize("params", [dict(pruning_loc=2, reduction_ratio=0.5),
                                    dict(pruning_loc=1, reduction_ratio=0.75, pivot_image_token=2, pivot_text_token=2),
                                    dict(pruning_loc=3, reduction_ratio=0.5, pivot_image_token=2, pivot_text_token=1)])
def test_static_dart_equals_the_reference(case, params):
    n = case.geom.n_image_tokens
    out = _run(_vlm(case, **params), case.batch)
    _, k = counts(n, params["reduction_ratio"], params.get("pivot_image_token", 4), params.get("pivot_text_token", 4))
    assert out["kept_0"].shape == (2, k)
    worst = 0.0
    for b in range(2):
        sample = case.adapter.sample_inputs(case.batch, b, case.geom)
        ref_logits, ref_kept = dart_reference(case.model, case.adapter, sample, image_token_id=case.image_id,
                                              **params)
        assert torch.equal(out["kept_0"][b], ref_kept)
        torch.testing.assert_close(out["logits"][b], ref_logits, atol=1e-5, rtol=1e-5)
        worst = max(worst, (out["logits"][b] - ref_logits).abs().max().item())
    print(f"{case.geom.family} {params}: max |dlogit| vs reference {worst:.2e}")


def test_samples_pick_their_own_tokens_and_padding_changes_nothing(case):
    vlm = _vlm(case, pruning_loc=2, reduction_ratio=0.5)
    out = _run(vlm, case.batch)
    assert not torch.equal(out["kept_0"][0], out["kept_0"][1])
    for b in range(2):
        one = _run(vlm, case.adapter.sample_inputs(case.batch, b, case.geom))
        assert torch.equal(one["kept_0"][0], out["kept_0"][b])
        torch.testing.assert_close(one["logits"][0], out["logits"][b], atol=1e-5, rtol=1e-5)


def test_plan_counts(geometry):
    (step,) = DARTConfig().plan(geometry, KEY, Entering.start(geometry))
    assert (step.method, step.site, step.layer, step.n_in, step.n_out) == ("dart", Site.DECODER_LAYER, 2, 64, 12)
    assert counts(576, 0.7778, 4, 4) == (15, 124) and counts(576, 0.7778, 8, 8) == (7, 120)


@pytest.mark.parametrize("params, key, text", [
    ({"pruning_loc": 0}, "pruning_loc", "outside the decoder's layers 1..3"),
    ({"reduction_ratio": 1.0}, "reduction_ratio", "outside [0, 1)"),
    ({"reduction_ratio": 0.99}, "reduction_ratio", "0 tokens per pivot"),
    ({"reduction_ratio": 0.0}, "reduction_ratio", "selections from 60 image tokens"),
    ({"pivot_image_token": 0, "pivot_text_token": 0}, "pivot_image_token", "at least one pivot"),
    ({"pivot_text_token": -1}, "pivot_text_token", "integer >= 0"),
    ({"rate": 0.5}, "rate", "unknown parameter for DART"),
])
def test_plan_errors_name_the_key(geometry, params, key, text):
    with pytest.raises(RecipeError) as e:
        config_from_params(DARTConfig, params, KEY).plan(geometry, KEY, Entering.start(geometry))
    assert e.value.key == f"{KEY}.{key}" and text in str(e.value)


def test_prefill_exports_with_no_data_dependent_ops():
    case = padded_family_case("llava")
    vlm = _vlm(case, pruning_loc=2, reduction_ratio=0.75)
    with torch.no_grad():
        feed = {**case.batch, **vlm.vision.run({n: case.batch[n] for n in vlm.vision.input_names})}
    args = tuple(feed[n] for n in vlm.prefill.input_names)
    ep = export_matching_eager(vlm.prefill, args, exact=False)
    ops = assert_no_data_dependent_ops(ep)
    assert "gather" in ops


@pytest.mark.slow
def test_tiny_recipe_compiles_to_onnx_with_parity(tmp_path):
    # ONNX only, for CI time: AOTInductor at this site is compiled by the demo export (FastV).
    res = compile_recipe(ROOT / "recipes/tiny/dart.yml", tmp_path / "out", "--targets", "onnx")
    assert res.returncode == 0, res.stderr + res.stdout
    assert "parity passed" in res.stdout
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [(s["method"], s["site"], s["n_in"], s["n_out"]) for s in manifest["schedule"]] == [
        ("dart", "decoder_layer", 64, 36)]
    assert manifest["parity"]["passed"] is True
