"""Checks of the SparseVLM reference that need no project implementation: its layer loop equals HF's forward,
its first stage keeps the image tokens HF's own attention maps rank highest, and its clustering finds clear
clusters."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_batch
from tests.references.sparsevlm import cluster_and_merge, sparsevlm_reference
from tokcompile.reference import eager_attention


@pytest.fixture(scope="module")
def samples(processor, adapter, geometry):
    batch = make_batch(processor, ["What is shown here in this picture, in detail?", "Hi?"])
    return [adapter.sample_inputs(batch, b, geometry) for b in range(2)]


def test_no_pruning_layer_equals_the_hf_forward(tiny_model, adapter, geometry, samples):
    image_id = adapter.image_token_id(tiny_model.config, geometry)
    for s in samples:
        logits, slots = sparsevlm_reference(tiny_model, adapter, s, image_token_id=image_id, pruning_loc=[],
                                            stage_tokens=[])
        assert slots == []
        with torch.no_grad():
            want = tiny_model(**s).logits[0, -1]
        torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)


def test_first_stage_keeps_the_tokens_hf_attention_ranks_highest(tiny_model, adapter, geometry, samples):
    image_id = adapter.image_token_id(tiny_model.config, geometry)
    for s in samples:
        _, (slot,) = sparsevlm_reference(tiny_model, adapter, s, image_token_id=image_id, pruning_loc=[1],
                                         stage_tokens=[20])
        ids = s["input_ids"][0]
        start = int(torch.nonzero(ids == image_id)[0])
        n = int((ids == image_id).sum())
        with torch.no_grad(), eager_attention(tiny_model):
            out = tiny_model(**s, output_attentions=True, output_hidden_states=True)
        e = out.hidden_states[0][0]  # (T, D) the input embeddings
        m = torch.softmax(e[start:start + n] @ e[start + n:].T, dim=1).mean(0)
        raters = start + n + torch.nonzero(m > m.mean()).flatten()
        score = out.attentions[1][0].mean(0)[raters][:, start:start + n].mean(0)  # (n,)
        assert 0 < len(raters) < len(ids) - start - n
        assert torch.nonzero((slot >= 0) & (slot < 20)).flatten().tolist() == sorted(score.topk(20).indices.tolist())
        assert int((slot >= 20).sum()) == int((n - 20) * 0.3) + 1  # the recycled ones


def test_clustering_finds_separated_groups():
    torch.manual_seed(0)
    centres = torch.tensor([[10.0] * 8, [-10.0] * 8, [0.0] * 4 + [10.0] * 4])
    x = torch.cat([c + 0.1 * torch.randn(5, 8) for c in centres])  # (15, 8) three groups of five
    merged, picked, cluster = cluster_and_merge(x, 3)
    groups = [cluster[i * 5:(i + 1) * 5] for i in range(3)]
    assert all(len(set(g)) == 1 for g in groups) and len({g[0] for g in groups}) == 3
    for g in range(3):
        torch.testing.assert_close(merged[groups[g][0]], x[g * 5:(g + 1) * 5].mean(0), atol=1e-4, rtol=1e-4)
    assert sorted(cluster[i] for i in picked) == [0, 1, 2]
