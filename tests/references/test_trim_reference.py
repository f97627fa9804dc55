"""Checks of the TRIM reference that need no project implementation: the IQR count against a brute force, the
aggregated token, the max_tokens clamp, the question's truncation, the sign flag, the fixed counts and the
splice against HF's own forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import PADDED_QUESTIONS, padded_family_case
from tests.references.trim import (
    spliced_logits,
    text_embeds,
    trim_features,
    trim_iqr_count,
    trim_reference,
    trim_scores,
)


@pytest.fixture(scope="module")
def case():
    c = padded_family_case("llava")
    c.samples = [c.adapter.sample_inputs(c.batch, b, c.geom) for b in range(2)]
    return c


def _brute_iqr_count(p: np.ndarray) -> int:
    """Quartiles by hand (sorted values, linear interpolation at (P-1)·q, float64), then the code's
    `int(P * (count / P))`."""
    v = sorted(float(x) for x in np.asarray(p, dtype=np.float32).ravel())
    P = len(v)

    def q(frac: float) -> float:
        pos = (P - 1) * frac
        lo = int(pos)
        hi = min(lo + 1, P - 1)
        return v[lo] + (v[hi] - v[lo]) * (pos - lo)

    q1, q3 = q(0.25), q(0.75)
    upper = q3 + 1.5 * (q3 - q1)
    count = sum(1 for x in v if x > upper)
    return int(P * (count / P))


# --- IQR count -------------------------------------------------------------------------------------------------------


def test_iqr_count_matches_brute_force():
    rng = np.random.default_rng(0)
    seen = set()
    for trial in range(60):
        P = [64, 196, 576, 729][trial % 4]
        logits = rng.normal(size=P) * rng.uniform(0.5, 4.0)
        p = np.exp(logits - logits.max())
        p = (p / p.sum()).astype(np.float32)  # softmax scores, as the code sees them
        got = trim_iqr_count(p)
        assert got == _brute_iqr_count(p)
        assert trim_iqr_count(torch.from_numpy(p)) == got  # tensor and array inputs agree
        seen.add(got)
    assert len(seen) > 5  # the random cases really exercise different counts


def test_iqr_count_keeps_the_codes_float_rounding():
    base = np.linspace(0.0, 1.0, 196, dtype=np.float32)
    one_outlier = base.copy()
    one_outlier[7] = 100.0
    assert int(196 * (1 / 196)) == 0  # float rounding: 0.9999999999999999
    assert trim_iqr_count(one_outlier) == 0  # the code's int(P * ratio), not the raw count
    base = np.linspace(0.0, 1.0, 576, dtype=np.float32)
    base[[3, 50, 400]] = 100.0
    assert trim_iqr_count(base) == 3
    assert trim_iqr_count(np.linspace(0.0, 1.0, 64)) == 0  # uniform: no outliers


# --- features: selection, aggregated token, clamp --------------------------------------------------------------------


def test_aggregated_token_is_the_mean_of_the_rest(case, clip_dir):
    s = case.samples[0]
    scores, feats = trim_scores(case.model, clip_dir, s["pixel_values"], PADDED_QUESTIONS[0])  # (P,), (P, Dv)
    P = feats.shape[0]
    out, sel, n = trim_features(feats, scores, 0.25)
    assert n == 16 and out.shape == (17, feats.shape[1]) and sel == sorted(set(sel))
    rest = [j for j in range(P) if j not in sel]
    assert min(scores[sel].tolist()) >= max(scores[rest].tolist())  # the highest scores are selected
    torch.testing.assert_close(out[:n], feats[sel])  # in ascending index order
    want = feats.double()[rest].mean(dim=0).float()
    torch.testing.assert_close(out[n], want, atol=1e-6, rtol=1e-5)
    out, sel, n = trim_features(feats, scores, 1.0)  # nothing left: a zero token is appended
    assert n == P and sel == list(range(P)) and torch.equal(out[P], torch.zeros(feats.shape[1]))
    flat = torch.full((P,), 1.0 / P)  # no outliers: the aggregated token alone, the mean of everything
    out, sel, n = trim_features(feats, flat, -1)
    assert n == 0 and sel == [] and out.shape == (1, feats.shape[1])
    torch.testing.assert_close(out[0], feats.double().mean(dim=0).float(), atol=1e-6, rtol=1e-5)


def test_max_tokens_clamps_the_iqr_count_only():
    P, Dv = 64, 5
    feats = torch.arange(P * Dv, dtype=torch.float32).reshape(P, Dv)
    scores = torch.linspace(0.0, 0.01, P)
    outliers = [60, 3, 41, 17, 29, 8, 50, 33, 12, 22]  # best first
    for rank, j in enumerate(outliers):
        scores[j] = 1.0 - 0.01 * rank
    out, sel, n = trim_features(feats, scores, -1)
    assert n == 10 and sel == sorted(outliers)
    out, sel, n = trim_features(feats, scores, -1, max_tokens=4)
    assert n == 4 and sel == sorted(outliers[:4])
    rest = [j for j in range(P) if j not in sel]  # the 6 excess outliers join the aggregated token
    torch.testing.assert_close(out[4], feats[rest].mean(dim=0))
    assert trim_features(feats, scores, -1, max_tokens=40)[2] == 10  # a bound above the count changes nothing
    assert trim_features(feats, scores, 0.25, max_tokens=4)[2] == 16  # fixed mode is not clamped


def test_ties_break_by_lower_index():
    feats = torch.randn(8, 3)
    scores = torch.tensor([0.1, 0.3, 0.3, 0.1, 0.3, 0.0, 0.3, 0.2])
    assert trim_features(feats, scores, 0.25)[1] == [1, 2]
    assert trim_features(feats, scores, 0.5)[1] == [1, 2, 4, 6]


def test_question_is_truncated_to_77_tokens(clip_dir):
    long_q = "Describe every object in this picture and say where it is, its colour, and its size. " * 2
    assert len(long_q) > 75
    torch.testing.assert_close(text_embeds(clip_dir, long_q), text_embeds(clip_dir, long_q[:75]))  # BOS+75+EOS
    assert not torch.allclose(text_embeds(clip_dir, long_q[:74]), text_embeds(clip_dir, long_q[:75]))


# --- the whole reference on the tiny LLaVA ----------------------------------------------------------------------------


def test_sign_flip_changes_the_selection(case, clip_dir):
    s = case.samples[0]
    _, code, _ = trim_reference(case.model, clip_dir, s, PADDED_QUESTIONS[0], case.image_id, 0.25, sign="code")
    _, paper, _ = trim_reference(case.model, clip_dir, s, PADDED_QUESTIONS[0], case.image_id, 0.25, sign="paper")
    assert len(code) == len(paper) == 16
    assert not set(code) & set(paper)  # softmax(-sim) and softmax(+sim) rank the patches in opposite orders
    with pytest.raises(ValueError):
        trim_reference(case.model, clip_dir, s, PADDED_QUESTIONS[0], case.image_id, 0.25, sign="other")


def test_counts_and_logits(case, clip_dir):
    V = case.model.config.text_config.vocab_size
    for b, s in enumerate(case.samples):
        with torch.no_grad():
            full = case.model(**s).logits[0, -1]
        for k in (0.25, 0.5):
            logits, sel, n = trim_reference(case.model, clip_dir, s, PADDED_QUESTIONS[b], case.image_id, k)
            assert n == int(64 * k) and len(sel) == n and sel == sorted(set(sel))
            assert logits.shape == (V,) and bool(torch.isfinite(logits).all())
            assert not torch.allclose(logits, full, atol=1e-4)  # the reduction changes the prediction
        scores, _ = trim_scores(case.model, clip_dir, s["pixel_values"], PADDED_QUESTIONS[b])
        n_iqr = trim_iqr_count(scores)
        logits, sel, n = trim_reference(case.model, clip_dir, s, PADDED_QUESTIONS[b], case.image_id, -1)
        assert n == n_iqr > 1 and bool(torch.isfinite(logits).all())
        _, clamped, m = trim_reference(case.model, clip_dir, s, PADDED_QUESTIONS[b], case.image_id, -1,
                                       max_tokens=n_iqr - 1)
        assert m == n_iqr - 1 and set(clamped) < set(sel)


def test_splice_of_all_features_equals_the_hf_forward(case):
    """The reference's splice and P0 positions: all P projected features give HF's own logits."""
    for s in case.samples:
        with torch.no_grad():
            out = case.model.model.vision_tower(s["pixel_values"], output_hidden_states=True)
            feats = out.hidden_states[case.model.config.vision_feature_layer][:, 1:]  # (1, P, Dv)
            embeds = case.model.model.multi_modal_projector(feats)[0]  # (P, D)
            want = case.model(**s).logits[0, -1]
        torch.testing.assert_close(spliced_logits(case.model, s, embeds, case.image_id), want, atol=1e-5, rtol=1e-5)
