"""Answer scoring: the usual VQA normalisation, exact match, the VQAv2 soft score, and first-token KL."""

from __future__ import annotations

import re

import torch
from torch import Tensor

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$~|:']")
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")


def normalize(answer: str) -> str:
    """VQA-style: lower case, punctuation removed (a decimal point kept), number words as digits, articles
    dropped, whitespace collapsed."""
    text = _PERIOD.sub("", _PUNCT.sub(" ", answer.lower().replace("\n", " ").replace("\t", " ")))
    words = [_NUMBERS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def vqa_score(prediction: str, answers: tuple[str, ...] | list[str]) -> float:
    """One reference answer: exact match after normalisation (1.0 or 0.0). Several human answers (VQAv2): the
    official soft score, the mean over each answer left out of min(1, matches among the others / 3)."""
    pred = normalize(prediction)
    refs = [normalize(a) for a in answers]
    if len(refs) == 1:
        return float(pred == refs[0])
    scores = []
    for i in range(len(refs)):
        matches = sum(r == pred for j, r in enumerate(refs) if j != i)
        scores.append(min(1.0, matches / 3))
    return sum(scores) / len(scores)


def first_token_kl(reference: Tensor, other: Tensor) -> Tensor:
    """[B] KL(p_reference || p_other) of the first answer token's distributions, from logits [B, V]."""
    ref = torch.log_softmax(reference.double(), -1)  # [B, V]
    oth = torch.log_softmax(other.double(), -1)  # [B, V]
    return (ref.exp() * (ref - oth)).sum(-1)
