"""Calibration data for GPTQ: image-and-prompt pairs run through the model's real processor.

Sources (`quant.calib.name`):
- `synthetic`: seeded random images (gradients plus noise) and questions, for offline use and tests.
- `shapes`: the built-in shapes task's training split (`tokcompile.data.shapes`: the questions the trained
  model `tiny-trained:shapes` learnt from), generated in code.
- `custom_mm` / `custom`: `quant.calib.path` is a folder with images and `img_qa.json` (LightCompress's
  layout: a list of {"image": file, "question": text}), or a JSONL file with one {"image": path,
  "prompt" | "question": text} per line. Image paths are relative to the file's folder. A prompt is a bare
  question (wrapped in the model's chat template) or a formatted prompt holding the model's image placeholder
  once (used as is; see `parity.format_prompt`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tokcompile.errors import RecipeError
from tokcompile.qa_files import read_entries

SOURCES = ("synthetic", "shapes", "custom_mm", "custom")

SYNTHETIC_QUESTIONS = (
    "What is in this image?",
    "Describe the scene in detail.",
    "What colour is the largest object?",
    "How many people are there, and what are they doing?",
    "Is this photo taken indoors or outdoors? Explain why.",
    "What text can you read in the picture?",
    "Write a caption for this image.",
    "What would happen next in this scene?",
)


def _pairs_from_path(path: str) -> list[tuple[Any, str]]:
    from PIL import Image

    p = Path(path).expanduser()
    rows, base = read_entries(p, "quant.calib.path", "image/question pairs")
    pairs = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "image" not in row or not (row.get("question") or row.get("prompt")):
            raise RecipeError("quant.calib.path", f"entry {i} of {p} needs 'image' and 'question' (or 'prompt')")
        img_path = base / row["image"]
        try:
            image = Image.open(img_path).convert("RGB")
        except OSError as e:
            raise RecipeError("quant.calib.path", f"cannot read image {img_path} ({e})") from None
        pairs.append((image, str(row.get("question") or row.get("prompt"))))
    if not pairs:
        raise RecipeError("quant.calib.path", f"{p} lists no samples")
    return pairs


def calibration_batches(
    calib: Any, processor: Any, adapter: Any, geometry: Any, seed: int, batch_size: int = 1, question: Any = None
) -> list[dict[str, Any]]:
    """`calib.n_samples` samples as processor batches of `batch_size` (prompts left-padded), holding the
    prefill graph's inputs (`adapter.input_names_for(geometry)`)."""
    from tokcompile.parity import process

    name = calib.name.lower()
    if name != "synthetic" and geometry.media != "image":
        raise RecipeError("quant.calib.name", f"calibration from files takes images; for {geometry.media} "
                                              "prompts use name: synthetic")
    if name == "synthetic":
        rng = np.random.default_rng(seed + 1)
        images = adapter.random_media(rng, calib.n_samples, geometry)
        questions = [SYNTHETIC_QUESTIONS[int(i)] for i in rng.integers(0, len(SYNTHETIC_QUESTIONS), calib.n_samples)]
        pairs = list(zip(images, questions))
    elif name == "shapes":
        from tokcompile.data import shapes

        pairs = [(s.image, s.question) for s in shapes.samples("train", calib.n_samples)]
    elif name in ("custom_mm", "custom"):
        if not calib.path:
            raise RecipeError("quant.calib.path", f"calib name {calib.name} needs a path to a folder or JSONL file")
        pairs = _pairs_from_path(calib.path)
        pairs = [pairs[i % len(pairs)] for i in range(calib.n_samples)] if len(pairs) < calib.n_samples else pairs[
            : calib.n_samples]
    else:
        choices = ", ".join(SOURCES)
        raise RecipeError("quant.calib.name", f"unknown calibration source '{calib.name}'; use one of {choices}")
    key = "model.path" if name == "synthetic" else "quant.calib.path"  # who wrote the prompts
    batches = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        out = process(processor, adapter, geometry, [im for im, _ in chunk], [q for _, q in chunk], key=key,
                      question=question)
        if calib.seq_len is not None and out["input_ids"].shape[1] > calib.seq_len:
            raise RecipeError(
                "quant.calib.seq_len",
                f"a calibration prompt needs {out['input_ids'].shape[1]} tokens (image tokens included), more than "
                f"{calib.seq_len}; raise it or remove it",
            )
        batches.append(out)
    return batches
