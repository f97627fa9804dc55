"""The `shapes` visual question answering task: procedurally drawn scenes of a few coloured shapes, and questions
whose one-word answer needs the image.

Every sample is a pure function of (split, index): `sample("test", 7)` is the same on every machine, and the
splits draw from different seeds, so a model trained on `train` never sees a `validation` or `test` scene.

Question types (balanced: index i has type `QUESTION_TYPES[i % 4]`):
- `color`:    "What color is the circle?"               -> a colour name (the shape occurs exactly once)
- `count`:    "How many squares are there?"             -> "0" .. "3"
- `side`:     "Is the triangle on the left or right?"   -> "left" | "right" (the shape occurs exactly once,
              its centre clear of the middle band)
- `presence`: "Is there a red circle?"                  -> "yes" | "no" (half and half)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

IMAGE_SIZE = 64
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 200),
    "white": (235, 235, 235),
}
SHAPES = ("circle", "square", "triangle")
QUESTION_TYPES = ("color", "count", "side", "presence")
SPLITS = {"train": 1000, "validation": 2000, "test": 3000}  # split -> seed
MAX_SHAPES = 4
MAX_PER_SHAPE = 3
_MIDDLE = 6  # pixels either side of the vertical centre line where a `side` question's shape may not sit


@dataclass(frozen=True)
class Item:
    shape: str
    color: str
    cx: int  # centre, pixels
    cy: int
    r: int  # half the bounding box side


@dataclass(frozen=True)
class Sample:
    id: str  # "<split>-<index>"
    image: Any  # PIL RGB image, IMAGE_SIZE x IMAGE_SIZE
    question: str
    answer: str
    qtype: str
    items: tuple[Item, ...]


def _scene(rng: np.random.Generator) -> list[Item]:
    """1..MAX_SHAPES shapes whose bounding circles do not touch, no more than MAX_PER_SHAPE of one kind."""
    n = int(rng.integers(1, MAX_SHAPES + 1))
    items: list[Item] = []
    while len(items) < n:
        for _ in range(100):
            r = int(rng.integers(5, 10))
            cx, cy = (int(v) for v in rng.integers(r + 1, IMAGE_SIZE - r - 1, size=2))
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            if sum(it.shape == shape for it in items) >= MAX_PER_SHAPE:
                continue
            if all((cx - it.cx) ** 2 + (cy - it.cy) ** 2 > (r + it.r + 2) ** 2 for it in items):
                color = list(COLORS)[int(rng.integers(len(COLORS)))]
                items.append(Item(shape, color, cx, cy, r))
                break
        else:
            break  # the canvas is full; keep the scene as it is
    return items


def render(items: tuple[Item, ...] | list[Item], background: tuple[int, int, int] = (40, 40, 40)) -> Any:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    draw = ImageDraw.Draw(image)
    for it in items:
        box = (it.cx - it.r, it.cy - it.r, it.cx + it.r, it.cy + it.r)
        fill = COLORS[it.color]
        if it.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif it.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(it.cx, it.cy - it.r), (it.cx - it.r, it.cy + it.r), (it.cx + it.r, it.cy + it.r)], fill=fill)
    return image


def _plural(shape: str) -> str:
    return shape + "s"


def question_about(rng: np.random.Generator, items: list[Item] | tuple[Item, ...],
                   qtype: str) -> tuple[str, str] | None:
    """(question, answer) of `qtype` about the scene, or None where the scene cannot ask it."""
    counts = {s: sum(it.shape == s for it in items) for s in SHAPES}
    once = [s for s in SHAPES if counts[s] == 1]
    if qtype == "color":
        if not once:
            return None
        shape = once[int(rng.integers(len(once)))]
        return f"What color is the {shape}?", next(it.color for it in items if it.shape == shape)
    if qtype == "count":
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        return f"How many {_plural(shape)} are there?", str(counts[shape])
    if qtype == "side":
        clear = [it for it in items if counts[it.shape] == 1 and abs(it.cx - IMAGE_SIZE / 2) > _MIDDLE]
        if not clear:
            return None
        it = clear[int(rng.integers(len(clear)))]
        return f"Is the {it.shape} on the left or right?", "left" if it.cx < IMAGE_SIZE / 2 else "right"
    if qtype == "presence":
        present = {(it.color, it.shape) for it in items}
        if rng.random() < 0.5:
            color, shape = sorted(present)[int(rng.integers(len(present)))]
            return f"Is there a {color} {shape}?", "yes"
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        color, shape = absent[int(rng.integers(len(absent)))]
        return f"Is there a {color} {shape}?", "no"
    raise ValueError(f"unknown question type {qtype!r}; use one of {', '.join(QUESTION_TYPES)}")


def sample(split: str, index: int) -> Sample:
    """The split's sample `index` (deterministic). Scenes that cannot ask the index's question type are redrawn."""
    if split not in SPLITS:
        raise ValueError(f"unknown shapes split {split!r}; use one of {', '.join(SPLITS)}")
    rng = np.random.default_rng((SPLITS[split], index))
    qtype = QUESTION_TYPES[index % len(QUESTION_TYPES)]
    while True:
        items = _scene(rng)
        qa = question_about(rng, items, qtype)
        if qa is not None:
            shade = int(rng.integers(25, 60))
            return Sample(f"{split}-{index}", render(items, (shade, shade, shade)), qa[0], qa[1], qtype,
                          tuple(items))


def samples(split: str, n: int, start: int = 0) -> list[Sample]:
    return [sample(split, i) for i in range(start, start + n)]


def conversation(split: str, index: int, turns: int) -> list[tuple[str, str]]:
    """Up to `turns` (question, answer) pairs about sample `index`'s scene: its own question first, then one of
    each following question type in turn (`QUESTION_TYPES[(index + k) % 4]`), skipping a type the scene cannot
    ask. Deterministic, like `sample`; the extra questions draw from their own seeds."""
    first = sample(split, index)
    pairs = [(first.question, first.answer)]
    for k in range(1, turns):
        rng = np.random.default_rng((SPLITS[split], index, k))
        qa = question_about(rng, first.items, QUESTION_TYPES[(index + k) % len(QUESTION_TYPES)])
        if qa is not None:
            pairs.append(qa)
    return pairs


def answers() -> list[str]:
    """Every answer the task can have."""
    return [*COLORS, *(str(i) for i in range(MAX_PER_SHAPE + 1)), "left", "right", "yes", "no"]
