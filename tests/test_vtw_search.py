"""`python -m tokcompile vtw-search`: VTW's KL criterion for its withdrawal layer, against the independent VTW
reference (tests/references/vtw.py) and the official KL (`KLDivLoss(reduction='batchmean')`)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.references.vtw import vtw_reference
from tokcompile.cli import vtw_search_main
from tokcompile.errors import RecipeError
from tokcompile.models.loading import load_model, load_processor
from tokcompile.plan import resolve
from tokcompile.quant.calib import calibration_batches
from tokcompile.recipe import CalibConfig, load_recipe
from tokcompile.vtw_search import candidate_layers, choose_layer, kl_withdrawn_to_full, search

RECIPE = """base: {{seed: 7}}
model: {{path: "tiny-random:{family}"}}
inputs: {{batch_size: 2, max_prompt_len: 320}}
sparse: {{special: {{method: VTW, pruning_loc: 1{extra}}}}}
export: {{targets: [onnx]}}
"""


def _recipe(tmp_path, family: str, extra: str = "") -> str:
    path = tmp_path / f"{family}_vtw.yml"
    path.write_text(RECIPE.format(family=family, extra=extra))
    return str(path)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_every_candidates_kl_is_the_references(tmp_path, family):
    """Three synthetic prompts in batches of two (one padded): the search's mean KL per candidate layer equals
    the reference's (each sample alone, unpadded, withdrawal by the official cut), KL as the official code
    computes it."""
    path = _recipe(tmp_path, family)
    result = search(path, samples=3, log=lambda _: None)
    recipe = load_recipe(path)
    plan = resolve(recipe)
    model = load_model(recipe.model.path, plan.config, recipe.base.seed, False)
    processor = load_processor(recipe.model.path, False)
    batches = calibration_batches(dataclasses.replace(CalibConfig(), n_samples=3), processor, plan.adapter,
                                  plan.geometry, recipe.base.seed, 2)
    samples = [plan.adapter.sample_inputs(b, i, plan.geometry) for b in batches
               for i in range(b["input_ids"].shape[0])]
    assert len(samples) == 3 and result.samples == 3
    L = plan.geometry.n_layers
    assert result.layers == list(range(1, L))
    kl_official = torch.nn.KLDivLoss(reduction="batchmean")
    for k, got in zip(result.layers, result.kl):
        per_sample = []
        for s in samples:
            with torch.no_grad():
                full = model(**s, use_cache=False).logits[0, -1]
            withdrawn, kept = vtw_reference(model, plan.adapter, s, image_token_id=plan.image_token_id,
                                            pruning_loc=k)
            assert kept.numel() == 0
            per_sample.append(float(kl_official(full.log_softmax(-1)[None], withdrawn.softmax(-1)[None])))
        want = sum(per_sample) / len(per_sample)
        # fp32 logits differ by ~1e-6 between the padded batch (SDPA) and the unpadded sample (eager); the KL of
        # two close distributions inherits that as an absolute error of ~1e-7
        assert got == pytest.approx(want, rel=1e-3, abs=1e-6), f"layer {k}: {got} against {want}"
    assert result.chosen == choose_layer(result.layers, result.kl, 0.003)


def test_kl_is_zero_for_equal_logits_and_positive_otherwise():
    a = torch.randn(3, 11)
    assert torch.allclose(kl_withdrawn_to_full(a, a), torch.zeros(3), atol=1e-6)
    assert (kl_withdrawn_to_full(a, a.flip(-1)) > 0).all()


def test_the_first_layer_at_or_below_eta_is_chosen():
    assert choose_layer([5, 6, 7, 8], [0.01, 0.003, 0.001, 0.004], 0.003) == 6
    assert choose_layer([5, 6], [0.01, 0.02], 0.003) is None
    assert candidate_layers(32, None) == list(range(5, 32))
    assert candidate_layers(4, None) == [1, 2, 3]
    with pytest.raises(RecipeError, match="--start"):
        candidate_layers(4, 4)


def test_cli_prints_the_table_and_the_line_to_write(tmp_path, capsys):
    path = _recipe(tmp_path, "llava", ", eta: 1.0")  # every layer qualifies: the first candidate is chosen
    assert vtw_search_main([path, "--samples", "2"]) == 0
    out = capsys.readouterr().out
    assert "mean KL" in out and "K = 1: write" in out and "pruning_loc: 1" in out


def test_cli_errors_are_one_line_with_exit_2(tmp_path, capsys):
    assert vtw_search_main([_recipe(tmp_path, "llava"), "--samples", "2", "--eta", "1e-12"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: sparse.special.eta: no candidate layer") and err.count("\n") == 1
    assert vtw_search_main([_recipe(tmp_path, "llava", ", eta: -1")]) == 2
    assert "sparse.special.eta" in capsys.readouterr().err
    assert vtw_search_main([_recipe(tmp_path, "llava"), "--samples", "0"]) == 2
    assert "error: --samples: got 0" in capsys.readouterr().err
    fastv = tmp_path / "fastv.yml"
    fastv.write_text(RECIPE.format(family="llava", extra="").replace("VTW, pruning_loc: 1", "FastV, pruning_loc: 1, "
                                                                                         "rate: 0.5"))
    assert vtw_search_main([str(fastv)]) == 2
    assert "only token reduction is VTW (it has: FastV)" in capsys.readouterr().err
