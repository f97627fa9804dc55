"""TRIM: "Less is More: A Simple yet Effective Token Reduction Method for Efficient Multi-modal LLMs"
(Song et al., COLING 2025, arXiv:2409.10994).

TRIM scores every patch of the vision tower's selected layer by CLIP's own similarity to the question: the
patch through CLIP's vision head (post-LayerNorm, visual projection) against the question's CLIP text
embedding, a softmax over the patches. It keeps the highest-scoring patches in their original order and
appends one aggregated token, the mean of every patch it did not keep, before the projector. The paper's
count is the number of outlier scores (above Q3 + 1.5·IQR), so it depends on the image and the question.

Static-export form (official code: FreedomIntelligence/TRIM, `multimodal_encoder/clip_encoder.py`):
- Fixed budget (`keep_ratio` k in (0, 1], the code's `TRIM:k`): `int(P·k)` patches, as the code computes it.
- IQR (`keep_ratio: -1`, the code's `TRIM:-1`): `max_tokens` slots always; the outlier count n* (the code's
  `int(P · (count / P))`, looked up from a table built in Python so float rounding matches) selects the top
  n* patches, the slots after them are unused (`image_source` -1: never attended, positions contiguous over
  the rest, so the decoder sees exactly the code's n* + 1 tokens), and the aggregated token keeps the last
  slot. Where n* exceeds `max_tokens`, the lowest-scoring excess joins the aggregated token instead and the
  eager run warns (the compile's parity runs report it). Quartiles follow numpy's linear interpolation in
  float32, bit for bit.
- Scores: the code's sign by default, softmax(−σ) (its most relevant patch has the lowest raw dot product);
  `sign: paper` uses softmax(+σ), the paper's prose. Ties break by (score descending, index ascending), not
  `torch.topk`'s unspecified order. The quartiles are per sample (the code pools a batch; it runs batch 1).
  The scores go through `ctx.decision` (`Step.scored`), ranking and IQR count alike, so a graph whose
  selection differs from eager's at a near-tie (or at the IQR bound) is checked by replaying its scores.
- The question is the prompt with its image placeholder replaced by a space, truncated by CLIP's tokenizer.
- CLIP's vision head and text tower are the `text_encoder` checkpoint's, run in float32 as the code runs them.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from tokcompile.errors import RecipeError
from tokcompile.reduce.base import REDUCERS, Entering
from tokcompile.reduce.clip_text import QuestionHead, check, question_spec
from tokcompile.reduce.ops import gather_tokens, rank_desc
from tokcompile.reduce.schedule import Output, Schedule, Site, Step
from tokcompile.reduce.state import ImageTokens

if TYPE_CHECKING:
    from torch import Tensor

    from tokcompile.models.geometry import Geometry
    from tokcompile.question import QuestionSpec
    from tokcompile.reduce.context import VisionContext

PROTECTED = 1  # CLIP's CLS token: LLaVA's feature selection drops it after this step
IQR = -1.0
SIGNS = ("code", "paper")


def fixed_count(patches: int, keep_ratio: float) -> int:
    """The code's `int(tokens_number * k)`."""
    return int(patches * keep_ratio)


def outlier_count_table(patches: int) -> list[int]:
    """count -> the code's `int(P * (count / len))` (float64, as numpy and Python compute it)."""
    return [int(patches * (c / patches)) for c in range(patches + 1)]


def percentile(sorted_scores: Tensor, q: float) -> Tensor:
    """numpy's linear-interpolation percentile of each row of ascending fp32 scores (B, P) -> (B,), float32 as
    numpy computes it for float32 input."""
    P = sorted_scores.shape[-1]
    v = q / 100 * (P - 1)
    lo = math.floor(v)
    hi, t = min(lo + 1, P - 1), v - lo
    a, b = sorted_scores[:, lo], sorted_scores[:, hi]  # (B,)
    diff = b - a
    return b - diff * (1 - t) if t >= 0.5 else a + diff * t


def iqr_counts(scores: Tensor) -> Tensor:
    """(B, P) softmax scores -> (B,) how many lie above Q3 + 1.5·(Q3 − Q1)."""
    s = scores.sort(dim=-1).values  # (B, P) ascending: values only, ties do not matter
    q1, q3 = percentile(s, 25), percentile(s, 75)
    upper = q3 + 1.5 * (q3 - q1)  # (B,)
    return (scores > upper[:, None]).sum(-1)  # (B,)


@REDUCERS.register("trim")
@dataclass(frozen=True)
class TRIMConfig:
    """TRIM parameters.

    Args:
        text_encoder: the CLIP checkpoint the vision tower came from (a local directory with safetensors), or
            `tiny-random:clip@<width>`.
        keep_ratio: -1 for the paper's IQR count, or the fraction of patches kept, in (0, 1] (the code's TRIM:k).
        max_tokens: IQR only: the static slot count for the selected patches (0: a quarter of the patches).
        sign: "code" (softmax of minus the similarity, the official code) or "paper" (plus).
    """

    text_encoder: str = ""
    keep_ratio: float = IQR
    max_tokens: int = 0
    sign: str = "code"

    method: ClassVar[str] = "TRIM"
    sites: ClassVar[frozenset[Site]] = frozenset({Site.VISION_OUT})

    def _slots(self, patches: int) -> int:
        return self.max_tokens or math.ceil(patches / 4)

    def plan(self, geom: Geometry, key: str, entering: Entering) -> Schedule:
        if not self.text_encoder:
            raise RecipeError(f"{key}.text_encoder", "TRIM needs CLIP's text tower: set it to the CLIP checkpoint "
                                                     "the vision tower came from (or tiny-random:clip@<width>)")
        check(self.text_encoder, f"{key}.text_encoder", geom.vision_hidden_size)
        if self.sign not in SIGNS:
            raise RecipeError(f"{key}.sign", f"'{self.sign}' is not one of {', '.join(SIGNS)}")
        if entering.vision_tokens != entering.image_tokens + PROTECTED:
            raise RecipeError(f"{key}.method", "TRIM needs the CLS token before the patches and a feature selection "
                                               "that drops it (vision_feature_select_strategy: default)")
        t = entering.vision_tokens
        patches = t - PROTECTED
        if self.keep_ratio == IQR:
            n = self._slots(patches)
            if not 1 <= n <= patches - 2:
                raise RecipeError(f"{key}.max_tokens", f"{n} is outside [1, {patches - 2}] for {patches} patches")
        else:
            if self.max_tokens:
                raise RecipeError(f"{key}.max_tokens", "only the IQR count (keep_ratio: -1) pads to max_tokens; "
                                                       "remove it for a fixed keep_ratio")
            if not 0.0 < self.keep_ratio <= 1.0:
                raise RecipeError(f"{key}.keep_ratio", f"{self.keep_ratio} is neither -1 (IQR) nor in (0, 1]")
            n = fixed_count(patches, self.keep_ratio)
            if n < 1:
                raise RecipeError(f"{key}.keep_ratio", f"keeps 0 of {patches} patches; raise it")
            if n > patches - 1:
                raise RecipeError(f"{key}.keep_ratio", f"keeps {n} of {patches} patches, which with the aggregated "
                                                       "token is no reduction; lower it")
        return (Step("trim", Site.VISION_OUT, 0, t, PROTECTED + n + 1, Output.ASSIGN, question=True, scored=1),)

    def question(self, key: str) -> QuestionSpec:
        return question_spec(self.text_encoder, f"{key}.text_encoder", segments=1, truncate=True)

    def load_module(self) -> QuestionHead:
        return QuestionHead.load(self.text_encoder)

    def scoring_flops(self, step: Step, geom: Geometry, n_tokens: int) -> int:
        """CLIP's visual projection of every patch and one dot product with the question (the text tower is
        counted nowhere: it runs on the question, not on image tokens)."""
        patches = n_tokens - PROTECTED
        return 2 * patches * geom.vision_hidden_size * geom.vision_hidden_size

    def scores(self, state: ImageTokens, ctx: VisionContext) -> Tensor:
        """(B, P) fp32 softmax over the patches of ±(CLIP patch embedding · question embedding)."""
        head = ctx.module
        z = head.patch_embeds(state.hidden[:, PROTECTED:])  # (B, P, C)
        tau = head.text_embeds(ctx.question)[:, 0]  # (B, C): one truncated window
        sim = (z @ tau[:, :, None])[..., 0]  # (B, P)
        return (-sim if self.sign == "code" else sim).softmax(-1)

    def assignment(self, scores: Tensor, step: Step) -> Tensor:
        """(B, P) scores -> (B, 1 + P) output slot of every tower token: CLS 0, the selected patches 1..n in
        their order, every other patch the last slot (the aggregated token)."""
        B, P = scores.shape
        slots = step.n_out - PROTECTED - 1
        rank = rank_desc(scores)  # (B, P)
        if self.keep_ratio == IQR:
            table = torch.tensor(outlier_count_table(P), device=scores.device)  # (P + 1,)
            wanted = table[iqr_counts(scores)]  # (B,)
            if not (torch.compiler.is_compiling() or torch.compiler.is_exporting()) and bool((wanted > slots).any()):
                warnings.warn(f"TRIM: the IQR rule selects up to {int(wanted.max())} patches, more than max_tokens "
                              f"{slots}; the lowest-scoring excess joins the aggregated token", stacklevel=2)
            n = wanted.clamp(max=slots)[:, None]  # (B, 1)
        else:
            n = slots
        selected = rank < n  # (B, P)
        slot = torch.where(selected, selected.long().cumsum(-1), step.n_out - 1)  # (B, P): 1..n, else the last
        cls = torch.zeros(B, PROTECTED, dtype=torch.long, device=scores.device)
        return torch.cat([cls, slot], dim=1)  # (B, 1 + P)

    def apply(
        self, state: ImageTokens, ctx: VisionContext, step: Step, forced: Tensor | None = None
    ) -> tuple[ImageTokens, Tensor]:
        t = state.hidden.shape[1]
        if t != step.n_in or state.n_protected != PROTECTED:
            raise ValueError(f"TRIM takes {step.n_in} tower tokens with CLS first, got {t}")
        if forced is None:
            assign = self.assignment(ctx.decision(self.scores(state, ctx)), step)  # (B, t)
        else:
            assign = forced  # eager references replay a selection made earlier
        return build(state, assign, step.n_out), assign


def build(state: ImageTokens, assign: Tensor, slots: int) -> ImageTokens:
    """The tokens an assignment describes: slot s < slots - 1 takes its one token (unused: source -1), the last
    slot the mean of its members in fp32 (zero when it has none), as the code's aggregated token."""
    x = state.hidden  # (B, t, Dv)
    onehot = assign[:, :, None] == torch.arange(slots, device=x.device)  # (B, t, S)
    used = onehot.any(1)  # (B, S)
    src = onehot.int().argmax(1)  # (B, S): the token in each single slot (0 where unused)
    rest = onehot[:, :, -1]  # (B, t): the aggregated token's members
    count = rest.sum(1, keepdim=True)  # (B, 1)
    mean = (x.float() * rest[..., None]).sum(1) / count.clamp(min=1)  # (B, Dv), the code's remaining_mean
    hidden = gather_tokens(x, src)  # (B, S, Dv)
    hidden = torch.cat([hidden[:, :-1], mean.to(x.dtype)[:, None]], dim=1)  # (B, S, Dv)
    source = gather_tokens(state.source, src)  # (B, S)
    # the aggregated token stands for its first member (the last patch when it has none: a valid patch)
    last_src = torch.where(count[:, 0] > 0, source[:, -1], state.source[:, -1])  # (B,)
    source = torch.cat([torch.where(used[:, :-1], source[:, :-1], -1), last_src[:, None]], dim=1)  # (B, S)
    return ImageTokens(hidden, source, None, state.n_protected)
