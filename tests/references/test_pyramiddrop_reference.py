"""Checks of the PyramidDrop reference that need no project implementation: nothing dropped == HF, counts and
index conventions, its scores == HF's own eager attention probabilities, tie order, and agreement with a
brute-force full-length version that masks dropped tokens instead of gathering survivors."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.conftest import make_batch
from tests.references.pyramiddrop import _eager, keep_count, last_token_scores, pyramiddrop_reference, rank_keep
from tokcompile.models import ADAPTERS
from tokcompile.models.tiny import build_model, build_processor
from tokcompile.parity import process, random_images


@pytest.fixture(scope="module", params=["llava", "qwen2_5_vl"])
def fam(request) -> SimpleNamespace:
    family = request.param
    model = build_model(family, seed=0).eval()
    adapter = ADAPTERS.get(family)()
    geom = adapter.geometry(model.config, None)
    processor = build_processor(family)
    questions = ["What is shown here in this picture, in detail?", "Hi?"]
    if family == "llava":
        batch = make_batch(processor, questions)
    else:
        images = random_images(np.random.default_rng(0), 2, geom.image_size)
        batch = process(processor, adapter, geom, images, questions)
    sample = adapter.sample_inputs(batch, 0, geom)
    image_id = adapter.image_token_id(model.config, geom)
    n = int((sample["input_ids"] == image_id).sum())
    return SimpleNamespace(family=family, model=model, adapter=adapter, sample=sample, image_id=image_id, n=n,
                           p2=family == "llava")


def _ref(f, layers, ratios, renumber=None):
    renumber = f.p2 if renumber is None else renumber
    return pyramiddrop_reference(f.model, f.adapter, f.sample, image_token_id=f.image_id, layer_list=layers,
                                 image_token_ratio_list=ratios, renumber_positions=renumber)


def test_nothing_dropped_equals_hf(fam):
    with torch.no_grad():
        hf = fam.model(**fam.sample).logits[0, -1]
    for renumber in ([True, False] if fam.p2 else [False]):
        logits, kept = _ref(fam, [1, 2, 3], [1.0, 1.0, 1.0], renumber)
        torch.testing.assert_close(logits, hf, atol=1e-5, rtol=1e-5)
        assert [k.tolist() for k in kept] == [list(range(fam.n))] * 3


def test_counts_and_index_conventions(fam):
    assert fam.n == (64 if fam.family == "llava" else 24)
    _, kept = _ref(fam, [1, 2, 3], [0.5, 0.25, 0.125])
    assert [len(k) for k in kept] == [fam.n // 2, fam.n // 4, fam.n // 8]
    n_in = [fam.n, fam.n // 2, fam.n // 4]
    for k, n in zip(kept, n_in):
        assert k.dtype == torch.long
        assert torch.equal(k, k.sort().values) and len(set(k.tolist())) == len(k)
        assert int(k.min()) >= 0 and int(k.max()) < n  # relative to the image tokens entering the stage
    assert keep_count(64, 0.3) == 19 and keep_count(576, 0.125) == 72 and keep_count(24, 0.3) == 7  # floor
    _, kept = _ref(fam, [2], [0.3])
    assert len(kept[0]) == int(fam.n * 0.3)


def test_scores_are_hf_eager_attention_probabilities(fam):
    """Own q/k/RoPE/softmax == the HF attention module's eager probabilities (last row, head mean)."""
    lm = fam.adapter.language_model(fam.model)
    with _eager(fam.model), torch.no_grad():
        out = fam.model(**fam.sample, output_hidden_states=True, output_attentions=True, use_cache=False)
        pos = fam.adapter.hf_position_ids(fam.model, fam.sample)
        for layer in (1, 3):
            ours = last_token_scores(lm.layers[layer], lm.rotary_emb, out.hidden_states[layer], pos)
            theirs = out.attentions[layer][0, :, -1].float().mean(0)
            torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
            assert abs(float(ours.sum()) - 1.0) < 1e-5


def test_rank_keep_tie_order():
    s = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0])
    assert rank_keep(s, 1).tolist() == [1]
    assert rank_keep(s, 2).tolist() == [1, 2]
    assert rank_keep(s, 4).tolist() == [1, 2, 3, 4]
    assert rank_keep(s, 0).tolist() == []


def _masked_bruteforce(f, layer_list, ratios, renumber):
    """Full-length run from layer 0: dropped tokens stay in the sequence but are masked out as keys; under P2
    every alive token's position is its rank among alive tokens. Scores are HF's own eager probabilities."""
    lm = f.adapter.language_model(f.model)
    ids = f.sample["input_ids"][0]
    is_img = ids == f.image_id
    T, N = ids.numel(), int(is_img.sum())
    alive = torch.ones(T, dtype=torch.bool)
    pos = f.adapter.hf_position_ids(f.model, f.sample)
    grabbed = {}
    kept_all = []
    with _eager(f.model), torch.no_grad():
        h = f.model(**f.sample, output_hidden_states=True, use_cache=False).hidden_states[0]

        def run(layer, h):
            allowed = torch.ones(T, T, dtype=torch.bool).tril() & alive[None, :]
            mask = torch.zeros(T, T).masked_fill(~allowed, torch.finfo(h.dtype).min)[None, None]
            return layer(h, attention_mask=mask, position_embeddings=lm.rotary_emb(h, pos))

        for li, layer in enumerate(lm.layers):
            if li in layer_list:
                hook = layer.self_attn.register_forward_hook(lambda m, a, o: grabbed.__setitem__("w", o[1]))
                run(layer, h)  # only to read its attention probabilities
                hook.remove()
                cur = (is_img & alive).nonzero()[:, 0]  # current image tokens, ascending
                score = grabbed["w"][0, :, -1].float().mean(0)[cur]
                k = int(N * ratios[layer_list.index(li)])
                order = sorted(range(len(cur)), key=lambda j: (-float(score[j]), j))
                rel = sorted(order[:k])
                kept_all.append(rel)
                dropped = torch.ones(len(cur), dtype=torch.bool)
                dropped[rel] = False
                alive[cur[dropped]] = False
                if renumber:
                    pos = (alive.long().cumsum(0) - 1).clamp(min=0)[None]
            h = run(layer, h)
        logits = f.adapter.lm_head(f.model)(lm.norm(h))[0, -1]
    return logits, kept_all


@pytest.mark.parametrize("layers,ratios", [([1, 2, 3], [0.5, 0.25, 0.125]), ([0, 2], [0.7, 0.3])])
def test_matches_masked_full_length_bruteforce(fam, layers, ratios):
    results = {}
    for renumber in ([True, False] if fam.p2 else [False]):
        logits, kept = _ref(fam, layers, ratios, renumber)
        bf_logits, bf_kept = _masked_bruteforce(fam, layers, ratios, renumber)
        assert [k.tolist() for k in kept] == bf_kept
        torch.testing.assert_close(logits, bf_logits, atol=1e-5, rtol=1e-5)
        results[renumber] = logits
    if fam.p2:  # renumbering really changes the positions the later layers see
        assert not torch.allclose(results[True], results[False], atol=1e-4)


def test_bad_schedules_are_refused(fam):
    with pytest.raises(ValueError, match="strictly increasing"):
        _ref(fam, [2, 1], [0.5, 0.25])
    with pytest.raises(ValueError, match="keeps"):
        _ref(fam, [1, 2], [0.25, 0.5])
    if not fam.p2:
        with pytest.raises(ValueError, match="1-D RoPE"):
            _ref(fam, [1], [0.5], renumber=True)
