"""The official-style eager implementations the methods benchmark times (benchmarks/hooked_pact.py,
hooked_aim.py: the HF model with hooks and dynamic shapes or masks), against the compiler's eager run on the tiny
LLaVA. PACT and its deterministic baselines form the same clusters with logits within 1e-5 (HF's own attention
runs there, so this is also a second, independent check of the static form)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.methods import CONFIGS, QUESTION, _official_eager, _plan, _static_eager, without_scores
from tokcompile.models.tiny import build_model, build_processor
from tokcompile.parity import process

DETERMINISTIC = ("pact", "pact-dpc", "pact-agglomerative", "pact-dbscan")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plans")
    base = _plan("tiny", None, tmp, "base")
    g = base.geometry
    batch = process(build_processor("llava", "tiny"), base.adapter, g,
                    base.adapter.random_media(np.random.default_rng(0), 1, g), [QUESTION])
    return tmp, build_model("llava", seed=0, size="tiny"), batch


def _hf(model):
    def run(feed):
        with torch.no_grad():
            return model(**feed).logits[:, -1]
    return run


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_official_style_pact_equals_the_compilers_eager(tiny, name):
    tmp, model, batch = tiny
    cfg = next(c for c in CONFIGS if c.name == name)
    plan = _plan("tiny", cfg.sparse(4), tmp, name)
    r = _official_eager(cfg, plan, model, batch, _static_eager(plan, model, batch), _hf(model), repeats=1)
    assert r["same"] and r["logit_diff"] < 1e-5, r
    assert r["kind"] == "cluster" and 1 < r["count"] < 64


def test_official_style_tome_baseline_merges_as_the_compiler(tiny):
    """PACT's in-decoder ToMe baseline: a merge before every layer, the same slots at every step."""
    tmp, model, batch = tiny
    cfg = next(c for c in CONFIGS if c.name == "pact-tome")
    plan = _plan("tiny", cfg.sparse(4), tmp, "pact-tome")
    r = _official_eager(cfg, plan, model, batch, _static_eager(plan, model, batch), _hf(model), repeats=1)
    assert r["kind"] == "assign" and r["steps_agreeing"] == f"{len(plan.schedule)}/{len(plan.schedule)}", r
    assert r["same"] and r["logit_diff"] < 1e-5 and r["count"] == plan.schedule[-1].n_out, r
    assert not any(h for layer in model.model.language_model.layers for h in layer._forward_pre_hooks.values())


def test_kmeans_seeds_differently_but_keeps_the_cluster_count(tiny):
    """scikit-learn's KMeans stands in for faiss there: other clusters, the same k."""
    tmp, model, batch = tiny
    cfg = next(c for c in CONFIGS if c.name == "pact-kmeans")
    plan = _plan("tiny", cfg.sparse(4), tmp, "pact-kmeans")
    ours = _static_eager(plan, model, batch)
    r = _official_eager(cfg, plan, model, batch, ours, _hf(model), repeats=1)
    centre = ours[0][ours[1][-1]][0]
    assert r["count"] == int((centre == torch.arange(64)).sum()) == int(0.3 * 64)


def test_uncovered_options_are_refused(tiny):
    from benchmarks.hooked_pact import HookedPACT
    from tokcompile.reduce.pact import PACTConfig

    with pytest.raises(ValueError, match="use_IQR_in_token_pruning"):
        HookedPACT(tiny[1], 0, PACTConfig(use_IQR_in_token_pruning=True, pruning_filter_wth_percentage=False))


def test_official_style_aim_masks_what_the_compiler_removes(tiny):
    """AIM: the masking implementation keeps the same image tokens as the compiler's graph, which removes them
    (the masked rows' share of the PageRank walk is the only difference, and it does not change the choice
    here), with logits within 1e-5."""
    tmp, model, batch = tiny
    cfg = next(c for c in CONFIGS if c.name == "aim-piecewise")
    plan = _plan("tiny", cfg.sparse(4), tmp, "aim")
    before = model.model.language_model.config._attn_implementation
    r = _official_eager(cfg, plan, model, batch, _static_eager(plan, model, batch), _hf(model), repeats=1)
    assert r["kind"] == "kept" and r["count"] == plan.schedule[-1].n_out
    assert r["same"] and r["logit_diff"] < 1e-5, r
    assert model.model.language_model.config._attn_implementation == before  # restored by remove()


def test_the_unreported_variant_drops_only_the_decision_scores(tiny):
    """`methods.py --unreported` times each plan beside itself without score outputs: the same step outputs and
    selections, no `score_j_c`."""
    from tokcompile.models import ReducedVLM

    tmp, model, batch = tiny
    cfg = next(c for c in CONFIGS if c.name == "tome-r16")
    plan = _plan("tiny", cfg.sparse(4), tmp, cfg.name)
    bare = without_scores(plan)
    vlms = [ReducedVLM(model, p.adapter, p.geometry, p.schedule, p.reducers, p.image_token_id).eval()
            for p in (plan, bare)]
    assert vlms[0].layout.score_outputs and not vlms[1].layout.score_outputs
    assert vlms[0].layout.step_outputs == vlms[1].layout.step_outputs
    with torch.no_grad():
        outs = [v.run(batch) for v in vlms]
    for name in vlms[0].layout.step_outputs:
        assert torch.equal(outs[0][name], outs[1][name])
    torch.testing.assert_close(outs[0]["logits"], outs[1]["logits"], atol=0, rtol=0)
