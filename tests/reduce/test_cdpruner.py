"""Static CDPruner against the independent reference written the way the official code runs (tiny LLaVA, padded
batch of two, a real CLIP checkpoint directory, one and two question windows), the greedy DPP against the
official loop, plan errors and refusals, export, and one compile."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from tests.conftest import (
    PADDED_QUESTIONS,
    ROOT,
    assert_no_data_dependent_ops,
    compile_recipe,
    export_matching_eager,
    padded_family_case,
)
from tests.references.cdpruner import cdpruner_reference, dpp_map
from tokcompile.errors import RecipeError
from tokcompile.models import ReducedVLM
from tokcompile.pipeline import plan_recipe
from tokcompile.question import QuestionTokenizer
from tokcompile.reduce.base import Entering, config_from_params
from tokcompile.reduce.cdpruner import CDPrunerConfig, greedy_map
from tokcompile.reduce.schedule import Output, Site

KEY = "sparse.special"
TINY = "tiny-random:clip@32"
LONG = ("Look at the whole picture carefully and tell me how many shapes of each colour you can see, "
        "and which one is the largest?")  # more than 77 tokens of the tiny byte-level CLIP tokenizer


@pytest.fixture(scope="module")
def case():
    return padded_family_case("llava")


def _run(case, cfg: CDPrunerConfig, questions=PADDED_QUESTIONS):
    (step,) = cfg.plan(case.geom, KEY, Entering.start_for(case.geom, case.adapter))
    vlm = ReducedVLM(case.model, case.adapter, case.geom, (step,), (cfg,), case.image_id).eval()
    feed = dict(case.batch)
    feed.update(QuestionTokenizer.load(cfg.question(KEY))(list(questions)))
    with torch.no_grad():
        return vlm.run(feed), vlm, feed


@pytest.mark.parametrize(("k", "segments", "questions"), [(16, 1, PADDED_QUESTIONS), (8, 1, PADDED_QUESTIONS),
                                                          (40, 1, PADDED_QUESTIONS), (16, 2, [LONG, "Hi?"])])
def test_static_cdpruner_equals_the_reference(case, clip_dir, k, segments, questions):
    cfg = CDPrunerConfig(visual_token_num=k, text_encoder=clip_dir, text_segments=segments)
    out, _, feed = _run(case, cfg, questions)
    if segments == 2:
        assert feed["question_mask"][0, 1].any() and not feed["question_mask"][1, 1].any()
    assert out["kept_0"].shape == (2, k) and out["image_embeds"].shape[1] == k
    worst = 0.0
    for b in range(2):
        sample = case.adapter.sample_inputs(case.batch, b, case.geom)
        ref_logits, ref_kept = cdpruner_reference(case.model, clip_dir, sample, questions[b], case.image_id, k)
        assert out["kept_0"][b].tolist() == ref_kept
        torch.testing.assert_close(out["logits"][b], ref_logits, atol=1e-5, rtol=1e-5)
        worst = max(worst, (out["logits"][b] - ref_logits).abs().max().item())
    print(f"CDPruner k {k}, {segments} window(s): max |dlogit| vs reference {worst:.2e}")


def test_greedy_map_equals_the_official_loop_on_random_kernels():
    gen = torch.Generator().manual_seed(0)
    for n, k in ((12, 5), (64, 16), (30, 29)):
        x = torch.randn(3, n, 48, generator=gen)
        x = x / x.norm(dim=-1, keepdim=True)
        r = torch.rand(3, n, generator=gen) + 1e-3
        kernel = r[:, :, None] * (x @ x.transpose(1, 2)) * r[:, None, :]  # (3, n, n) PSD
        got = greedy_map(kernel, k)
        for b in range(3):  # the official loop runs one image at a time
            assert got[b].tolist() == dpp_map(kernel[b : b + 1], k)[0].tolist()
    # Decision scores: k finite gain vectors; a picked token holds its initial gain, so every row's largest
    # entry stays the kernel's largest diagonal (the near-tie margin's scale) while the gains shrink.
    seen = []
    assert greedy_map(kernel, k, lambda g: seen.append(g) or g).tolist() == greedy_map(kernel, k).tolist()
    diag = torch.diagonal(kernel, dim1=1, dim2=2)  # (3, n)
    assert len(seen) == k and all(bool(g.isfinite().all()) for g in seen)
    assert all(torch.equal(g.amax(-1), diag.amax(-1)) for g in seen)


def test_the_question_decides_the_selection(case):
    cfg = CDPrunerConfig(visual_token_num=16, text_encoder=TINY)
    a, _, _ = _run(case, cfg, ["a red square on the left", "Hi?"])
    b, _, _ = _run(case, cfg, ["how many blue circles are there", "Hi?"])
    assert not torch.equal(a["kept_0"][0], b["kept_0"][0])
    assert torch.equal(a["kept_0"][1], b["kept_0"][1])


def test_plan_counts(case):
    (step,) = CDPrunerConfig(visual_token_num=16, text_encoder=TINY).plan(
        case.geom, KEY, Entering.start_for(case.geom, case.adapter))
    assert (step.site, step.n_in, step.n_out, step.output, step.question) == (
        Site.PROJECTOR_OUT, 64, 16, Output.KEPT, True)
    spec = CDPrunerConfig(text_encoder=TINY, text_segments=3).question(KEY)
    assert (spec.segments, spec.length, spec.truncate) == (3, 77, False)


@pytest.mark.parametrize(
    ("params", "key", "text"),
    [
        ({"visual_token_num": 16}, "sparse.special.text_encoder", "needs CLIP's text tower"),
        ({"visual_token_num": 64, "text_encoder": TINY}, "sparse.special.visual_token_num", "outside [1, 63]"),
        ({"visual_token_num": 0, "text_encoder": TINY}, "sparse.special.visual_token_num", "outside [1, 63]"),
        ({"text_encoder": TINY, "text_segments": 0}, "sparse.special.text_segments", "at least 1"),
        ({"text_encoder": "tiny-random:clip@64"}, "sparse.special.text_encoder", "takes 64-wide features"),
    ],
)
def test_plan_errors_name_the_key(case, params, key, text):
    with pytest.raises(RecipeError) as e:
        config_from_params(CDPrunerConfig, params, KEY).plan(case.geom, KEY,
                                                             Entering.start_for(case.geom, case.adapter))
    assert e.value.key == key and text in str(e.value)


def _recipe(tmp_path, family: str, **special) -> object:
    recipe = {"model": {"path": f"tiny-random:{family}"}, "inputs": {"batch_size": 2, "max_prompt_len": 64},
              "sparse": {"method": "TokenReduction",
                         "special": {"method": "CDPruner", "text_encoder": TINY, **special}}}
    path = tmp_path / f"{family}.yml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize("family", ["llava_next", "qwen2_5_vl"])
def test_families_without_projector_features_are_refused(tmp_path, family):
    with pytest.raises(RecipeError) as e:
        plan_recipe(_recipe(tmp_path, family), out=tmp_path / "o")
    assert e.value.key == "sparse.special.method" and "features the projector received" in str(e.value)


def test_two_steps_that_read_the_question_differently_are_refused(tmp_path):
    recipe = {"model": {"path": "tiny-random:llava"}, "inputs": {"batch_size": 2, "max_prompt_len": 64},
              "sparse": {"method": "TokenReduction",
                         "vision": {"method": "TokenReduction",
                                    "special": {"method": "TRIM", "text_encoder": TINY, "keep_ratio": 0.5}},
                         "special": {"method": "CDPruner", "text_encoder": TINY, "visual_token_num": 8}}}
    path = tmp_path / "two.yml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError) as e:  # TRIM truncates the question to one window, CDPruner does not
        plan_recipe(path, out=tmp_path / "o")
    assert e.value.key == "sparse.special.text_encoder" and "one question input" in str(e.value)
    assert "not truncated" in str(e.value)


def test_vision_graph_exports_with_no_data_dependent_ops(case):
    out, vlm, feed = _run(case, CDPrunerConfig(visual_token_num=16, text_encoder=TINY))
    args = tuple(feed[n] for n in vlm.vision.input_names)
    ep = export_matching_eager(vlm.vision, args, exact=False)
    assert_no_data_dependent_ops(ep)


def test_tiny_recipe_compiles_to_onnx_with_parity(tmp_path):
    # ONNX only, for CI time: AOTInductor with question inputs is compiled by TRIM's test
    res = compile_recipe(ROOT / "recipes/tiny/cdpruner.yml", tmp_path / "out", "--targets", "onnx")
    assert res.returncode == 0, res.stderr + res.stdout
    assert "parity passed" in res.stdout
    print(res.stdout[-2000:])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [(s["method"], s["site"], s["n_in"], s["n_out"], s["scored"]) for s in manifest["schedule"]] == [
        ("cdpruner", "projector_out", 64, 16, 16)]


def test_a_parity_prompt_longer_than_the_text_segments_names_the_key(tmp_path):
    """The compile's own parity prompts pass through the text encoder too: one too long for text_segments is one
    line naming that key and the count that holds it (the tiny CLIP tokenizer spends a token per character)."""
    recipe = yaml.safe_load((ROOT / "recipes/tiny/cdpruner.yml").read_text())
    recipe["parity"]["samples"] = 3
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump(recipe))
    res = compile_recipe(path, tmp_path / "out", "--targets", "onnx")
    assert res.returncode == 2, res.stderr + res.stdout
    assert res.stderr.strip().splitlines() == [
        "error: sparse.special.text_segments: the compile's parity prompt 'Write a short caption for this photo, "
        "mentioning the main subject and the background.' needs 87 text-encoder tokens, more than the 1 × 77 it "
        "sets; raise it to 2, or parity.samples to 2 so that it is not used"]
    assert not (tmp_path / "out").exists()
