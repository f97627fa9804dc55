"""The question as a vision-graph input, for reductions conditioned on it (TRIM, CDPruner).

A reducer that reads the question returns a `QuestionSpec` from `question(key)`: the tokenizer's directory and
a static shape, `segments` windows of `length` tokens. The vision graph then takes two more inputs,
`question_ids` and `question_mask` (B, segments, length) int64, which `parity.process` makes from each bare
question with `QuestionTokenizer` at compile time and the runtime makes the same way from the tokenizer saved
in the export (`question_tokenizer/`, recorded in the manifest under "question"). Reducers read them as
`ctx.question` (`QuestionTokens`).

The question is the prompt as the user gave it, with the media placeholder replaced by a space (a formatted
prompt keeps its template text, as the official codes pass the raw benchmark question). Tokens fill the
windows one after another; the rest is 0 with mask 0. With `truncate` the tokenizer truncates to one window
(CLIP's own truncation keeps the end token); without it a question longer than the windows is an error that
names the recipe key to raise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tokcompile.errors import RecipeError

QUESTION_INPUTS = ("question_ids", "question_mask")
SAVED_DIR = "question_tokenizer"


@dataclass(frozen=True)
class QuestionSpec:
    directory: str  # the tokenizer's checkpoint (or a built-in tiny one)
    key: str  # the recipe key that names it, for errors
    segments: int
    length: int
    truncate: bool

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class QuestionTokens:
    """The question inputs as a reducer reads them: ids and mask (B, S, L) int64."""

    ids: Tensor
    mask: Tensor

    def segment_valid(self) -> Tensor:
        """(B, S) bool: the window holds part of the question."""
        return self.mask[:, :, 0] > 0


class QuestionTokenizer:
    """Bare questions -> `question_ids`, `question_mask` (B, S, L) for one `QuestionSpec`."""

    def __init__(self, spec: QuestionSpec, tokenizer: Any):
        self.spec, self.tokenizer = spec, tokenizer

    @classmethod
    def load(cls, spec: QuestionSpec, directory: str | None = None) -> QuestionTokenizer:
        """From the spec's own directory (compile time) or `directory` (the copy saved in an export)."""
        from tokcompile.reduce.clip_text import load_tokenizer

        path = directory or spec.directory
        try:
            return cls(spec, load_tokenizer(path))
        except RecipeError:
            raise
        except Exception as e:  # tokenizer files fail in many ways
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise RecipeError(spec.key if directory is None else str(path),
                              f"the question tokenizer could not be loaded from {path} ({first})") from None

    def save(self, directory: Path) -> None:
        self.tokenizer.save_pretrained(str(directory))

    def ids(self, question: str) -> list[int]:
        if self.spec.truncate:
            return list(self.tokenizer(question, truncation=True, max_length=self.spec.length)["input_ids"])
        return list(self.tokenizer(question, verbose=False)["input_ids"])

    @property
    def segments_key(self) -> str:
        """The recipe key that sets how many windows the question takes."""
        return f"{self.spec.key.rsplit('.', 1)[0]}.text_segments"

    def overflow(self, text: str) -> int | None:
        """The tokens `text` needs where they exceed the segments × length the export takes; else None."""
        n = len(self.ids(text))
        return n if n > self.spec.segments * self.spec.length else None

    def __call__(self, questions: list[str], placeholder: str | None = None,
                 key: str = "--prompt") -> dict[str, Tensor]:
        S, L = self.spec.segments, self.spec.length
        ids = torch.zeros(len(questions), S * L, dtype=torch.long)  # (B, S·L)
        mask = torch.zeros_like(ids)
        for b, q in enumerate(questions):
            text = q.replace(placeholder, " ") if placeholder else q
            toks = self.ids(text)
            if len(toks) > S * L:
                raise RecipeError(key, f"a question needs {len(toks)} text-encoder tokens, more than the {S} × {L} "
                                       f"this export was compiled for; shorten it or raise {self.segments_key}")
            ids[b, : len(toks)] = torch.tensor(toks, dtype=torch.long)
            mask[b, : len(toks)] = 1
        return {"question_ids": ids.reshape(-1, S, L), "question_mask": mask.reshape(-1, S, L)}


def for_plan(plan: Any) -> QuestionTokenizer | None:
    """The compile-time question tokenizer of a plan, or None where no step reads the question."""
    spec = getattr(plan, "question", None)
    return None if spec is None else QuestionTokenizer.load(spec)
