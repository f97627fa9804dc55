"""Checks of the CDPruner reference that need no project implementation: the fast greedy MAP against a
brute-force log-det greedy, the 77-token text segments, the relevance normalisation, the kept counts and the
whole reference against HF's own forward when nothing is pruned."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import PADDED_QUESTIONS, padded_family_case
from tests.references.cdpruner import (
    cdpruner_reference,
    cdpruner_select,
    dpp_map,
    load_clip,
    relevance,
    similarity,
    text_embeds,
    text_segments,
)

LONG_QUESTION = ("Describe every object in this picture and say where it is, what colour it has, how large it is, "
                 "and whether it touches any other object.")


@pytest.fixture(scope="module")
def case():
    c = padded_family_case("llava")
    c.samples = [c.adapter.sample_inputs(c.batch, b, c.geom) for b in range(2)]
    return c


def _brute_greedy(kernel: torch.Tensor, k: int) -> list[int]:
    """At each step the index maximising log det of the kernel restricted to the selected ones plus it."""
    chosen: list[int] = []
    for _ in range(k):
        best, best_val = -1, -float("inf")
        for i in range(kernel.shape[0]):
            if i in chosen:
                continue
            idx = torch.tensor(chosen + [i])
            sign, logdet = torch.linalg.slogdet(kernel[idx][:, idx])
            val = logdet.item() if sign > 0 else -float("inf")
            if val > best_val:
                best, best_val = i, val
        chosen.append(best)
    return chosen


# --- DPP ----------------------------------------------------------------------------------------------------------


def test_fast_greedy_map_equals_brute_force():
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        x = torch.randn(12, 8, generator=gen, dtype=torch.float64)
        xn = x / x.norm(dim=-1, keepdim=True)
        r = torch.rand(12, generator=gen, dtype=torch.float64) + 0.05
        kernel = r[:, None] * (xn @ xn.T) * r[None, :]  # (12, 12) PSD, CDPruner's structure, rank 8
        order = _brute_greedy(kernel, 5)
        assert order[0] == int(torch.argmax(r))  # the first pick is the most relevant token
        for t in range(1, 6):  # every prefix: the same picks in the same order
            assert dpp_map(kernel[None], t)[0].tolist() == sorted(order[:t])


def test_fast_greedy_map_is_per_sample_in_a_batch():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 10, 6, generator=gen)
    kernels = x @ x.transpose(1, 2) + 0.1 * torch.eye(10)  # (3, 10, 10)
    batched = dpp_map(kernels, 4)  # (3, 4)
    assert batched.shape == (3, 4)
    for b in range(3):
        assert batched[b].tolist() == dpp_map(kernels[b:b + 1], 4)[0].tolist() == sorted(_brute_greedy(kernels[b], 4))


# --- text and relevance -------------------------------------------------------------------------------------------


def test_long_question_gives_two_padded_segments(clip_dir):
    c = load_clip(clip_dir)
    ids = c.tokenizer(text=LONG_QUESTION, return_tensors="pt")["input_ids"][0]  # (L,), no truncation
    L = ids.shape[0]
    assert 77 < L <= 154
    seg = text_segments(c.tokenizer, LONG_QUESTION, 77)
    assert seg["input_ids"].shape == seg["attention_mask"].shape == (2, 77)
    flat_ids, flat_mask = seg["input_ids"].flatten(), seg["attention_mask"].flatten()
    assert torch.equal(flat_ids[:L], ids) and not flat_ids[L:].any()  # zero-padded after the end token
    assert flat_mask[:L].all() and not flat_mask[L:].any()
    emb = text_embeds(clip_dir, LONG_QUESTION)
    assert emb.shape == (2, 24) and not torch.allclose(emb[0], emb[1])
    assert text_embeds(clip_dir, PADDED_QUESTIONS[0]).shape == (1, 24)


def test_relevance_is_min_max_normalised_with_the_codes_offset():
    gen = torch.Generator().manual_seed(2)
    img, txt = torch.randn(1, 20, 6, generator=gen), torch.randn(3, 6, generator=gen)
    r = relevance(img, txt)  # (1, 20)
    raw = -torch.nn.functional.cosine_similarity(img[0][:, None], txt[None], dim=-1).mean(-1)  # (20,)
    span = (raw.max() - raw.min()).item()
    torch.testing.assert_close(r[0], (raw - raw.min() + 1e-6) / span, atol=1e-6, rtol=1e-5)
    assert int(r.argmin()) == int(raw.argmin()) and abs(r.min().item() - 1e-6 / span) < 1e-6
    s = similarity(torch.randn(1, 5, 4, generator=gen))
    torch.testing.assert_close(torch.diagonal(s[0]), torch.ones(5))


# --- the whole reference on the tiny LLaVA ---------------------------------------------------------------------------


def test_nothing_pruned_equals_the_hf_forward(case, clip_dir):
    for b, s in enumerate(case.samples):
        logits, kept = cdpruner_reference(case.model, clip_dir, s, PADDED_QUESTIONS[b], case.image_id, 64)
        assert kept == list(range(64))
        with torch.no_grad():
            want = case.model(**s).logits[0, -1]
        torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)


def test_one_token_fewer_drops_exactly_one(case, clip_dir):
    s = case.samples[0]
    _, kept = cdpruner_reference(case.model, clip_dir, s, PADDED_QUESTIONS[0], case.image_id, 63)
    assert len(kept) == 63 and kept == sorted(set(kept)) and set(kept) <= set(range(64))
    _, _, kernel = cdpruner_select(case.model, clip_dir, s["pixel_values"], PADDED_QUESTIONS[0], 63)
    dropped = (set(range(64)) - set(kept)).pop()
    assert dropped != int(torch.argmax(torch.diagonal(kernel)))  # the most relevant token is picked first


def test_logits_finite_and_long_question_runs(case, clip_dir):
    V = case.model.config.text_config.vocab_size
    s = case.samples[0]
    with torch.no_grad():
        full = case.model(**s).logits[0, -1]
    logits, kept = cdpruner_reference(case.model, clip_dir, s, PADDED_QUESTIONS[0], case.image_id, 16)
    assert logits.shape == (V,) and bool(torch.isfinite(logits).all()) and len(kept) == 16
    assert not torch.allclose(logits, full, atol=1e-4)  # pruning changes the prediction
    _, _, kernel = cdpruner_select(case.model, clip_dir, s["pixel_values"], PADDED_QUESTIONS[0], 16)
    r = torch.diagonal(kernel).sqrt()  # S_ii = 1, so the diagonal is r_i^2
    assert r.min().item() < 1e-4 and abs(r.max().item() - 1.0) < 1e-4  # min-max normalised
    long_logits, long_kept = cdpruner_reference(case.model, clip_dir, s, LONG_QUESTION, case.image_id, 16)
    assert bool(torch.isfinite(long_logits).all()) and len(long_kept) == 16
    _, _, long_kernel = cdpruner_select(case.model, clip_dir, s["pixel_values"], LONG_QUESTION, 16)
    assert not torch.allclose(long_kernel, kernel)  # the question conditions the kernel
