"""VQA normalisation, exact match, the VQAv2 soft score and the first-token KL."""

from __future__ import annotations

import pytest
import torch

from tokcompile.eval.score import first_token_kl, normalize, vqa_score


@pytest.mark.parametrize("raw, norm", [(" Red.", "red"), ("Two", "2"), ("the left", "left"), ("YES!", "yes"),
                                       ("3.5", "3.5"), ("a  blue\tcircle", "blue circle")])
def test_normalize(raw, norm):
    assert normalize(raw) == norm


def test_exact_match_and_soft_score():
    assert vqa_score(" red", ("red",)) == 1.0
    assert vqa_score("blue", ("red",)) == 0.0
    ten = ["red"] * 2 + ["blue"] * 8
    # leave-one-out over 10 answers: the 8 "blue" subsets see 2 reds (2/3), the 2 "red" subsets see 1 (1/3)
    assert vqa_score("red", ten) == pytest.approx((8 * 2 / 3 + 2 * 1 / 3) / 10)
    assert vqa_score("blue", ten) == 1.0


def test_first_token_kl():
    a = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    assert torch.allclose(first_token_kl(a, a), torch.zeros(2, dtype=torch.float64))
    b = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    p = torch.softmax(a[0].double(), -1)
    want = float((p * (p.log() - torch.full((3,), 1 / 3, dtype=torch.float64).log())).sum())
    assert float(first_token_kl(a, b)[0]) == pytest.approx(want)
    assert float(first_token_kl(a, b)[1]) == pytest.approx(0.0)
