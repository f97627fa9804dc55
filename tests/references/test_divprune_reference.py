"""Checks of the DivPrune reference that need no project implementation: the budget, the greedy
selection on hand-made and random tensors, and the whole reference against HF's own forward."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.references.divprune import cosine_distance, divprune_reference, divprune_select, keep_count
from tokcompile.models import ADAPTERS
from tokcompile.models.tiny import build_model, build_processor
from tokcompile.parity import process, random_images

QUESTIONS = ["What is shown in this image, in great detail please?", "Hi?"]


@pytest.fixture(scope="module", params=["llava", "qwen2_5_vl"])
def fam(request) -> SimpleNamespace:
    model = build_model(request.param, seed=0).eval()
    adapter = ADAPTERS.get(request.param)()
    geom = adapter.geometry(model.config, None)
    images = random_images(np.random.default_rng(0), len(QUESTIONS), geom.image_size)
    batch = process(build_processor(request.param), adapter, geom, images, QUESTIONS)
    samples = [adapter.sample_inputs(batch, b, geom) for b in range(len(QUESTIONS))]
    return SimpleNamespace(name=request.param, model=model, adapter=adapter, samples=samples,
                           image_id=adapter.image_token_id(model.config, geom), n_image=geom.n_image_tokens)


# --- budget ----------------------------------------------------------------------------------------------------------


def test_keep_count_is_pythons_round():
    assert [keep_count(576, r) for r in (0.9444, 0.8889, 0.7778)] == [32, 64, 128]
    assert keep_count(64, 0.9444) == 4 and keep_count(24, 0.9444) == 1 and keep_count(64, 0.0) == 64
    assert keep_count(25, 0.5) == 12 and keep_count(27, 0.5) == 14  # 12.5 -> 12, 13.5 -> 14: half to even


# --- the greedy selection ------------------------------------------------------------------------------------------


def _unit(deg: list[float]) -> torch.Tensor:
    return torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in deg])


def test_selection_by_hand():
    # Angles 0, 10, 90, 180, 185 degrees. Nearest-neighbour angles: 10, 10, 80, 5, 5 -> pick 2 (90).
    # Distances to 90: 90, 80, -, 90, 95 -> pick 4 (185). Min to {90, 185}: 90, 80, -, 5, - -> pick 0.
    x = _unit([0, 10, 90, 180, 185]) * torch.tensor([[1.0], [2.0], [0.5], [3.0], [1.0]])  # norms don't matter
    assert divprune_select(x, 1).tolist() == [2]
    assert divprune_select(x, 2).tolist() == [2, 4]
    assert divprune_select(x, 3).tolist() == [0, 2, 4]
    assert divprune_select(x, 4).tolist() == [0, 1, 2, 4]


def test_ties_go_to_the_lowest_index():
    # Four exact axis vectors: every nearest-neighbour distance is exactly 1 -> pick 0; then index 2
    # (distance 2); then 1 and 3 tie at distance 1 -> 1.
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    assert divprune_select(x, 3).tolist() == [0, 1, 2]
    assert divprune_select(x[[3, 2, 1, 0]], 3).tolist() == [0, 1, 2]


def test_duplicates_are_never_picked_twice():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    assert divprune_select(x, 4).tolist() == [0, 1, 2, 3]
    assert divprune_select(x, 2).tolist() == [0, 3]  # NN distances 0, 0, 0, 1 -> 3; then 0, 1, 2 tie -> 0


def test_cosine_distance_matches_float64_brute_force():
    x = torch.randn(12, 7, generator=torch.Generator().manual_seed(1))
    xd = x.double().tolist()
    brute = [[1 - sum(a * b for a, b in zip(u, v)) / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))
              for v in xd] for u in xd]
    torch.testing.assert_close(cosine_distance(x).double(), torch.tensor(brute, dtype=torch.float64),
                               atol=1e-6, rtol=0)


def _lightcompress_style(x: torch.Tensor, k: int) -> list[int]:
    """The tensor formulation LightCompress uses (topk second-smallest, min over picked rows, argmax)."""
    d = cosine_distance(x)
    picks: list[int] = []
    for i in range(k):
        scores = torch.topk(d, 2, dim=0, largest=False).values[1] if i == 0 else d[picks].min(dim=0).values
        picks.append(int(torch.argmax(scores)))
    assert len(set(picks)) == k
    return sorted(picks)


@pytest.mark.parametrize("seed", range(4))
def test_selection_matches_the_tensor_formulation_on_random_features(seed):
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(seed))
    for k in (1, 4, 17, 64):
        assert divprune_select(x, k).tolist() == _lightcompress_style(x, k)


# --- the whole reference on the tiny models -------------------------------------------------------------------------


def test_nothing_reduced_equals_the_hf_forward(fam):
    for sample in fam.samples:
        logits, kept = divprune_reference(fam.model, fam.adapter, sample, image_token_id=fam.image_id,
                                          reduction_ratio=0.0)
        with torch.no_grad():
            hf = fam.model(**sample, use_cache=False).logits[0, -1]
        assert torch.equal(kept, torch.arange(fam.n_image))
        torch.testing.assert_close(logits, hf, atol=1e-5, rtol=1e-5)


def _hf_image_span(fam, sample) -> torch.Tensor:
    """The image span of the decoder's input embeddings in HF's own full forward (a pre-hook on the LM)."""
    seen = {}
    lm = fam.adapter.language_model(fam.model)

    def grab(module, args, kwargs):
        seen["e"] = kwargs["inputs_embeds"]

    handle = lm.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            fam.model(**sample, use_cache=False)
    finally:
        handle.remove()
    ids = sample["input_ids"][0]
    return seen["e"][0, ids == fam.image_id]


@pytest.mark.parametrize("ratio", [0.5, 0.9444])
def test_reduced_equals_hf_forward_with_dropped_tokens_masked(fam, ratio):
    """Dropping tokens == HF's full forward with those tokens masked out as keys (attention_mask 0), with the
    position ids the policy prescribes: 0..T'-1 over the kept tokens (LLaVA), original M-RoPE ids (Qwen)."""
    for sample in fam.samples:
        logits, kept = divprune_reference(fam.model, fam.adapter, sample, image_token_id=fam.image_id,
                                          reduction_ratio=ratio)
        assert kept.shape == (keep_count(fam.n_image, ratio),)
        assert torch.equal(kept, divprune_select(_hf_image_span(fam, sample), kept.numel()))

        ids = sample["input_ids"][0]
        start = int((ids == fam.image_id).nonzero()[0])
        mask = torch.ones_like(sample["attention_mask"])
        dropped = torch.ones(fam.n_image, dtype=torch.bool)
        dropped[kept] = False
        mask[0, start : start + fam.n_image][dropped] = 0
        if fam.adapter.rope == "1d":
            position_ids = (mask.cumsum(1) - 1).clamp(min=0)  # kept tokens: 0..T'-1
        else:
            position_ids = fam.adapter.hf_position_ids(fam.model, sample)  # full prompt's ids
        with torch.no_grad():
            hf = fam.model(**{**sample, "attention_mask": mask}, position_ids=position_ids,
                           use_cache=False).logits[0, -1]
        torch.testing.assert_close(logits, hf, atol=1e-5, rtol=1e-5)
