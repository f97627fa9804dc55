"""The shapes task: deterministic, balanced, answers that follow from the scene, and disjoint splits."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from tokcompile.data import shapes


def test_samples_are_a_pure_function_of_split_and_index():
    a, b = shapes.sample("test", 17), shapes.sample("test", 17)
    assert (a.question, a.answer, a.items) == (b.question, b.answer, b.items)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert shapes.samples("test", 3, start=5)[0].id == "test-5"


def test_splits_draw_different_scenes():
    train = {shapes.sample("train", i).items for i in range(200)}
    test = {shapes.sample("test", i).items for i in range(200)}
    assert not train & test


def test_question_types_are_balanced_and_answers_are_known():
    data = shapes.samples("validation", 400)
    assert Counter(s.qtype for s in data) == {q: 100 for q in shapes.QUESTION_TYPES}
    assert {s.answer for s in data} <= set(shapes.answers())
    assert Counter(s.answer for s in data if s.qtype == "presence")["yes"] in range(35, 66)  # about half
    assert {s.answer for s in data if s.qtype == "side"} == {"left", "right"}


@pytest.mark.parametrize("index", range(40))
def test_answers_follow_from_the_scene(index):
    s = shapes.sample("train", index)
    words = s.question.rstrip("?").split()
    if s.qtype == "color":
        shape = words[-1]
        assert [it.color for it in s.items if it.shape == shape] == [s.answer]
    elif s.qtype == "count":
        shape = words[2][:-1]  # "How many circles are there"
        assert sum(it.shape == shape for it in s.items) == int(s.answer)
    elif s.qtype == "side":
        (it,) = [it for it in s.items if it.shape == words[2]]
        assert (it.cx < shapes.IMAGE_SIZE / 2) == (s.answer == "left")
    else:
        color, shape = words[-2], words[-1]
        assert any(it.color == color and it.shape == shape for it in s.items) == (s.answer == "yes")


def test_rendered_pixels_carry_the_colours():
    s = next(x for x in shapes.samples("train", 20) if x.qtype == "color")
    pixels = {tuple(p) for p in np.asarray(s.image).reshape(-1, 3)}
    for it in s.items:
        assert shapes.COLORS[it.color] in pixels
