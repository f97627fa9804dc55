"""Static VisPruner against the independent LightCompress-style reference (tiny LLaVA, padded batch of two),
batching and padding, plan counts and errors, the refusals, export, and one full compile."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import ROOT, assert_no_data_dependent_ops, compile_recipe, export_matching_eager, padded_family_case
from tests.references.vispruner import vispruner_reference
from tokcompile.errors import RecipeError
from tokcompile.models import ReducedVLM
from tokcompile.reduce.base import Entering, config_from_params
from tokcompile.reduce.schedule import Output, Site
from tokcompile.reduce.vispruner import VisPrunerConfig, budget, drop_rounds, order_desc

KEY = "sparse.vision.special"


@pytest.fixture(scope="module")
def case():
    return padded_family_case("llava")


def _vlm(case, prune_ratio: float, important_ratio: float) -> ReducedVLM:
    cfg = VisPrunerConfig(prune_ratio=prune_ratio, important_ratio=important_ratio)
    schedule = cfg.plan(case.geom, KEY, Entering.start(case.geom))
    return ReducedVLM(case.model, case.adapter, case.geom, schedule, (cfg,), case.image_id).eval()


def _run(vlm: ReducedVLM, inputs: dict):
    with torch.no_grad():
        return vlm(*[inputs[n] for n in vlm.input_names])


@pytest.mark.parametrize("prune_ratio, important_ratio", [(0.75, 0.5), (0.75, 0.0), (0.75, 1.0), (0.5, 0.25),
                                                          (0.0, 0.5)])
def test_static_vispruner_equals_the_reference(case, prune_ratio, important_ratio):
    out = _run(_vlm(case, prune_ratio, important_ratio), case.batch)
    kept_n, _ = budget(64, prune_ratio, important_ratio)
    assert out["kept_0"].shape == (2, kept_n + 1)
    worst = 0.0
    for b in range(2):
        sample = case.adapter.sample_inputs(case.batch, b, case.geom)
        ref_logits, ref_kept = vispruner_reference(case.model, case.adapter, sample, image_token_id=case.image_id,
                                                   prune_ratio=prune_ratio, important_ratio=important_ratio)
        assert torch.equal(out["kept_0"][b], ref_kept)
        torch.testing.assert_close(out["logits"][b], ref_logits, atol=1e-5, rtol=1e-5)
        worst = max(worst, (out["logits"][b] - ref_logits).abs().max().item())
    print(f"prune {prune_ratio} important {important_ratio}: max |dlogit| vs reference {worst:.2e}")


def test_diverse_tokens_differ_from_attention_top_k(case):
    """The de-duplication matters: with no important tokens the kept set is not the attention top-k."""
    diverse = _run(_vlm(case, 0.75, 0.0), case.batch)["kept_0"]
    important = _run(_vlm(case, 0.75, 1.0), case.batch)["kept_0"]
    assert not torch.equal(diverse, important)


def test_samples_pick_their_own_tokens_and_padding_changes_nothing(case):
    vlm = _vlm(case, 0.75, 0.5)
    out = _run(vlm, case.batch)
    assert not torch.equal(out["kept_0"][0], out["kept_0"][1])
    for b in range(2):
        one = _run(vlm, case.adapter.sample_inputs(case.batch, b, case.geom))
        assert torch.equal(one["kept_0"][0], out["kept_0"][b])
        torch.testing.assert_close(one["logits"][0], out["logits"][b], atol=1e-5, rtol=1e-5)


def test_order_desc_breaks_ties_by_index():
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.5, 0.5], [1.0, 1.0, 1.0, 1.0, 1.0]])
    assert order_desc(scores).tolist() == [[1, 3, 4, 2, 0], [0, 1, 2, 3, 4]]


def test_plan_counts(geometry):
    (step,) = VisPrunerConfig(prune_ratio=0.75).plan(geometry, KEY, Entering.start(geometry))
    assert (step.method, step.site, step.layer, step.n_in, step.n_out, step.output) == (
        "vispruner", Site.VISION_OUT, 0, 65, 17, Output.KEPT)
    assert [budget(576, p, 0.5) for p in (0.6667, 0.7778, 0.8889)] == [(192, 96), (128, 64), (64, 32)]
    assert len(drop_rounds(576 - 64, 64)) == 56 and set(drop_rounds(576 - 64, 64)) == {8}
    assert drop_rounds(10, 6) == (4,) and drop_rounds(9, 6) is None and drop_rounds(20, 4) is None  # 20 -> 12: 8 > 6


@pytest.mark.parametrize("params, key, text", [
    ({"prune_ratio": 1.0}, "prune_ratio", "outside [0, 1)"),
    ({"prune_ratio": 0.995}, "prune_ratio", "keeps 0 of 64"),
    ({"important_ratio": 1.5}, "important_ratio", "outside [0, 1]"),
    ({"prune_ratio": 0.7778, "important_ratio": 0.5}, "important_ratio", "cannot split"),  # 14 kept, 57 candidates
    ({"rate": 0.5}, "rate", "unknown parameter for VisPruner"),
])
def test_plan_errors_name_the_key(geometry, params, key, text):
    with pytest.raises(RecipeError) as e:
        config_from_params(VisPrunerConfig, params, KEY).plan(geometry, KEY, Entering.start(geometry))
    assert e.value.key == f"{KEY}.{key}" and text in str(e.value)


def test_refusal_suggests_ratios_that_work(geometry):
    with pytest.raises(RecipeError) as e:
        VisPrunerConfig(prune_ratio=0.7778, important_ratio=0.5).plan(geometry, KEY, Entering.start(geometry))
    suggested = [float(v) for v in str(e.value).split("(e.g. ")[1].rstrip(")").split(" or ")]
    for r in suggested:
        assert VisPrunerConfig(prune_ratio=0.7778, important_ratio=r).plan(geometry, KEY, Entering.start(geometry))


def test_vision_graph_exports_with_no_data_dependent_ops(case):
    vlm = _vlm(case, 0.75, 0.5)
    args = tuple(case.batch[n] for n in vlm.vision.input_names)
    ep = export_matching_eager(vlm.vision, args)
    ops = assert_no_data_dependent_ops(ep)
    assert "scatter" in ops and "gather" in ops


@pytest.mark.slow
def test_tiny_recipe_compiles_to_onnx_with_parity(tmp_path):
    # ONNX only, for CI time: AOTInductor at this site is compiled by the tests of vision_out (VisionZip).
    res = compile_recipe(ROOT / "recipes/tiny/vispruner.yml", tmp_path / "out", "--targets", "onnx")
    assert res.returncode == 0, res.stderr + res.stdout
    assert "parity passed" in res.stdout
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [(s["method"], s["site"], s["n_in"], s["n_out"]) for s in manifest["schedule"]] == [
        ("vispruner", "vision_out", 65, 33)]
    assert manifest["parity"]["passed"] is True
