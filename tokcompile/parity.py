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

from tokcompile.errors import ParityError, RecipeError, TokcompileError
from tokcompile.layout import EXACT_PREFIXES, SCORE_PREFIX, STEP_PREFIXES  # indices and masks compare exactly
from tokcompile.near_ties import (
    SCORE_MARGINS,
    compare_or_replay,
    compare_scores,
    logit_near_tie,
    near_tie,
    top1_near_ties,
)

PROMPTS = (
    "What is shown in this image?",
    "Describe the picture in one sentence.",
    "How many objects can you count here, and what colours are they?",
    "Is there anything unusual?",
    "Write a short caption for this photo, mentioning the main subject and the background.",
    "What happens next?",
)


# What a prompt or processor failure names by default: at compile time the prompts are built in, so a failure
# is the checkpoint's processor's.
PROCESSOR_KEY = "model.path"
PROMPT_FORMATS = ("auto", "chat", "raw")
_PROCESSOR_ERRORS = (ValueError, TypeError, KeyError, IndexError)


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


def format_prompt(processor: Any, adapter: Any, text: str, media: str = "image", prompt_format: str = "auto",
                  key: str = PROCESSOR_KEY) -> str:
    """One prompt with one image (or video), as the processor takes it.

    "chat" wraps a bare question in the model's chat template, or, for a processor without one, in the family's
    own format (`adapter.fallback_prompt`). "raw" takes a prompt that is formatted already, as HF's examples write
    them ("USER: <image>\\nWhat is shown? ASSISTANT:"): it holds the family's placeholder
    (`adapter.placeholder(media)`) exactly once. "auto" is "raw" for a text that holds the placeholder and "chat"
    for any other. Raises RecipeError naming `key` (`process`) for a prompt that does not fit its format."""
    if prompt_format not in PROMPT_FORMATS:
        raise RecipeError("--prompt-format", f"unknown prompt format '{prompt_format}'; use one of "
                                             f"{', '.join(PROMPT_FORMATS)}")
    placeholder = adapter.placeholder(media)
    n = text.count(placeholder)
    if prompt_format == "auto":
        prompt_format = "raw" if n else "chat"
    if prompt_format == "raw":
        if n == 0:
            raise RecipeError(key, f"the formatted prompt {short(text)} has no {media} placeholder {placeholder}; "
                                   f"add it where the {media} goes, or give the bare question with "
                                   "--prompt-format auto or chat (the chat template then adds it)")
        if n > 1:
            raise RecipeError(key, f"the prompt {short(text)} holds the {media} placeholder {placeholder} {n} times, "
                                   f"but each prompt takes one {media}; keep one")
        return text
    if n:
        raise RecipeError(key, f"the prompt {short(text)} holds the {media} placeholder {placeholder}, which the "
                               "chat template adds itself; remove it, or give the formatted prompt with "
                               "--prompt-format raw")
    if not getattr(processor, "chat_template", None):
        return adapter.fallback_prompt(text, media)
    messages = [{"role": "user", "content": [{"type": media}, {"type": "text", "text": text}]}]
    try:
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    except Exception as e:  # jinja and transformers raise their own types for a template that does not render
        raise _processor_error(key, "the processor's chat template could not format", text, media, e) from None


def short(text: str, n: int = 60) -> str:
    """A prompt as an error quotes it: its first `n` characters, newlines escaped."""
    return repr(text if len(text) <= n else text[: n - 3] + "...")


def _processor_error(key: str, what: str, prompt: str, media: str, e: BaseException) -> RecipeError:
    msg = str(e).strip()
    cause = f"{type(e).__name__}: {msg.splitlines()[0]}" if msg else type(e).__name__
    if key == PROCESSOR_KEY:
        fix = "check that the processor files in it (tokenizer, chat template, preprocessor config) are this model's"
    else:
        fix = f"check the {media} placeholders in the prompt"
        if key == "--prompt":
            fix += ", or choose its format with --prompt-format"
    return RecipeError(key, f"{what} the prompt {short(prompt)} ({cause}); {fix}")


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


def process(
    processor: Any, adapter: Any, geometry: Any, images: list, questions: list[str], prompt_format: str = "auto",
    key: str = PROCESSOR_KEY, question: Any = None,
) -> dict[str, Tensor]:
    """(images, prompts) -> the prefill graph's inputs, as the processor returns them for the compiled
    resolution (images resized first where the family's processor output depends on the image size).

    Prompts are bare questions or formatted prompts (see `format_prompt`). A prompt that does not fit its format,
    or one the processor rejects, raises RecipeError naming `key`: the checkpoint's processor (`model.path`) at
    compile time, the user's prompt at run time.

    `question` (a `tokcompile.question.QuestionTokenizer`), where a vision-graph step reads the question, adds
    `question_ids` and `question_mask` made from each prompt with its media placeholder replaced by a space."""
    prompts = [format_prompt(processor, adapter, q, geometry.media, prompt_format, key) for q in questions]
    media = adapter.prepare_images(images, geometry)
    try:
        out = adapter.process(processor, media, prompts, geometry)
    except TokcompileError:
        raise
    except _PROCESSOR_ERRORS as e:  # transformers' own checks of text and media
        bad, cause = prompts[0], e
        for m, prompt in zip(media, prompts):  # quote the prompt that fails alone, where one does
            try:
                adapter.process(processor, [m], [prompt], geometry)
            except _PROCESSOR_ERRORS as alone:
                bad, cause = prompt, alone
                break
        raise _processor_error(key, "the processor could not process", bad, geometry.media, cause) from None
    names = adapter.input_names_for(geometry)
    missing = [n for n in names if n not in out]
    if missing:
        raise RecipeError(key, f"the processor returned no {', '.join(missing)}, which {type(adapter).__name__} "
                               "needs; is this processor the model's?")
    picked = {n: out[n] for n in names}
    if question is not None:
        picked.update(question(list(questions), adapter.placeholder(geometry.media), key))
    return picked


def _check_question_fits(question: Any, questions: list[str], sample: int) -> None:
    """A built-in parity prompt the step's text encoder cannot hold: one line naming the key that can."""
    S, L = question.spec.segments, question.spec.length
    for q in questions:
        if (n := question.overflow(q)) is not None:
            fewer = f", or parity.samples to {sample} so that it is not used" if sample else ""
            raise RecipeError(question.segments_key, f"the compile's parity prompt {q!r} needs {n} text-encoder "
                                                     f"tokens, more than the {S} × {L} it sets; raise it to "
                                                     f"{-(-n // L)}{fewer}")


def make_inputs(
    processor: Any, adapter: Any, geometry: Any, batch_size: int, samples: int, seed: int, max_len: int,
    question: Any = None,
) -> list[ParityInputs]:
    """`samples` batches with prompts of different lengths (so batches > 1 carry padding)."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(samples):
        questions = [PROMPTS[(s * batch_size + b) % len(PROMPTS)] for b in range(batch_size)]
        if question is not None:
            _check_question_fits(question, questions, s)
        images = adapter.random_media(rng, batch_size, geometry)
        batch = process(processor, adapter, geometry, images, questions, question=question)
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
    name: str, names: list[str], got: tuple, ref: tuple, atol: float, rtol: float, where: str,
    ties: list | None = None, score_margin: float = SCORE_MARGINS["float32"],
) -> float:
    """Index outputs must be equal; decision scores within `score_margin` (`compare_scores`); other float outputs
    within tolerance; logits also agree on top-1.
    Returns the largest absolute difference on logits. Raises ParityError naming `name` and the output.
    With a `ties` list (half precision), a top-1 that differs at a near-tie (`top1_near_ties`) is appended to it
    instead of failing."""
    worst = 0.0
    # the steps' selections first, then what follows from them
    outputs = sorted(zip(names, got, ref), key=lambda o: (not o[0].startswith(STEP_PREFIXES),
                                                          not o[0].startswith(EXACT_PREFIXES)))
    for out_name, g, r in outputs:
        g, r = torch.as_tensor(g).cpu(), torch.as_tensor(r).cpu()  # compared on the host, wherever each ran
        if out_name.startswith(SCORE_PREFIX):
            compare_scores(name, out_name, g, r, score_margin, where)
            continue
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
            found = None if cmp["top1_agree"] or ties is None else top1_near_ties(g, r, atol, rtol)
            if not cmp["top1_agree"] and found is None:
                raise ParityError(f"parity failed for {name}: the top-1 token differs from eager {where}")
            if found:
                ties.extend({"where": where, **t} for t in found)
    return worst


def check_artifact(
    name: str, runner: Callable, names: list[str], cases: list[tuple[dict, tuple]], atol: float, rtol: float,
    near_ties: bool = False, replay: Callable | None = None, score_margin: float = SCORE_MARGINS["float32"],
) -> dict:
    """Compare one graph artifact with eager on every (inputs, eager outputs) case; `near_ties` (half precision)
    records a top-1 near-tie instead of failing. `replay(inputs, forced)` runs eager again deciding on a graph's
    decision scores (`compare_or_replay`): a graph that differs from eager's only by a decision at a near-tie is
    recorded, not refused."""
    rows, chosen, ties = [], [], []
    for i, (inputs, ref) in enumerate(cases):
        got = tuple(runner(inputs))

        def compare(eager: tuple, where: str, got: tuple = got) -> tuple[float, list]:
            found: list | None = [] if near_ties else None
            return compare_outputs(name, names, got, eager, atol, rtol, where, found, score_margin), found or []

        again = None if replay is None else (lambda forced, inputs=inputs: replay(inputs, forced))
        diff, found = compare_or_replay(compare, ref, lambda out: dict(zip(names, out)), dict(zip(names, got)),
                                        again, score_margin, f"on input {i}", chosen)
        ties += found
        rows.append({"input": i, "batch": int(next(iter(inputs.values())).shape[0]), "max_abs_logit_diff": diff})
    out = {"passed": True, "max_abs_diff": max(r["max_abs_logit_diff"] for r in rows), "inputs": rows}
    if ties or chosen:
        out["near_ties"] = chosen + ties
    return out


def check_generation(name: str, result: Any, ref: Any, atol: float, rtol: float, where: str,
                     near_ties: bool = False, replay: Callable | None = None,
                     score_margin: float = SCORE_MARGINS["float32"]) -> dict:
    """Token-for-token agreement of a backend's greedy generation with eager's, every step's selection equal, and
    step logits in tolerance.

    With `near_ties` (half precision), the first differing step passes when it is a near-tie of eager's logits
    (`logit_near_tie`, every sample that differs there); the steps before it are compared, the rest are not (the
    two generations continue from different tokens) and the record says so. `replay(forced)` generates with eager
    again, deciding on the backend's decision scores, where the generations differ (`compare_or_replay`)."""
    chosen: list[dict] = []
    row = compare_or_replay(lambda eager, at: _compare_generation(name, result, eager, atol, rtol, at, near_ties,
                                                                  score_margin),
                            ref, lambda r: {**r.kept, **r.scores}, {**result.kept, **result.scores}, replay,
                            score_margin, where, chosen)
    ties = chosen + row.pop("near_ties", [])
    if ties:
        row["near_ties"] = ties
    return row


def _compare_generation(name: str, result: Any, ref: Any, atol: float, rtol: float, where: str, near_ties: bool,
                        score_margin: float) -> dict:
    """`check_generation` against one eager generation `ref`; raises ParityError."""
    for n in result.kept:
        if not torch.equal(torch.as_tensor(result.kept[n]).long(), torch.as_tensor(ref.kept[n]).long()):
            raise ParityError(f"parity failed for {name}: {n} differs from eager's selection {where}")
    for n in result.scores:
        compare_scores(name, n, result.scores[n], ref.scores[n], score_margin, where)
    steps = len(result.step_logits)
    ties: list[dict] = []
    if not torch.equal(result.tokens, ref.tokens):
        step = int((result.tokens != ref.tokens).any(0).nonzero()[0])
        for b in (result.tokens[:, step] != ref.tokens[:, step]).nonzero().reshape(-1).tolist() if near_ties else []:
            tie = logit_near_tie(ref.step_logits[step][b], result.tokens[b, step], ref.tokens[b, step], atol, rtol)
            if tie is None:
                ties = []
                break
            ties.append({"step": step, "row": b, **tie})
        if not ties:
            raise ParityError(f"parity failed for {name}: generated tokens differ from eager at step {step} {where}")
        steps = step + 1
    worst = 0.0
    for t, (g, r) in enumerate(zip(result.step_logits[:steps], ref.step_logits[:steps])):
        cmp = _compare_logits(g, r, atol, rtol)
        worst = max(worst, cmp["max_abs_diff"])
        if not cmp["within_tolerance"]:
            raise ParityError(
                f"parity failed for {name}: step {t} logits differ from eager by {cmp['max_abs_diff']:.3g} {where}"
            )
    row = {"tokens": int(result.tokens.shape[1]), "batch": int(result.tokens.shape[0]), "max_abs_logit_diff": worst}
    if ties:
        row["near_ties"] = ties
        row["note"] = f"tokens equal up to step {steps - 1}, a near-tie there; later steps not compared"
    return row


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
    margin: float = 0.0,
) -> dict:
    """Compare eager `ReducedVLM` (batched, padded) with the independent per-sample reference.

    With a near-tie margin (half precision), `reference` also takes `scores_out` (a list receiving its fp32
    scores) and `forced` (kept indices to use): kept indices that differ only at the boundary (`near_tie`) are
    recorded, and the logits are compared with the reference replaying eager's selection."""
    rows = []
    for i, (inp, ref) in enumerate(zip(inputs, eager_outputs)):
        for b in range(inp.batch["input_ids"].shape[0]):
            scores: list = []
            logits, kept = reference(inp.sample(b), scores_out=scores) if margin else reference(inp.sample(b))
            tie = None
            if kept is not None and margin and not torch.equal(kept, ref["kept_0"][b]):
                tie = near_tie(scores[0], ref["kept_0"][b], kept, margin)
                if tie is not None:
                    logits, _ = reference(inp.sample(b), forced=ref["kept_0"][b])
            row = {"input": i, "row": b, **_compare_logits(logits[None], ref["logits"][b : b + 1], atol, rtol)}
            if margin and not row["top1_agree"] and (top1 := top1_near_ties(logits[None], ref["logits"][b : b + 1],
                                                                             atol, rtol)):
                row["top1_agree"], row["top1_near_tie"] = True, top1[0]
            if tie is not None:
                row["kept_equal"], row["near_tie"] = False, tie
            elif kept is not None:
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
    out = {"passed": True, "max_abs_diff": max(r["max_abs_diff"] for r in rows), "samples": rows}
    if margin:
        out["near_tie_margin"] = margin
        out["near_ties"] = sum("near_tie" in r for r in rows)
    return out


def drift(eager_outputs: list[dict], baseline: list[Tensor]) -> dict:
    """Compressed (quantized + reduced) logits against the uncompressed model's. Information only."""
    got = torch.cat([o["logits"].cpu() for o in eager_outputs]).float()
    ref = torch.cat(baseline).float()
    return {
        "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
        "max_abs_logit_diff": float((got - ref).abs().max()),
        "n": int(ref.shape[0]),
        "note": "compressed model against the same checkpoint without quantization or reduction; not a failure",
    }
