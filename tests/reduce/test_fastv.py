"""Static FastV against the independent official-style reference, batching, padding and plan errors."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import assert_no_data_dependent_ops, make_batch
from tokcompile.errors import RecipeError
from tokcompile.models import ReducedVLM
from tokcompile.reduce.base import Entering
from tokcompile.reduce.fastv import FastVConfig, keep_count
from tokcompile.reference import eager_attention, fastv_reference


def _vlm(model, adapter, geometry, K=2, rate=0.5):
    cfg = FastVConfig(pruning_loc=K, rate=rate)
    schedule = cfg.plan(geometry, "sparse.special", Entering.start(geometry))
    return ReducedVLM(model, adapter, geometry, schedule, (cfg,), 4).eval()


@pytest.mark.parametrize("K,rate", [(1, 0.5), (2, 0.778), (3, 0.25)])
def test_static_fastv_matches_official_style_reference(tiny_model, adapter, geometry, batch, K, rate):
    vlm = _vlm(tiny_model, adapter, geometry, K, rate)
    with torch.no_grad():
        logits, kept = vlm(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    k = keep_count(64, rate)
    assert kept.shape == (2, k)
    for b in range(2):
        sample = adapter.sample_inputs(batch, b, geometry)
        ref_logits, ref_kept = fastv_reference(
            tiny_model, adapter, sample, image_token_id=4, pruning_loc=K, keep=k,
        )
        assert torch.equal(kept[b], ref_kept)
        torch.testing.assert_close(logits[b], ref_logits, atol=1e-5, rtol=1e-5)


def test_samples_keep_their_own_tokens_and_padding_changes_nothing(tiny_model, adapter, geometry, batch):
    vlm = _vlm(tiny_model, adapter, geometry)
    with torch.no_grad():
        logits, kept = vlm(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        assert not torch.equal(kept[0], kept[1])
        for b in range(2):
            m = batch["attention_mask"][b].bool()
            ids, am = batch["input_ids"][b : b + 1, m], batch["attention_mask"][b : b + 1, m]
            one = vlm(ids, am, batch["pixel_values"][b : b + 1])
            assert torch.equal(one[1][0], kept[b])
            torch.testing.assert_close(one[0][0], logits[b], atol=1e-5, rtol=1e-5)


def test_right_padding_scores_from_last_real_token(tiny_model, adapter, geometry, processor):
    left = make_batch(processor, ["A long question about the picture?", "Short?"])
    vlm = _vlm(tiny_model, adapter, geometry)
    # Rebuild the batch with right padding: same real tokens, pads moved to the end.
    ids, mask = left["input_ids"].clone(), left["attention_mask"].clone()
    for b in range(2):
        n = int(mask[b].sum())
        ids[b] = torch.cat([ids[b][mask[b].bool()], torch.full((ids.shape[1] - n,), 3)])
        mask[b] = torch.cat([torch.ones(n, dtype=mask.dtype), torch.zeros(ids.shape[1] - n, dtype=mask.dtype)])
    with torch.no_grad():
        a = vlm(left["input_ids"], left["attention_mask"], left["pixel_values"])
        b = vlm(ids, mask, left["pixel_values"])
    assert torch.equal(a[1], b[1])
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)


def test_keep_count_and_schedule(geometry):
    (step,) = FastVConfig(pruning_loc=3, rate=0.778).plan(geometry, "k", Entering.start(geometry))
    assert (step.layer, step.n_in, step.n_out) == (3, 64, keep_count(64, 0.778)) == (3, 64, 14)
    assert keep_count(576, 0.778) == 128 and keep_count(576, 0.5) == 288


@pytest.mark.parametrize(
    "kwargs,key,text",
    [
        ({"rate": 1.0}, "sparse.special.rate", "outside [0, 1)"),
        ({"rate": -0.1}, "sparse.special.rate", "outside [0, 1)"),
        ({"pruning_loc": 4}, "sparse.special.pruning_loc", "1..3"),
        ({"pruning_loc": 0}, "sparse.special.pruning_loc", "at least 1"),
        ({"rate": 0.995}, "sparse.special.rate", "keeps 0 of 64"),
    ],
)
def test_plan_errors_name_the_key(geometry, kwargs, key, text):
    with pytest.raises(RecipeError) as e:
        FastVConfig(**kwargs).plan(geometry, "sparse.special", Entering.start(geometry))
    assert e.value.key == key and text in str(e.value)


def test_eager_attention_context_restores(tiny_model):
    before = tiny_model.config.text_config._attn_implementation
    with eager_attention(tiny_model):
        assert tiny_model.config.text_config._attn_implementation == "eager"
    assert tiny_model.config.text_config._attn_implementation == before == "sdpa"


def test_export_with_static_shapes_has_no_data_dependent_ops(tiny_model, adapter, geometry, batch):
    """No tensor value decides a shape: the graph exports with every dimension static."""
    vlm = _vlm(tiny_model, adapter, geometry)
    with torch.no_grad():
        feed = {**batch, **vlm.vision.run({"pixel_values": batch["pixel_values"]})}
    args = tuple(feed[n] for n in vlm.prefill.input_names)
    ep = torch.export.export(vlm.prefill, args, strict=False)
    got = ep.module()(*args)
    with torch.no_grad():
        ref = vlm.prefill(*args)
    assert torch.equal(got[1], ref[1])
    torch.testing.assert_close(got[0], ref[0])
    ops = assert_no_data_dependent_ops(ep)
    assert "topk" in ops and "gather" in ops
