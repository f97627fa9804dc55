"""Checks of the FasterVLM reference that need no project implementation: the budget, the top-k order, the
[CLS] attention row against a brute force, and the whole reference against HF's own forward."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import make_batch
from tests.references.fastervlm import cls_attention, fastervlm_reference, keep_count, top_k_in_order


@pytest.fixture(scope="module")
def samples(processor, adapter, geometry):
    batch = make_batch(processor, ["What is shown here in this picture, in detail?", "Hi?"])
    return [adapter.sample_inputs(batch, b, geometry) for b in range(2)]


def test_keep_count_is_pythons_round():
    assert keep_count(576, 0.778) == 128 and keep_count(64, 0.778) == 14
    assert keep_count(64, 0.0) == 64 and keep_count(576, 0.9444) == 32
    assert keep_count(10, 0.75) == 2 and keep_count(14, 0.75) == 4  # 2.5 -> 2, 3.5 -> 4: half to even


def test_top_k_order_and_ties():
    assert top_k_in_order([0.1, 0.5, 0.3, 0.5, 0.2], 2) == [1, 3]
    assert top_k_in_order([0.1, 0.5, 0.3, 0.5, 0.2], 3) == [1, 2, 3]
    assert top_k_in_order([1.0, 1.0, 1.0, 1.0], 2) == [0, 1]  # ties: lowest index
    assert top_k_in_order([3.0, 1.0, 2.0], 3) == [0, 1, 2]  # returned in original order


def test_cls_row_matches_brute_force(tiny_model, samples):
    """The selected block's [CLS] query against every key, by hand: LayerNorm, q/k projections, per-head
    scaled dot products and softmax in float64 Python numbers, then the mean over heads."""
    cfg = tiny_model.config
    tower = tiny_model.model.vision_tower
    vm = getattr(tower, "vision_model", tower)
    n = cfg.vision_config.num_hidden_layers
    sel = n + cfg.vision_feature_layer  # block index whose output is hidden_states[vision_feature_layer]
    block = vm.encoder.layers[sel]
    pv = samples[0]["pixel_values"]
    with torch.no_grad():
        out = tiny_model.model.vision_tower(pv, output_hidden_states=True)
        x = block.layer_norm1(out.hidden_states[sel][0]).double()  # (t, Dv) entering the block's attention
        q = torch.nn.functional.linear(x, block.self_attn.q_proj.weight.double(),
                                       block.self_attn.q_proj.bias.double())[0].tolist()  # CLS query
        k = torch.nn.functional.linear(x, block.self_attn.k_proj.weight.double(),
                                       block.self_attn.k_proj.bias.double()).tolist()  # (t, Dv)
    H = cfg.vision_config.num_attention_heads
    hd = len(q) // H
    mean = [0.0] * (len(k) - 1)
    for h in range(H):
        sl = slice(h * hd, (h + 1) * hd)
        logits = [sum(a * b for a, b in zip(q[sl], kj[sl])) / math.sqrt(hd) for kj in k]
        m = max(logits)
        e = [math.exp(v - m) for v in logits]
        z = sum(e)
        for j in range(1, len(k)):
            mean[j - 1] += e[j] / z / H
    scores, hidden = cls_attention(tiny_model, pv)
    torch.testing.assert_close(scores.double(), torch.tensor(mean, dtype=torch.float64), atol=1e-6, rtol=1e-5)
    assert hidden.shape[0] == len(k)


def test_nothing_reduced_equals_the_hf_forward(tiny_model, adapter, geometry, samples):
    image_id = adapter.image_token_id(tiny_model.config, geometry)
    for s in samples:
        logits, kept = fastervlm_reference(tiny_model, adapter, s, image_token_id=image_id, rate=0.0)
        assert kept.tolist() == list(range(geometry.vision_tokens))
        with torch.no_grad():
            want = tiny_model(**s).logits[0, -1]
        torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)


def test_counts_and_selection(tiny_model, adapter, geometry, samples):
    image_id = adapter.image_token_id(tiny_model.config, geometry)
    logits, kept = fastervlm_reference(tiny_model, adapter, samples[0], image_token_id=image_id, rate=0.778)
    assert kept.shape == (15,) and kept[0] == 0 and torch.equal(kept, kept.sort().values)
    scores, _ = cls_attention(tiny_model, samples[0]["pixel_values"])
    dropped = sorted(set(range(1, 65)) - set(kept.tolist()))
    assert min(scores[kept[1:] - 1]) >= max(scores[torch.tensor(dropped) - 1])  # kept = the highest scores
    with torch.no_grad():
        full = tiny_model(**samples[0]).logits[0, -1]
    assert not torch.allclose(logits, full, atol=1e-4)  # the reduction changes the prediction
