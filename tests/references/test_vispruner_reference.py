"""Checks of the VisPruner reference that need no project implementation: the budgets, the de-duplication loop
against a plain-Python rewrite, a hand-worked case, and the whole reference against HF's own forward."""

from __future__ import annotations

import math
import random

import pytest
import torch

from tests.conftest import make_batch
from tests.references.vispruner import vispruner_patches, vispruner_reference


def _plain(scores: list[float], feats: list[list[float]], prune_ratio: float, important_ratio: float) -> list[int]:
    """The same selection in lists and floats, from LightCompress's description."""
    P = len(scores)
    T = round(P * (1 - prune_ratio))
    imp = int(T * important_ratio)
    div = T - imp
    order = sorted(range(P), key=lambda i: (-scores[i], i))
    unit = [[v / math.sqrt(sum(x * x for x in f)) for v in f] for f in feats]
    residual = order[imp:]
    while div > 0:
        r = min(8, len(residual) - div)
        if r <= 0:
            break
        a, b = residual[::2], residual[1::2]
        sim = [max(sum(x * y for x, y in zip(unit[i], unit[j])) for j in b) for i in a]
        keep_a = sorted(range(len(a)), key=lambda i: (-sim[i], i))[r:]
        residual = [a[i] for i in keep_a] + b
    return sorted(order[:imp] + (residual if div > 0 else []))


@pytest.mark.parametrize("P, prune_ratio, important_ratio", [(64, 0.75, 0.5), (64, 0.75, 0.0), (64, 0.75, 1.0),
                                                             (40, 0.6, 0.5), (64, 0.0, 0.5)])
def test_loop_equals_a_plain_rewrite(P, prune_ratio, important_ratio):
    rng = random.Random(P + int(100 * important_ratio))
    scores = [rng.random() for _ in range(P)]
    feats = [[rng.gauss(0, 1) for _ in range(6)] for _ in range(P)]
    got = vispruner_patches(torch.tensor(scores), torch.tensor(feats), prune_ratio, important_ratio)
    assert got == _plain(scores, feats, prune_ratio, important_ratio)
    assert len(got) == round(P * (1 - prune_ratio)) and got == sorted(set(got))


def test_hand_worked_case():
    # 8 patches, patch i scores i; keep round(8 * 0.75) = 6, int(6 * 0.34) = 2 important (7, 6). Candidates in
    # attention order 5, 4, 3, 2, 1, 0 with T_div = 4: one round, r = min(8, 6 - 4) = 2, a = (5, 3, 1) and
    # b = (4, 2, 0). Patch 5 nearly duplicates 4 (cos 0.9988), 3 nearly duplicates 2 (cos 0.995), 1 is
    # orthogonal to every b: 5 and 3 are dropped, the residual is 1, 4, 2, 0.
    scores = torch.arange(8, dtype=torch.float32)
    e = torch.eye(4)
    feats = torch.stack([e[0], e[1], e[2], e[2] + 0.1 * e[3], e[3], e[3] + 0.05 * e[1], e[0], e[0]])
    assert vispruner_patches(scores, feats, 0.25, 0.34) == [0, 1, 2, 4, 6, 7]


@pytest.fixture(scope="module")
def samples(processor, adapter, geometry):
    batch = make_batch(processor, ["What is shown here in this picture, in detail?", "Hi?"])
    return [adapter.sample_inputs(batch, b, geometry) for b in range(2)]


def test_nothing_pruned_equals_the_hf_forward(tiny_model, adapter, geometry, samples):
    image_id = adapter.image_token_id(tiny_model.config, geometry)
    for s in samples:
        logits, kept = vispruner_reference(tiny_model, adapter, s, image_token_id=image_id, prune_ratio=0.0,
                                           important_ratio=0.5)
        assert kept.tolist() == list(range(geometry.vision_tokens))
        with torch.no_grad():
            want = tiny_model(**s).logits[0, -1]
        torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)


def test_pruning_changes_the_prediction(tiny_model, adapter, geometry, samples):
    image_id = adapter.image_token_id(tiny_model.config, geometry)
    logits, kept = vispruner_reference(tiny_model, adapter, samples[0], image_token_id=image_id, prune_ratio=0.75,
                                       important_ratio=0.5)
    assert kept.shape == (17,) and kept[0] == 0 and torch.equal(kept, kept.sort().values)
    with torch.no_grad():
        full = tiny_model(**samples[0]).logits[0, -1]
    assert not torch.allclose(logits, full, atol=1e-4)
