"""Checks of the independent ToMe reference that need no project implementation."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from tests.conftest import make_batch
from tests.references.tome import bipartite_merge, tome_reference, tome_schedule


@pytest.fixture(scope="module")
def sample(processor, adapter, geometry):
    batch = make_batch(processor, ["What is shown here in this picture, in detail?", "Hi?"])
    return adapter.sample_inputs(batch, 0, geometry)


def _brute_merge(x, metric, r, size):
    """ToMe by the definition, with plain Python numbers: cosine of every (even, odd) pair, each even
    token's best odd partner (lowest odd on ties), the r best even tokens (CLS excluded; ties: lower index)
    merged by size-weighted average, output = kept evens by index, then all odds."""
    t = len(x)
    r = min(r, (t - 1) // 2)

    def cos(u, v):
        return sum(a * b for a, b in zip(u, v)) / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))

    evens, odds = list(range(0, t, 2)), list(range(1, t, 2))
    best = {}
    for e in evens[1:]:
        sims = [cos(metric[e], metric[o]) for o in odds]
        j = max(range(len(odds)), key=lambda k: (sims[k], -k))
        best[e] = (sims[j], j)
    ranked = sorted(evens[1:], key=lambda e: (-best[e][0], e))
    src = set(ranked[:r])
    kept = [e for e in evens if e not in src]
    out, sizes, assign = [], [], [None] * t
    for k, e in enumerate(kept):
        out.append(list(x[e]))
        sizes.append(size[e])
        assign[e] = k
    for j, o in enumerate(odds):
        group = [o] + [e for e in src if best[e][1] == j]
        s = sum(size[g] for g in group)
        out.append([sum(size[g] * x[g][c] for g in group) / s for c in range(len(x[0]))])
        sizes.append(s)
        for g in group:
            assign[g] = len(kept) + j
    return out, sizes, assign


@pytest.mark.parametrize("t,r,seed", [(9, 3, 0), (9, 10, 1), (8, 3, 2), (13, 5, 3), (5, 1, 4)])
def test_bipartite_merge_matches_brute_force(t, r, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, 3, generator=g, dtype=torch.float64)
    metric = torch.randn(t, 4, generator=g, dtype=torch.float64)
    size = torch.randint(1, 4, (t,), generator=g).double()
    out, sz, assign = bipartite_merge(x, metric, r, size)
    b_out, b_sz, b_assign = _brute_merge(x.tolist(), metric.tolist(), r, size.tolist())
    assert out.shape[0] == t - min(r, (t - 1) // 2)
    assert assign.tolist() == b_assign
    torch.testing.assert_close(out, torch.tensor(b_out, dtype=torch.float64))
    torch.testing.assert_close(sz, torch.tensor(b_sz, dtype=torch.float64))


def test_bipartite_merge_hand_example_and_ties():
    # t=7: A = {0(CLS), 2, 4, 6}, B = {1, 3, 5}. Token 2 == token 3 exactly, token 4 == token 6 (both
    # identical to token 1 and 5 -> tie between B1 and B5 goes to B index 0 = token 1); token 6 ties token 4.
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    metric = torch.tensor([e2, e1, e2, e2, e1, e1, e1])
    x = torch.arange(7.0)[:, None]
    out, size, assign = bipartite_merge(x, metric, 2, None)
    # node_max: A2 -> 1 (B3), A4 -> 1 (B1, tie with B5), A6 -> 1 (B1, tie with B5): all 1.0, so the two
    # lowest-index A tokens (2, 4) merge; 6 stays. Output: [0, 6] ++ [mean(1,4), mean(3,2), 5].
    assert out.flatten().tolist() == [0.0, 6.0, 2.5, 2.5, 5.0]
    assert size.tolist() == [1.0, 1.0, 2.0, 2.0, 1.0]
    assert assign.tolist() == [0, 2, 3, 3, 2, 4, 1]


def test_bipartite_merge_protects_cls_and_clamps():
    metric = torch.ones(6, 2)  # everything identical: CLS would win a tie if it were not protected
    out, _, assign = bipartite_merge(torch.arange(6.0)[:, None], metric, 100, None)
    assert out.shape[0] == 6 - 2  # r clamped to (6-1)//2 = 2
    assert assign[0].item() == 0 and out[0].item() == 0.0


@pytest.mark.parametrize(
    "r,n,pair,want",
    [
        (16, 3, "inflect", [16, 16, 16]),
        ([4, 1.0], 3, "inflect", [0, 4, 8]),
        ([4, -1], 3, "inflect", [8, 4, 0]),
        ([4, 0.5], 5, "inflect", [2, 3, 4, 5, 6]),
        ([4, 0], 4, "inflect", [4, 4, 4, 4]),
        ([4, -2], 3, "start_step", [4, 2, 0]),
        ([4, -3], 3, "start_step", [4, 1, 0]),
        ([5, 6, 7], 2, "inflect", [5, 6]),
        ([5], 3, "inflect", [5, 0, 0]),
    ],
)
def test_schedule(r, n, pair, want):
    assert tome_schedule(r, n, pair=pair) == want


def test_schedule_decreasing_over_24_blocks():
    s = tome_schedule([16, -1], 24)
    assert s[0] == 32 and s[-1] == 0 and all(a >= b for a, b in itertools.pairwise(s))
    assert s == [int(32 - 32 / 23 * i) for i in range(24)]


@pytest.mark.parametrize("prop_attn", [False, True])
def test_r0_equals_hf_forward(tiny_model, adapter, sample, prop_attn):
    with torch.no_grad():
        want = tiny_model(**sample, use_cache=False).logits[0, -1]
    got, assigns = tome_reference(tiny_model, adapter, sample, image_token_id=4, r_per_block=[0, 0],
                                  prop_attn=prop_attn)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert [a.tolist() for a in assigns] == [list(range(65))] * 2


@pytest.mark.parametrize("prop_attn", [False, True])
def test_counts_and_assignments(tiny_model, adapter, sample, prop_attn):
    logits, assigns = tome_reference(tiny_model, adapter, sample, image_token_id=4, r_per_block=[16, 16, 16],
                                     prop_attn=prop_attn)
    assert logits.shape == (tiny_model.config.text_config.vocab_size,) and torch.isfinite(logits).all()
    assert [a.shape[0] for a in assigns] == [65, 49]  # 65 -> 49 -> 33 tokens, 32 image tokens
    for a, t_out in zip(assigns, [49, 33]):
        assert a.dtype == torch.int64 and a[0] == 0  # CLS stays first
        assert sorted(set(a.tolist())) == list(range(t_out))  # every output slot has a source
        assert torch.equal(a[1::2], torch.arange(a.shape[0] // 2) + t_out - a.shape[0] // 2)  # B = tail
    with torch.no_grad():
        full = tiny_model(**sample, use_cache=False).logits[0, -1]
    assert not torch.allclose(logits, full, atol=1e-4)  # merging changes the answer


def test_prop_attn_changes_second_block_only_after_a_merge(tiny_model, adapter, sample):
    # One merging block: sizes only matter from the next block on; with r=[16, 0] prop_attn still
    # changes the second block's attention (sizes 2 present), with r=[0, 16] nothing is carried before.
    a, aa = tome_reference(tiny_model, adapter, sample, image_token_id=4, r_per_block=[0, 16], prop_attn=False)
    b, bb = tome_reference(tiny_model, adapter, sample, image_token_id=4, r_per_block=[0, 16], prop_attn=True)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert all(torch.equal(x, y) for x, y in zip(aa, bb))
    c, _ = tome_reference(tiny_model, adapter, sample, image_token_id=4, r_per_block=[16, 0], prop_attn=False)
    d, _ = tome_reference(tiny_model, adapter, sample, image_token_id=4, r_per_block=[16, 0], prop_attn=True)
    assert not torch.allclose(c, d, atol=1e-6)


def test_r_per_block_length_checked(tiny_model, adapter, sample):
    with pytest.raises(ValueError):
        tome_reference(tiny_model, adapter, sample, image_token_id=4, r_per_block=[16], prop_attn=False)
