"""Parity in three layers, all reading the same plan and inputs.

1. Kept indices: every reduction step's kept indices in each artifact equal the eager `ReducedVLM`'s.
2. Numbers: next-token logits within the recipe's atol/rtol (|a-b| <= atol + rtol·|b|) and the same top-1.
   Separately, an independent eager reference (official-FastV style) must give the same kept indices and
   logits as eager `ReducedVLM`.
3. Drift against the uncompressed model (top-1 agreement, max logit difference): reported, never a failure.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tokcompile.errors import ParityError
from tokcompile.layout import EXACT_PREFIXES  # indices and masks compare exactly

PROMPTS = (
    "What is shown in this image?",
    "Describe the picture in one sentence.",
    "How many objects can you count here, and what colours are they?",
    "Is there anything unusual?",
    "Write a short caption for this photo, mentioning the main subject and the background.",
    "What happens next?",
)


@dataclass
class ParityInputs:
    """One batch as the processor returns it (the prefill graph's inputs), and its prompts."""

    batch: dict[str, Tensor]
    prompts: list[str]
    adapter: Any = None
    geometry: Any = None

    def sample(self, b: int) -> dict[str, Tensor]:
        """Sample `b` alone and unpadded, as a batch of one (the family adapter knows how to slice)."""
        return self.adapter.sample_inputs(self.batch, b, self.geometry)


def format_prompt(processor: Any, question: str, media: str = "image") -> str:
    """The model's chat template with one image (or video) and one question, or LLaVA-1.5's plain template."""
    template = getattr(processor, "chat_template", None)
    if template:
        messages = [{"role": "user", "content": [{"type": media}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    return f"USER: <{media}>\n{question} ASSISTANT:"


def random_images(rng: np.random.Generator, n: int, size: tuple[int, int]) -> list:
    """Random RGB images with some structure (smooth gradients plus noise), of varying aspect ratios."""
    from PIL import Image

    images = []
    for i in range(n):
        h, w = size[0] + 16 * (i % 3), size[1] + 24 * ((i + 1) % 3)
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * (i + 1)) % 256, (yy * 3) % 256, ((xx + yy) * 2) % 256], -1)
        noise = rng.integers(0, 64, (h, w, 3))
        images.append(Image.fromarray(((base + noise) % 256).astype("uint8")))
    return images


def process(processor: Any, adapter: Any, geometry: Any, images: list, questions: list[str]) -> dict[str, Tensor]:
    """(images, questions) -> the prefill graph's inputs, as the processor returns them for the compiled
    resolution (images resized first where the family's processor output depends on the image size)."""
    prompts = [format_prompt(processor, q, geometry.media) for q in questions]
    media = adapter.prepare_images(images, geometry)
    out = adapter.process(processor, media, prompts, geometry)
    names = adapter.input_names_for(geometry)
    missing = [n for n in names if n not in out]
    if missing:
        raise ValueError(f"the processor returned no {', '.join(missing)}")
    return {n: out[n] for n in names}


def make_inputs(
    processor: Any, adapter: Any, geometry: Any, batch_size: int, samples: int, seed: int, max_len: int
) -> list[ParityInputs]:
    """`samples` batches with prompts of different lengths (so batches > 1 carry padding)."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(samples):
        questions = [PROMPTS[(s * batch_size + b) % len(PROMPTS)] for b in range(batch_size)]
        images = adapter.random_media(rng, batch_size, geometry)
        batch = process(processor, adapter, geometry, images, questions)
        if batch["input_ids"].shape[1] > max_len:
            n = batch["input_ids"].shape[1]
            raise ValueError(f"a parity prompt needs {n} tokens, above the {max_len} compiled")
        out.append(ParityInputs(batch, questions, adapter, geometry))
    return out


def _compare_logits(got: Tensor, ref: Tensor, atol: float, rtol: float) -> dict:
    got, ref = got.float(), ref.float()
    diff = (got - ref).abs()
    bound = atol + rtol * ref.abs()
    return {
        "max_abs_diff": float(diff.max()),
        "within_tolerance": bool((diff <= bound).all()),
        "top1_agree": bool(torch.equal(got.argmax(-1), ref.argmax(-1))),
    }




def compare_outputs(
    name: str, names: list[str], got: tuple, ref: tuple, atol: float, rtol: float, where: str
) -> float:
    """Index outputs must be equal; float outputs within tolerance; logits also agree on top-1.
    Returns the largest absolute difference on logits. Raises ParityError naming `name` and the output."""
    worst = 0.0
    for out_name, g, r in zip(names, got, ref):
        g, r = torch.as_tensor(g), torch.as_tensor(r)
        if tuple(g.shape) != tuple(r.shape):
            raise ParityError(
                f"parity failed for {name}: {out_name} has shape {tuple(g.shape)}, eager {tuple(r.shape)} {where}"
            )
        if out_name.startswith(EXACT_PREFIXES):
            if not torch.equal(g.long(), r.long()):
                n_diff = int((g.long() != r.long()).sum())
                raise ParityError(
                    f"parity failed for {name}: {out_name} indices differ from eager {where} "
                    f"({n_diff} of {r.numel()} positions)"
                )
            continue
        cmp = _compare_logits(g, r, atol, rtol)
        if not cmp["within_tolerance"]:
            raise ParityError(
                f"parity failed for {name}: {out_name} differs from eager by {cmp['max_abs_diff']:.3g} {where} "
                f"(atol {atol:g}, rtol {rtol:g})"
            )
        if out_name == "logits":
            worst = max(worst, cmp["max_abs_diff"])
            if not cmp["top1_agree"]:
                raise ParityError(f"parity failed for {name}: the top-1 token differs from eager {where}")
    return worst


def check_artifact(
    name: str, runner: Callable, names: list[str], cases: list[tuple[dict, tuple]], atol: float, rtol: float
) -> dict:
    """Compare one graph artifact with eager on every (inputs, eager outputs) case."""
    rows = []
    for i, (inputs, ref) in enumerate(cases):
        diff = compare_outputs(name, names, runner(inputs), ref, atol, rtol, f"on input {i}")
        rows.append({"input": i, "batch": int(next(iter(inputs.values())).shape[0]), "max_abs_logit_diff": diff})
    return {"passed": True, "max_abs_diff": max(r["max_abs_logit_diff"] for r in rows), "inputs": rows}


def check_generation(name: str, result: Any, ref: Any, atol: float, rtol: float, where: str) -> dict:
    """Token-for-token agreement of a backend's greedy generation with eager's, and step logits in tolerance."""
    if not torch.equal(result.tokens, ref.tokens):
        step = int((result.tokens != ref.tokens).any(0).nonzero()[0])
        raise ParityError(f"parity failed for {name}: generated tokens differ from eager at step {step} {where}")
    worst = 0.0
    for t, (g, r) in enumerate(zip(result.step_logits, ref.step_logits)):
        cmp = _compare_logits(g, r, atol, rtol)
        worst = max(worst, cmp["max_abs_diff"])
        if not cmp["within_tolerance"]:
            raise ParityError(
                f"parity failed for {name}: step {t} logits differ from eager by {cmp['max_abs_diff']:.3g} {where}"
            )
    return {"tokens": int(result.tokens.shape[1]), "batch": int(result.tokens.shape[0]), "max_abs_logit_diff": worst}


def check_no_cache(runs: list, references: list[list[Tensor]], atol: float, rtol: float) -> dict:
    """Eager generation with the KV cache against the no-cache reference, at every generated step."""
    worst = 0.0
    for run, ref in zip(runs, references):
        for t, ref_logits in enumerate(ref):
            cmp = _compare_logits(run.step_logits[t], ref_logits, atol, rtol)
            worst = max(worst, cmp["max_abs_diff"])
            if not cmp["within_tolerance"]:
                raise ParityError(
                    f"parity failed for eager generation: step {t} logits differ from the no-cache reference "
                    f"by {cmp['max_abs_diff']:.3g}"
                )
    return {"passed": True, "steps": len(references[0]), "cases": len(runs), "max_abs_logit_diff": worst}


def check_reference(
    reference: Callable[[dict[str, Tensor]], tuple[Tensor, Tensor | None]],
    eager_outputs: list[dict],
    inputs: list[ParityInputs],
    atol: float,
    rtol: float,
) -> dict:
    """Compare eager `ReducedVLM` (batched, padded) with the independent per-sample reference."""
    rows = []
    for i, (inp, ref) in enumerate(zip(inputs, eager_outputs)):
        for b in range(inp.batch["input_ids"].shape[0]):
            logits, kept = reference(inp.sample(b))
            row = {"input": i, "row": b, **_compare_logits(logits[None], ref["logits"][b : b + 1], atol, rtol)}
            if kept is not None:
                row["kept_equal"] = bool(torch.equal(kept, ref["kept_0"][b]))
                if not row["kept_equal"]:
                    raise ParityError(
                        f"parity failed for eager ReducedVLM: kept indices differ from the independent FastV reference "
                        f"on input {i}, row {b}"
                    )
            if not (row["within_tolerance"] and row["top1_agree"]):
                raise ParityError(
                    f"parity failed for eager ReducedVLM: logits differ from the independent reference by "
                    f"{row['max_abs_diff']:.3g} on input {i}, row {b}"
                )
            rows.append(row)
    return {"passed": True, "max_abs_diff": max(r["max_abs_diff"] for r in rows), "samples": rows}


def drift(eager_outputs: list[dict], baseline: list[Tensor]) -> dict:
    """Compressed (quantized + reduced) logits against the uncompressed model's. Information only."""
    got = torch.cat([o["logits"] for o in eager_outputs]).float()
    ref = torch.cat(baseline).float()
    return {
        "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
        "max_abs_logit_diff": float((got - ref).abs().max()),
        "n": int(ref.shape[0]),
        "note": "compressed model against the same checkpoint without quantization or reduction; not a failure",
    }
