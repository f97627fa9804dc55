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


def expected_answer(items, question: str) -> str:
    """The answer to one of the task's questions, worked out from the scene's items."""
    words = question.rstrip("?").split()
    if question.startswith("What color"):
        (color,) = [it.color for it in items if it.shape == words[-1]]
        return color
    if question.startswith("How many"):
        shape = words[2][:-1]  # "How many circles are there"
        return str(sum(it.shape == shape for it in items))
    if question.endswith("left or right?"):
        (it,) = [it for it in items if it.shape == words[2]]
        return "left" if it.cx < shapes.IMAGE_SIZE / 2 else "right"
    color, shape = words[-2], words[-1]
    return "yes" if any(it.color == color and it.shape == shape for it in items) else "no"


@pytest.mark.parametrize("index", range(40))
def test_answers_follow_from_the_scene(index):
    s = shapes.sample("train", index)
    assert s.answer == expected_answer(s.items, s.question)


@pytest.mark.parametrize("index", range(20))
def test_a_conversation_asks_the_sample_first_then_other_types_with_true_answers(index):
    s = shapes.sample("train", index)
    pairs = shapes.conversation("train", index, 4)
    assert pairs[0] == (s.question, s.answer) and 1 <= len(pairs) <= 4
    assert pairs == shapes.conversation("train", index, 4)  # deterministic
    for question, answer in pairs:
        assert answer == expected_answer(s.items, question)
    # the turns after the first follow the question types in order, skipping those the scene cannot ask
    starts = {"color": "What color", "count": "How many", "presence": "Is there ", "side": "Is the "}
    asked = [next(t for t, prefix in starts.items() if q.startswith(prefix)) for q, _ in pairs[1:]]
    cycle = [shapes.QUESTION_TYPES[(index + k) % 4] for k in range(1, 4)]
    assert asked == [t for t in cycle if t in asked]


def test_rendered_pixels_carry_the_colours():
    s = next(x for x in shapes.samples("train", 20) if x.qtype == "color")
    pixels = {tuple(p) for p in np.asarray(s.image).reshape(-1, 3)}
    for it in s.items:
        assert shapes.COLORS[it.color] in pixels
