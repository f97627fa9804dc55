"""Checks of the DART reference that need no project implementation: keeping everything equals HF's forward,
the kept count, and the pivots it keeps."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_batch
from tests.references.dart import dart_reference


@pytest.fixture(scope="module")
def samples(processor, adapter, geometry):
    batch = make_batch(processor, ["What is shown here in this picture, in detail?", "Hi?"])
    return [adapter.sample_inputs(batch, b, geometry) for b in range(2)]


def test_keeping_every_token_equals_the_hf_forward(tiny_model, adapter, geometry, samples):
    image_id = adapter.image_token_id(tiny_model.config, geometry)
    for s in samples:  # one text pivot and ratio 0: 64 selections, every image token
        logits, kept = dart_reference(tiny_model, adapter, s, image_token_id=image_id, pruning_loc=2,
                                      reduction_ratio=0.0, pivot_image_token=0, pivot_text_token=1)
        assert kept.tolist() == list(range(64))
        with torch.no_grad():
            want = tiny_model(**s).logits[0, -1]
        torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)


def test_count_and_image_pivots(tiny_model, adapter, geometry, samples):
    image_id = adapter.image_token_id(tiny_model.config, geometry)
    s = samples[0]
    logits, kept = dart_reference(tiny_model, adapter, s, image_token_id=image_id, pruning_loc=2,
                                  reduction_ratio=0.75)
    assert kept.shape == (4 + 8 * 2,) and kept.tolist() == sorted(set(kept.tolist()))
    # the 4 image tokens with the largest key L1 norm in layer 1 are among the kept
    with torch.no_grad():
        out = tiny_model(**s, use_cache=True)
    keys = out.past_key_values.layers[1].keys[0]  # (Hkv, T, d)
    ids = s["input_ids"][0]
    start = int((ids == image_id).nonzero()[0])
    l1 = keys.permute(1, 0, 2).reshape(ids.shape[0], -1).abs().sum(-1)[start:start + 64]
    assert set(l1.topk(4).indices.tolist()) <= set(kept.tolist())
    with torch.no_grad():
        assert not torch.allclose(logits, tiny_model(**s).logits[0, -1], atol=1e-4)
