"""Checks of the FiCoCo-V reference that need no project implementation: nothing merged equals HF's forward,
the compress of one discarded token, the local penalty, and the fan-out the official quantile gives."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_batch
from tests.references.ficoco import ficoco_block, ficoco_reference


@pytest.fixture(scope="module")
def samples(processor, adapter, geometry):
    batch = make_batch(processor, ["What is shown here in this picture, in detail?", "Hi?"])
    return [adapter.sample_inputs(batch, b, geometry) for b in range(2)]


def test_no_merging_block_equals_the_hf_forward(tiny_model, adapter, geometry, samples):
    image_id = adapter.image_token_id(tiny_model.config, geometry)
    for s in samples:  # blocks 0 and 1 run; control_encoding_layer 1 merges in none
        logits, kept, ks = ficoco_reference(tiny_model, adapter, s, image_token_id=image_id, r=8,
                                            control_encoding_layer=1)
        assert kept == [] and ks == []
        with torch.no_grad():
            want = tiny_model(**s).logits[0, -1]
        torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)


def test_one_discard_lands_on_its_best_kept_partner():
    torch.manual_seed(0)
    t, side = 17, 4  # CLS + a 4x4 grid
    x = torch.randn(t, 6)
    att = torch.randn(t, t)
    out, kept, k = ficoco_block(x, att, list(range(t - 1)), side, r=1)
    assert k == 1 and len(kept) == t - 1 and kept[0] == 0 and kept == sorted(kept)
    (i,) = sorted(set(range(t)) - set(kept))
    j = max(kept, key=lambda c: (att[i, c].item(), -c))  # the best kept partner of the discarded token
    want = x[kept].clone()
    want[kept.index(j)] = (x[j] + x[i]) / 2  # weight 1 with one target: (x_j + x_i) / (1 + 1)
    torch.testing.assert_close(out, want)


def test_local_penalty_halves_each_windows_lowest_positive_score():
    # 4 patches in one 2x2 window: scores come out of att; the lowest of them is pushed further down, so with r=1
    # the discarded token is always the window's lowest-scoring one, penalised or not.
    torch.manual_seed(1)
    att = torch.randn(5, 5)
    out, kept, _ = ficoco_block(torch.randn(5, 3), att, [0, 1, 2, 3], side=2, r=1)
    cls = torch.nn.functional.normalize(att[0, 1:], dim=-1)
    p2p = torch.nn.functional.normalize(att[1:, 1:].mean(-1), dim=-1)
    u = 0.35 * cls - 0.65 * p2p
    assert sorted(set(range(5)) - set(kept)) == [int(u.argmin()) + 1]


def test_fan_out_follows_the_row_length():
    torch.manual_seed(2)
    for t, want in [(65, 1), (501, 1), (502, 2), (577, 2)]:
        side = 8 if t == 65 else 0
        patches = list(range(t - 1))
        _, _, k = ficoco_block(torch.randn(t, 4), torch.randn(t, t), patches, side or 2, r=4)
        assert k == want, t
