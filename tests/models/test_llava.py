"""LLaVA adapter and ReducedVLM with nothing pruned."""

from __future__ import annotations

import torch

from tokcompile.models import ReducedVLM
from tokcompile.models.base import causal_mask, splice_image_features


def test_geometry_matches_processor(processor, geometry, batch):
    n_image = int((batch["input_ids"][0] == 4).sum())
    assert geometry.n_image_tokens == n_image == 64
    assert geometry.vision_layers == 2  # feature layer -2 of 3 blocks: blocks 0 and 1 run
    assert geometry.n_kv_heads < geometry.n_heads  # the tiny model exercises GQA


def test_nothing_pruned_equals_hf_forward(tiny_model, adapter, geometry, batch):
    vlm = ReducedVLM(tiny_model, adapter, geometry, (), (), 4).eval()
    with torch.no_grad():
        (logits,) = vlm(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        for b in range(2):
            m = batch["attention_mask"][b].bool()
            hf = tiny_model(input_ids=batch["input_ids"][b : b + 1, m], pixel_values=batch["pixel_values"][b : b + 1])
            torch.testing.assert_close(logits[b], hf.logits[0, -1], atol=1e-5, rtol=1e-5)
    # the batch really is padded, so this also checks that padding changes nothing
    assert not bool(batch["attention_mask"][1].all())


def test_splice_places_features_at_span():
    text = torch.zeros(2, 6, 3)
    img = torch.arange(2 * 2 * 3, dtype=torch.float).view(2, 2, 3) + 1
    out = splice_image_features(text, img, torch.tensor([1, 3]))
    assert torch.equal(out[0, 1:3], img[0]) and torch.equal(out[1, 3:5], img[1])
    assert out[0, [0, 3, 4, 5]].abs().sum() == 0 and out[1, [0, 1, 2, 5]].abs().sum() == 0


def test_causal_mask_hides_padding():
    valid = torch.tensor([[False, True, True]])
    m = causal_mask(valid)[0, 0]
    assert m.tolist() == [[True, False, False], [False, True, False], [False, True, True]]
