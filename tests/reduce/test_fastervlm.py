"""Static FasterVLM against the independent LightCompress-style reference (tiny LLaVA, padded batch of two),
batching and padding, the [CLS] row, plan counts and errors, the Qwen refusal, export, and one full compile."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from tests.conftest import ROOT, assert_no_data_dependent_ops, compile_recipe, export_matching_eager, padded_family_case
from tests.references.fastervlm import cls_attention, fastervlm_reference
from tokcompile.errors import RecipeError
from tokcompile.models import ReducedVLM
from tokcompile.models.reduced import VisionSteps
from tokcompile.pipeline import plan_recipe
from tokcompile.reduce.base import Entering, config_from_params
from tokcompile.reduce.context import VisionContext
from tokcompile.reduce.fastervlm import FasterVLMConfig, cls_scores, keep_count
from tokcompile.reduce.schedule import Output, Site

KEY = "sparse.special"


@pytest.fixture(scope="module")
def case():
    return padded_family_case("llava")


def _vlm(case, rate: float) -> ReducedVLM:
    cfg = FasterVLMConfig(rate=rate)
    schedule = cfg.plan(case.geom, KEY, Entering.start(case.geom))
    return ReducedVLM(case.model, case.adapter, case.geom, schedule, (cfg,), case.image_id).eval()


def _run(vlm: ReducedVLM, inputs: dict):
    with torch.no_grad():
        return vlm(*[inputs[n] for n in vlm.input_names])


# --- the static version equals the reference -----------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.778, 0.5, 0.0])
def test_static_fastervlm_equals_the_reference(case, rate):
    out = _run(_vlm(case, rate), case.batch)
    k = keep_count(64, rate)
    assert out["kept_0"].shape == (2, k + 1)
    worst = 0.0
    for b in range(2):
        sample = case.adapter.sample_inputs(case.batch, b, case.geom)
        ref_logits, ref_kept = fastervlm_reference(case.model, case.adapter, sample, image_token_id=case.image_id,
                                                   rate=rate)
        assert torch.equal(out["kept_0"][b], ref_kept)
        torch.testing.assert_close(out["logits"][b], ref_logits, atol=1e-5, rtol=1e-5)
        worst = max(worst, (out["logits"][b] - ref_logits).abs().max().item())
    print(f"rate {rate}: max |dlogit| vs reference {worst:.2e}")


def test_samples_pick_their_own_tokens_and_padding_changes_nothing(case):
    vlm = _vlm(case, 0.778)
    out = _run(vlm, case.batch)
    assert not torch.equal(out["kept_0"][0], out["kept_0"][1])
    for b in range(2):
        one = _run(vlm, case.adapter.sample_inputs(case.batch, b, case.geom))
        assert torch.equal(one["kept_0"][0], out["kept_0"][b])
        torch.testing.assert_close(one["logits"][0], out["logits"][b], atol=1e-5, rtol=1e-5)


def test_vision_graph_keeps_cls_first_and_gathers_the_kept_patches(case):
    vlm = _vlm(case, 0.5)
    inputs = {n: case.batch[n] for n in vlm.vision.input_names}
    with torch.no_grad():
        full = vlm.without_reduction().vision.run(inputs)["image_embeds"]  # (B, 64, D)
        got = vlm.vision.run(inputs)
    kept = got["kept_0"]  # (B, 33) tower tokens
    assert torch.equal(kept[:, 0], torch.zeros(2, dtype=torch.long))
    assert torch.equal(kept, kept.sort(dim=1).values)
    patches = kept[:, 1:] - 1  # (B, 32) image tokens
    assert torch.equal(got["image_source"], patches)
    torch.testing.assert_close(got["image_embeds"], full.gather(1, patches[..., None].expand(-1, -1, full.shape[-1])),
                               atol=1e-6, rtol=1e-6)


def test_cls_row_equals_hf_eager_attention(case):
    """The row the static version ranks by is HF CLIP's eager attention at the selected layer."""
    pv = case.batch["pixel_values"]
    captured = {}
    orig = VisionSteps.vision_out

    def spy(self, tokens, ctx):
        captured["ctx"], captured["p"] = ctx, tokens.n_protected
        return orig(self, tokens, ctx)

    vlm = _vlm(case, 0.778)
    VisionSteps.vision_out = spy
    try:
        with torch.no_grad():
            vlm.vision.run({n: case.batch[n] for n in vlm.vision.input_names})
    finally:
        VisionSteps.vision_out = orig
    ctx: VisionContext = captured["ctx"]
    got = cls_scores(ctx, captured["p"])  # (B, 64)
    for b in range(2):
        want, _ = cls_attention(case.model, pv[b : b + 1])
        torch.testing.assert_close(got[b], want, atol=1e-6, rtol=1e-5)


# --- plan: counts and errors ------------------------------------------------------------------------------------------


def test_plan_counts(geometry):
    (step,) = FasterVLMConfig().plan(geometry, KEY, Entering.start(geometry))
    assert (step.method, step.site, step.layer, step.n_in, step.n_out, step.output) == (
        "fastervlm", Site.VISION_OUT, 0, 65, 15, Output.KEPT)
    assert keep_count(576, 0.778) == 128 and keep_count(64, 0.0) == 64 and keep_count(14, 0.75) == 4
    cfg = config_from_params(FasterVLMConfig, {"rate": 0.5}, KEY)  # LightCompress's name
    (after_tome,) = cfg.plan(geometry, KEY, Entering(32, 33, (Site.VISION_BLOCK, 0)))
    assert (after_tome.n_in, after_tome.n_out) == (33, 17)  # counts what earlier steps leave: 16 of 32 patches


@pytest.mark.parametrize(
    "params,key,text",
    [
        ({"rate": 1.0}, "sparse.special.rate", "outside [0, 1)"),
        ({"rate": -0.1}, "sparse.special.rate", "outside [0, 1)"),
        ({"rate": 0.995}, "sparse.special.rate", "keeps 0 of 64"),
        ({"rate": "high"}, "sparse.special.rate", "expected a number"),
        ({"reduction_ratio": 0.5}, "sparse.special.reduction_ratio", "unknown parameter for FasterVLM"),
    ],
)
def test_plan_errors_name_the_key(geometry, params, key, text):
    with pytest.raises(RecipeError) as e:
        config_from_params(FasterVLMConfig, params, KEY).plan(geometry, KEY, Entering.start(geometry))
    assert e.value.key == key and text in str(e.value)


def _recipe(tmp_path, family: str, vision: dict | None = None, **special) -> object:
    sparse = {"method": "TokenReduction", "special": {"method": "FasterVLM", **special}}
    if vision is not None:
        sparse["vision"] = {"method": "TokenReduction", "special": vision}
    recipe = {"model": {"path": f"tiny-random:{family}"}, "inputs": {"batch_size": 2, "max_prompt_len": 64},
              "sparse": sparse}
    path = tmp_path / f"{family}.yml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_composes_after_tome_but_not_inside_the_same_block(tmp_path):
    plan = plan_recipe(_recipe(tmp_path, "llava", {"method": "ToMe", "r": [16, -16]}, rate=0.778),
                       out=tmp_path / "o")
    assert [(s.method, s.site, s.layer, s.n_in, s.n_out) for s in plan.schedule] == [
        ("tome", Site.VISION_BLOCK, 0, 65, 49), ("fastervlm", Site.VISION_OUT, 0, 49, 12)]  # round(48·0.222) = 11
    with pytest.raises(RecipeError) as e:
        plan_recipe(_recipe(tmp_path, "llava", {"method": "ToMe", "r": 16}, rate=0.778), out=tmp_path / "o")
    assert e.value.key == "sparse.special.method" and "vision block 1" in str(e.value)


def _cli_plan(recipe):
    return subprocess.run([sys.executable, str(ROOT / "compile.py"), str(recipe), "--plan"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_cli_plan_output_and_errors(tmp_path):
    res = _cli_plan(ROOT / "recipes/tiny/fastervlm.yml")
    assert res.returncode == 0, res.stderr
    assert "fastervlm at vision_out 0: 65 -> 15 vision-tower tokens" in res.stdout
    assert "14 of 64 image tokens reach the decoder" in res.stdout
    res = _cli_plan(_recipe(tmp_path, "llava", rate=1.2))
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "sparse.special.rate" in lines[0] and "[0, 1)" in lines[0]


def test_qwen_refuses_vision_out_in_one_line(tmp_path):
    res = _cli_plan(_recipe(tmp_path, "qwen2_5_vl", rate=0.778))
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert "sparse.special.method" in lines[0] and "patch merger" in lines[0]


# --- export ----------------------------------------------------------------------------------------------------------


def test_vision_graph_exports_with_no_data_dependent_ops(case):
    vlm = _vlm(case, 0.778)
    args = tuple(case.batch[n] for n in vlm.vision.input_names)
    ep = export_matching_eager(vlm.vision, args)
    ops = assert_no_data_dependent_ops(ep)
    assert "topk" in ops and "gather" in ops


@pytest.mark.slow
def test_tiny_recipe_compiles_to_onnx_with_parity(tmp_path):
    # ONNX only, for CI time: AOTInductor at this site is compiled by the tests of vision_out (VisionZip).
    res = compile_recipe(ROOT / "recipes/tiny/fastervlm.yml", tmp_path / "out", "--targets", "onnx")
    assert res.returncode == 0, res.stderr + res.stdout
    assert "parity passed" in res.stdout
    print(res.stdout[-3000:])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [(s["method"], s["site"], s["n_in"], s["n_out"]) for s in manifest["schedule"]] == [
        ("fastervlm", "vision_out", 65, 15)]
    assert manifest["parity"]["passed"] is True
