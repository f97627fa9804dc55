"""The layer-by-layer GPTQ driver on the tiny LLaVA: calibration through the processor, padding kept out of
the Hessians, reduction-aware calibration, and GPTQ beating RTN on held-out inputs."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import make_batch
from tokcompile.models import ReducedVLM
from tokcompile.quant import GPTQConfig, RTNConfig, WeightQuantConfig, quantize_, select_linears
from tokcompile.quant.calib import calibration_batches
from tokcompile.quant.primitives import compute_qparams, dequantize, quantize
from tokcompile.quant.sequential import gptq_sequential
from tokcompile.recipe import CalibConfig
from tokcompile.reduce.base import Entering
from tokcompile.reduce.fastv import FastVConfig

W4 = WeightQuantConfig(bit=4, symmetric=True, group_size=32)


def _reduced(model, adapter, geometry, with_step=True):
    cfg = FastVConfig(pruning_loc=2, rate=0.75)
    sched, reds = (cfg.plan(geometry, "k", Entering.start(geometry)), (cfg,)) if with_step else ((), ())
    return ReducedVLM(model, adapter, geometry, sched, reds, 4).eval()


def _gptq(model, adapter, geometry, batches, with_reduction, results=None, log=lambda m: None):
    linears = select_linears(model, ("model.language_model",), ())
    return gptq_sequential(_reduced(model, adapter, geometry), batches, GPTQConfig(weight=W4), linears,
                           with_reduction=with_reduction, log=log, results=results), linears


@pytest.fixture(scope="module")
def calib(processor, adapter, geometry):
    return calibration_batches(CalibConfig(name="synthetic", n_samples=6),
        processor, adapter, geometry, seed=0, batch_size=3)


def test_layers_are_quantized_on_the_grid_with_progress(tiny_model, adapter, geometry, calib):
    model = copy.deepcopy(tiny_model)
    lines: list[str] = []
    results: dict = {}
    report, linears = _gptq(model, adapter, geometry, calib, False, results, lines.append)
    assert [r["layer"] for r in report["layers"]] == [0, 1, 2, 3] and len(lines) == 4
    assert all("output error" in ln and "model.language_model.layers." in ln for ln in lines)
    assert all(0 < r["rel_output_error"] < 0.5 for r in report["layers"])
    real_tokens = sum(int(b["attention_mask"].sum()) for b in calib)
    assert all(r["tokens"] == real_tokens for r in report["layers"])  # padding never counted
    for fqn, m in linears.items():
        grid = results[fqn]
        assert grid.codes.dtype == torch.int8
        assert int(grid.codes.min()) >= -8 and int(grid.codes.max()) <= 7
        assert torch.equal(m.weight, dequantize(grid.codes.int(), grid.scale, grid.zero, 32))
        assert not torch.equal(m.weight, dict(tiny_model.named_modules())[fqn].weight)


def test_with_reduction_changes_only_layers_after_the_step(tiny_model, adapter, geometry, calib):
    plain, reduced = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    _, a = _gptq(plain, adapter, geometry, calib, False)
    rep, b = _gptq(reduced, adapter, geometry, calib, True)
    for fqn in a:
        layer = int(fqn.split("layers.")[1].split(".")[0])
        same = torch.equal(a[fqn].weight, b[fqn].weight)
        assert same == (layer < 2), fqn  # FastV at K=2: layers 0-1 see the same tokens either way
    assert rep["layers"][2]["tokens"] < rep["layers"][1]["tokens"]


def test_gptq_beats_rtn_on_held_out_inputs(tiny_model, adapter, geometry, calib, processor):
    gptq_model, rtn_model = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    _gptq(gptq_model, adapter, geometry, calib, False)
    quantize_(rtn_model, RTNConfig(weight=W4), include=("model.language_model",), ignore=())
    held_out = make_batch(processor, ["A question nobody calibrated on?", "Another one, longer than that?"], seed=99)
    args = (held_out["input_ids"], held_out["attention_mask"], held_out["pixel_values"])
    with torch.no_grad():
        ref = _reduced(tiny_model, adapter, geometry, False)(*args)[0]
        err_g = (_reduced(gptq_model, adapter, geometry, False)(*args)[0] - ref).norm()
        err_r = (_reduced(rtn_model, adapter, geometry, False)(*args)[0] - ref).norm()
    assert err_g < err_r


def test_rtn_grid_is_what_int4_export_stores(tiny_model):
    w = tiny_model.model.language_model.layers[0].mlp.down_proj.weight.detach()
    scale, zero = compute_qparams(w, 4, True, 32)
    codes = quantize(w, scale, zero, 4, True, 32)
    model = copy.deepcopy(tiny_model)
    quantize_(model, RTNConfig(weight=W4), include=("model.language_model",), ignore=())
    assert torch.equal(model.model.language_model.layers[0].mlp.down_proj.weight, dequantize(codes, scale, zero, 32))


def test_true_sequential_feeds_quantized_sublayers_forward(tiny_model, adapter, geometry, calib):
    """q/k/v come first either way; o_proj then sees q/k/v's quantized output only with true_sequential."""
    models = {flag: copy.deepcopy(tiny_model) for flag in (True, False)}
    for flag, model in models.items():
        linears = select_linears(model, ("model.language_model",), ())
        gptq_sequential(_reduced(model, adapter, geometry), calib, GPTQConfig(weight=W4, true_sequential=flag),
                        linears, with_reduction=False, log=lambda m: None)
    attn = "model.language_model.layers.0.self_attn"
    on, off = models[True].get_submodule(attn), models[False].get_submodule(attn)
    assert torch.equal(on.q_proj.weight, off.q_proj.weight)
    assert not torch.equal(on.o_proj.weight, off.o_proj.weight)
