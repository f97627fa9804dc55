"""Checks of the independent VisionZip reference that need no project implementation."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import make_batch
from tests.references.visionzip import tower_layer, visionzip_reference, visionzip_tokens


@pytest.fixture(scope="module")
def sample(processor, adapter, geometry):
    batch = make_batch(processor, ["What is shown here in this picture, in detail?", "Hi?"])
    return adapter.sample_inputs(batch, 0, geometry)


def _brute(x, cls_attn, metric, D, C, prune_only, merge_only):
    """VisionZip by the definition, in plain Python numbers."""
    t = len(x)
    dom = [] if merge_only else sorted(sorted(range(1, t), key=lambda j: (-cls_attn[j], j))[:D])
    kept = [0] + dom
    rest = [j for j in range(1, t) if j not in dom]
    if prune_only:
        return [x[j] for j in kept], kept
    step = max(1, len(rest) // C)
    targets = [rest[p] for p in range(0, len(rest), step)][:C]

    def cos(u, v):
        return sum(a * b for a, b in zip(u, v)) / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))

    groups = {c: [] for c in range(C)}
    for j in rest:
        if j not in targets:
            sims = [cos(metric[j], metric[g]) for g in targets]
            groups[max(range(C), key=lambda c: (sims[c], -c))].append(j)
    out = [list(x[j]) for j in kept]
    assign = [None] * t
    for s, j in enumerate(kept):
        assign[j] = s
    for c, g in enumerate(targets):
        members = groups[c]
        mean = [sum(x[j][d] for j in members) / max(len(members), 1) for d in range(len(x[0]))]
        out.append([x[g][d] + mean[d] for d in range(len(x[0]))])
        for j in [g, *members]:
            assign[j] = len(kept) + c
    return out, assign


@pytest.mark.parametrize("t,D,C,mode,seed", [
    (17, 5, 3, "", 0), (17, 0, 4, "", 1), (17, 9, 7, "", 2), (30, 6, 5, "", 3), (17, 5, 3, "prune_only", 4),
    (17, 5, 3, "merge_only", 5), (17, 15, 1, "", 6), (65, 12, 4, "", 7),
])
def test_reduction_matches_brute_force(t, D, C, mode, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, 5, generator=g, dtype=torch.float64)
    attn = torch.rand(t, generator=g, dtype=torch.float64)
    attn[3] = attn[4] = attn[7]  # ties: lower index first
    metric = torch.randn(t, 4, generator=g, dtype=torch.float64)
    flags = {"prune_only": mode == "prune_only", "merge_only": mode == "merge_only"}
    out, index = visionzip_tokens(x, attn, metric, D, C, **flags)
    want_out, want_index = _brute(x.tolist(), attn.tolist(), metric.tolist(), D, C, **flags)
    assert index.tolist() == want_index
    torch.testing.assert_close(out, torch.tensor(want_out, dtype=torch.float64))
    n_dom = 1 + (0 if flags["merge_only"] else D)
    assert out.shape[0] == n_dom + (0 if flags["prune_only"] else C)


def test_hand_example_sum_of_target_and_mean():
    # t=7, CLS 0; dominant = {2} (highest CLS attention). Remaining 1,3,4,5,6 (R=5), C=2: step 2 -> targets at
    # remaining positions 0, 2 = tokens 1, 4. Token 3 and 5 resemble 1, token 6 resembles 4 (a tie with 1
    # would go to target 0).
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    metric = torch.tensor([e1, e1, e2, e1, e2, [2.0, 0.0], [0.0, 3.0]])
    attn = torch.tensor([0.0, 0.1, 0.9, 0.2, 0.3, 0.1, 0.1])
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0], [5.0], [6.0]])
    out, assign = visionzip_tokens(x, attn, metric, 1, 2)
    assert out.flatten().tolist() == [0.0, 2.0, 1.0 + (3.0 + 5.0) / 2, 4.0 + 6.0]
    assert assign.tolist() == [0, 2, 1, 2, 3, 2, 3]
    # a target nobody joins stays itself (count clamped to 1)
    out, assign = visionzip_tokens(x, attn, torch.tensor([e1] * 4 + [e2] + [e1] * 2), 1, 2)
    assert out[3, 0].item() == 4.0 and assign.tolist() == [0, 2, 1, 2, 3, 2, 2]


def test_tower_layer_is_block_minus_two(tiny_model, sample):
    hidden, cls_attn, metric = tower_layer(tiny_model, sample["pixel_values"])
    with torch.no_grad():
        hf = tiny_model.model.vision_tower(sample["pixel_values"], output_hidden_states=True)
    torch.testing.assert_close(hidden, hf.hidden_states[-2][0])
    assert cls_attn.shape == (65,) and abs(cls_attn.sum().item() - 2.0) < 1e-5  # 2 heads, rows sum to 1
    assert metric.shape == (65, 16)


@pytest.mark.parametrize("params", [
    {"dominant": 64, "contextual": 0, "prune_only": True},  # everything kept
    {"dominant": 0, "contextual": 64, "merge_only": True},  # every remaining token is its own target
], ids=["prune_all", "merge_identity"])
def test_nothing_reduced_equals_hf_forward(tiny_model, adapter, sample, params):
    with torch.no_grad():
        want = tiny_model(**sample, use_cache=False).logits[0, -1]
    got, index = visionzip_reference(tiny_model, adapter, sample, image_token_id=4, **params)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert index.tolist() == list(range(65))


def test_counts_and_logits_change(tiny_model, adapter, sample):
    logits, assign = visionzip_reference(tiny_model, adapter, sample, image_token_id=4, dominant=12, contextual=4)
    assert logits.shape == (tiny_model.config.text_config.vocab_size,) and torch.isfinite(logits).all()
    assert assign.shape == (65,) and assign[0] == 0 and sorted(set(assign.tolist())) == list(range(17))
    _, kept = visionzip_reference(tiny_model, adapter, sample, image_token_id=4, dominant=12, contextual=4,
                                  prune_only=True)
    assert kept.tolist() == [j for j in range(65) if assign[j] < 13]
    with torch.no_grad():
        full = tiny_model(**sample, use_cache=False).logits[0, -1]
    assert not torch.allclose(logits, full, atol=1e-4)


def test_one_remaining_token_moves_to_the_end():
    # dominant = every patch but one: that one is its own target, unchanged, placed after the dominant tokens
    g = torch.Generator().manual_seed(0)
    x, a, m = torch.randn(9, 3, generator=g), torch.rand(9, generator=g), torch.randn(9, 2, generator=g)
    out, assign = visionzip_tokens(x, a, m, 7, 1)
    (j,) = [i for i in range(9) if assign[i] == 8]
    assert j == min(range(1, 9), key=lambda i: a[i].item())
    assert torch.equal(out, torch.cat([x[[i for i in range(9) if i != j]], x[j : j + 1]]))


def test_bad_combinations():
    x, a, m = torch.randn(9, 2), torch.rand(9), torch.randn(9, 3)
    with pytest.raises(ValueError):
        visionzip_tokens(x, a, m, 2, 2, prune_only=True, merge_only=True)
    with pytest.raises(ValueError):
        visionzip_tokens(x, a, m, 5, 4)  # 3 remaining tokens cannot give 4 targets
