"""Every built-in family through the family-agnostic paths: plan resolution, GPTQ calibrated through the
reduction (the driver builds each family's first TokenState from the processor's outputs), RTN, and the
prefill/decode pair against a no-cache reference. Family-specific checks live in test_<family>.py."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml

from tokcompile.generation import GenerationConfig, generate, no_cache_logits
from tokcompile.graphs import build_modules, eager_runners
from tokcompile.models import ADAPTERS, ReducedVLM, tiny
from tokcompile.parity import make_inputs
from tokcompile.pipeline import plan_recipe
from tokcompile.quant import GPTQConfig, RTNConfig, WeightQuantConfig, quantize_, select_linears
from tokcompile.quant.calib import calibration_batches
from tokcompile.quant.sequential import gptq_sequential
from tokcompile.recipe import CalibConfig

W4 = WeightQuantConfig(bit=4, symmetric=True, group_size=32)
FAMILIES = [f for f in ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")
            if f in tiny.FAMILIES]


def test_every_family_has_a_tiny_model_and_an_adapter():
    assert set(FAMILIES) == set(tiny.FAMILIES) == set(ADAPTERS.keys())


def _plan(tmp_path, family, **inputs):
    recipe = {
        "model": {"path": f"tiny-random:{family}"},
        "inputs": {"batch_size": 2, "max_prompt_len": 64, **inputs},
        "sparse": {"method": "TokenReduction", "special": {"method": "FastV", "pruning_loc": 2, "rate": 0.5}},
    }
    path = tmp_path / f"{family}.yml"
    path.write_text(yaml.safe_dump(recipe))
    return plan_recipe(path, out=tmp_path / "out")


@pytest.fixture(scope="module", params=FAMILIES + ["llava_onevision/video"])
def family_case(request, tmp_path_factory):
    family, _, media = request.param.partition("/")
    if family not in FAMILIES:
        pytest.skip(f"{family} is not built in")
    plan = _plan(tmp_path_factory.mktemp(family), family, **({"video_frames": 4} if media else {}))
    model = tiny.build_model(family, seed=0)
    processor = tiny.build_processor(family)
    return plan, model, processor


def test_gptq_through_the_reduction_and_rtn(family_case):
    plan, model, processor = family_case
    g = plan.geometry
    batches = calibration_batches(CalibConfig(name="synthetic", n_samples=4), processor, plan.adapter, g, seed=0,
                                  batch_size=2)
    gptq_model, rtn_model = copy.deepcopy(model), copy.deepcopy(model)
    linears = select_linears(gptq_model, plan.adapter.quant_include, plan.adapter.quant_ignore)
    assert len(linears) == 7 * g.n_layers  # q, k, v, o, gate, up, down: the decoder only
    reduced = ReducedVLM(gptq_model, plan.adapter, g, plan.schedule, plan.reducers, plan.image_token_id).eval()
    report = gptq_sequential(reduced, batches, GPTQConfig(weight=W4), linears, with_reduction=True, log=lambda m: None)
    assert [r["layer"] for r in report["layers"]] == list(range(g.n_layers))
    # Layers from the pruning step on calibrate on the kept tokens only.
    step = plan.schedule[0]
    pruned = 2 * 2 * (step.n_in - step.n_out)  # two batches of two samples
    before, after = report["layers"][step.layer - 1]["tokens"], report["layers"][step.layer]["tokens"]
    assert before - after == pruned
    quantize_(rtn_model, RTNConfig(weight=W4), include=plan.adapter.quant_include, ignore=plan.adapter.quant_ignore)

    held_out = make_inputs(processor, plan.adapter, g, 2, 1, seed=123, max_len=10_000)[0].batch
    names = reduced.input_names

    def logits(m):
        vlm = ReducedVLM(m, plan.adapter, g, plan.schedule, plan.reducers, plan.image_token_id).eval()
        with torch.no_grad():
            return vlm(*[held_out[n] for n in names])[0]

    ref = logits(model)
    err_g, err_r = (logits(gptq_model) - ref).norm(), (logits(rtn_model) - ref).norm()
    assert torch.isfinite(err_g) and 0 < err_g < err_r


def test_cached_decode_equals_the_no_cache_reference(family_case):
    plan, model, processor = family_case
    reduced, decode = build_modules(plan, model)
    batch = make_inputs(processor, plan.adapter, plan.geometry, 2, 1, seed=7, max_len=10_000)[0].batch

    run = generate(*eager_runners(reduced, decode), batch, layout=reduced.layout,
                   cfg=GenerationConfig(max_new_tokens=6), keep_logits=True)
    ref = no_cache_logits(reduced, batch, run)
    assert len(ref) == 6
    for got, want in zip(run.step_logits, ref):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
