"""Checks of the RandomPrune reference that need no project implementation, on tiny LLaVA-1.5 and Qwen2.5-VL."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.references.randomprune import (
    causal_additive,
    draw_rand_idx,
    eager_attention,
    num_keep,
    randomprune_reference,
)
from tokcompile.models import ADAPTERS
from tokcompile.models.tiny import build_model, build_processor
from tokcompile.parity import process, random_images

QUESTION = "What is shown in this picture, in detail?"


@pytest.fixture(scope="module", params=["llava", "qwen2_5_vl"])
def fam(request) -> SimpleNamespace:
    model = build_model(request.param, seed=0).eval()
    adapter = ADAPTERS.get(request.param)()
    geom = adapter.geometry(model.config, None)
    images = random_images(np.random.default_rng(0), 1, geom.image_size)
    batch = process(build_processor(request.param), adapter, geom, images, [QUESTION])
    f = SimpleNamespace(model=model, adapter=adapter, geom=geom,
                        image_id=adapter.image_token_id(model.config, geom),
                        sample=adapter.sample_inputs(batch, 0, geom))
    f.L = len(adapter.language_model(model).layers)
    f.N = int((f.sample["input_ids"] == f.image_id).sum())
    with torch.no_grad():
        f.full = model(**f.sample, use_cache=False).logits[0, -1]
    return f


def _ref(f, K, R, seed=0):
    return randomprune_reference(f.model, f.adapter, f.sample, image_token_id=f.image_id, pruning_loc=K,
                                 prune_ratio=R, seed=seed)


@pytest.mark.parametrize("K", [0, 1, 3])
def test_nothing_pruned_is_the_hf_forward(fam, K):
    logits, kept = _ref(fam, K, 0.0)
    assert torch.equal(kept, torch.arange(fam.N))
    torch.testing.assert_close(logits, fam.full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("K,R,seed", [(0, 0.5, 0), (2, 0.5, 1), (3, 0.778, 7)])
def test_pruning_equals_hiding_the_dropped_image_keys_from_layer_k(fam, K, R, seed):
    """Brute force: keep the full sequence but mask the dropped image tokens as keys in layers >= K (they still
    attend to themselves, so no row is empty); every kept row, the last text token's included, is unchanged."""
    logits, kept = _ref(fam, K, R, seed)
    lm = fam.adapter.language_model(fam.model)
    ids = fam.sample["input_ids"][0]
    start = int(torch.nonzero(ids == fam.image_id)[0])
    dropped = torch.zeros_like(ids, dtype=torch.bool)
    dropped[start:start + fam.N] = True
    dropped[start + kept] = False
    with torch.no_grad(), eager_attention(fam.model):
        h = fam.model(**fam.sample, output_hidden_states=True, use_cache=False).hidden_states[K]
        pos = fam.adapter.hf_position_ids(fam.model, fam.sample)
        rope = lm.rotary_emb(h, pos)
        T = h.shape[1]
        mask = causal_additive(T, h.dtype).clone()
        hide = dropped[None, :] & ~torch.eye(T, dtype=torch.bool)
        mask[0, 0][hide] = torch.finfo(h.dtype).min
        for layer in lm.layers[K:]:
            o = layer(h, attention_mask=mask, position_embeddings=rope, position_ids=pos)
            h = o[0] if isinstance(o, tuple) else o
        expect = fam.adapter.lm_head(fam.model)(lm.norm(h))[0, -1]
    torch.testing.assert_close(logits, expect, atol=1e-5, rtol=1e-5)
    assert (logits - fam.full).abs().max() > 1e-4  # pruning changed the answer


def test_seed_decides_the_set_and_the_answer(fam):
    a, ka = _ref(fam, 2, 0.5, seed=0)
    b, kb = _ref(fam, 2, 0.5, seed=0)
    c, kc = _ref(fam, 2, 0.5, seed=1)
    assert torch.equal(ka, kb) and torch.equal(a, b)
    assert not torch.equal(ka, kc) and (a - c).abs().max() > 1e-6


@pytest.mark.parametrize("n,R,k", [(64, 0.5, 32), (576, 0.778, 128), (576, 0.9444, 32), (5, 0.5, 2), (7, 0.5, 4),
                                   (64, 0.0, 64)])
def test_keep_counts(n, R, k):
    assert num_keep(n, R) == k  # 2.5 -> 2, 3.5 -> 4: Python rounds half to even, as LightCompress does


def test_draw_is_a_seeded_permutation_prefix():
    for n, R, seed in [(64, 0.5, 0), (576, 0.778, 3), (10, 0.3, 42)]:
        idx = draw_rand_idx(n, R, seed)
        assert idx.dtype == torch.int64 and idx.shape == (num_keep(n, R),)
        assert len(set(idx.tolist())) == len(idx) and 0 <= int(idx.min()) and int(idx.max()) < n
        longer = draw_rand_idx(n, 0.0, seed)  # the whole permutation: the draw is its prefix
        assert sorted(longer.tolist()) == list(range(n)) and torch.equal(longer[: len(idx)], idx)
    assert not torch.equal(draw_rand_idx(64, 0.5, 0), draw_rand_idx(64, 0.5, 1))


def test_bad_layer_is_refused(fam):
    with pytest.raises(ValueError, match="outside"):
        _ref(fam, fam.L, 0.5)
