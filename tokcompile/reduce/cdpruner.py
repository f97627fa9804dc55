"""CDPruner: "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs"
(Zhang et al., NeurIPS 2025, arXiv:2506.10967).

CDPruner keeps the subset of image tokens that is both relevant to the instruction and diverse: it builds a
conditional DPP kernel L = diag(r) · S · diag(r), where S is the cosine similarity of the projected image
features and r each token's relevance to the question in CLIP's joint space, and selects k tokens by the
greedy MAP inference of Chen et al. (2018), which adds at every step the token with the largest remaining
marginal gain (its Cholesky residual). The kept tokens reach the decoder in their original order.

Static-export form of the official code's default setting (Theia-4869/CDPruner, `llava_arch.py`
`encode_images`, `clip_encoder.py`), after the projector on LLaVA-1.5:
- Relevance: CLIP's vision head (post-LayerNorm, visual projection, fp32) on the features the projector
  received, L2-normalised, against the L2-normalised CLIP text embedding of the question; the code's sign
  (minus the cosine), averaged over the question's 77-token windows (the code splits a long question into
  windows padded with zeros; `text_segments` fixes how many the export takes), then min-max normalised with
  the code's +1e-6. The code's min and max run over the whole batch; here over each sample's tokens (the code
  runs batch 1, where the two agree), so every sample keeps its own tokens.
- The greedy DPP runs its k iterations unrolled (k is static), in fp32, `argmax` taking the lowest index on
  ties as `torch.argmax` does. Nothing else is data-dependent. Each iteration's remaining gains go through
  `ctx.decision` (`Step.scored` = k), so a graph whose pick differs from eager's at a near-tie is checked by
  replaying its gains. The gains shrink as tokens are picked while their rounding stays that of the kernel, so
  the vector holds every picked token's initial gain (never ranked again) and the near-tie margin, taken of
  the row's largest entry, keeps the kernel's scale.
- The question is the prompt with its image placeholder replaced by a space (the evaluation script also strips
  its answer-format suffix; a prompt here is what the user gives).
- LLaVA-NeXT (the code prunes each crop to k) and the other families are refused: their adapters do not hand
  the projector's input features to this site.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from tokcompile.errors import RecipeError
from tokcompile.reduce.base import REDUCERS, Entering
from tokcompile.reduce.clip_text import QuestionHead, check, question_spec
from tokcompile.reduce.prune import keep_tokens
from tokcompile.reduce.schedule import Output, Schedule, Site, Step

if TYPE_CHECKING:
    from torch import Tensor

    from tokcompile.models.geometry import Geometry
    from tokcompile.question import QuestionSpec
    from tokcompile.reduce.context import ImageContext
    from tokcompile.reduce.state import ImageTokens


def relevance(head: QuestionHead, features: Tensor, ctx: ImageContext) -> Tensor:
    """(B, N, Dv) projector inputs -> (B, N) the code's normalised relevance to the question."""
    z = head.patch_embeds(features)  # (B, N, C) fp32
    z = z / z.norm(dim=-1, keepdim=True)
    tau = head.text_embeds(ctx.question)  # (B, S, C)
    tau = tau / tau.norm(dim=-1, keepdim=True)
    rel = z @ tau.transpose(1, 2)  # (B, N, S)
    valid = ctx.question.segment_valid().float()  # (B, S)
    rel = (-rel * valid[:, None, :]).sum(-1) / valid.sum(-1, keepdim=True)  # (B, N): mean over the windows
    lo, hi = rel.amin(-1, keepdim=True), rel.amax(-1, keepdim=True)  # (B, 1)
    return (rel - lo + 1e-6) / (hi - lo)


def dpp_kernel(projected: Tensor, rel: Tensor) -> Tensor:
    """(B, N, D) projected features, (B, N) relevance -> L = r_i · cos(x_i, x_j) · r_j (B, N, N), fp32."""
    x = projected / projected.norm(dim=-1, keepdim=True)
    x = x.float()
    similarity = x @ x.transpose(1, 2)  # (B, N, N)
    return rel[:, :, None] * similarity * rel[:, None, :]


def greedy_map(kernel: Tensor, k: int, decide: Callable[[Tensor], Tensor] = lambda s: s) -> Tensor:
    """Greedy MAP inference of the DPP with kernel (B, N, N): k indices per sample, ascending (B, k).

    `decide` (`ctx.decision`) sees each iteration's (B, N) remaining gains, the picked tokens holding their
    initial gain; the picks rank on what it returns, the picked tokens masked out."""
    B, N = kernel.shape[:2]
    rows = torch.arange(B, device=kernel.device)
    initial = torch.diagonal(kernel, dim1=1, dim2=2).clone()  # (B, N): every token's gain before any pick
    d2 = initial  # (B, N): every token's remaining gain
    taken = torch.zeros(B, N, dtype=torch.bool, device=kernel.device)  # (B, N)
    cis = kernel.new_zeros(0, B, N)  # (i, B, N): the Cholesky rows so far
    picked = []
    for _ in range(k):
        gains = decide(torch.where(taken, initial, d2)).masked_fill(taken, float("-inf"))  # (B, N) fp32
        j = torch.argmax(gains, dim=-1)  # (B,): lowest index on ties
        picked.append(j)
        taken = taken.scatter(1, j[:, None], True)
        c_j = cis[:, rows, j]  # (i, B)
        e = (kernel[rows, j] - torch.einsum("tb,tbn->bn", c_j, cis)) / torch.sqrt(d2[rows, j])[:, None]  # (B, N)
        cis = torch.cat([cis, e[None]], dim=0)  # (i + 1, B, N)
        d2 = d2 - e.square()  # (B, N); a picked token's is ~0 and never read again
    return torch.stack(picked, dim=1).sort(dim=-1).values  # (B, k)


@REDUCERS.register("cdpruner")
@dataclass(frozen=True)
class CDPrunerConfig:
    """CDPruner parameters (the official script's names).

    Args:
        visual_token_num: image tokens kept (64, 128 or 192 of LLaVA-1.5's 576 in the paper).
        text_encoder: the CLIP checkpoint the vision tower came from (a local directory with safetensors), or
            `tiny-random:clip@<width>`.
        text_segments: 77-token windows the question may fill (a longer question is refused at run time).
    """

    visual_token_num: int = 128
    text_encoder: str = ""
    text_segments: int = 1

    method: ClassVar[str] = "CDPruner"
    sites: ClassVar[frozenset[Site]] = frozenset({Site.PROJECTOR_OUT})
    family_needs: ClassVar[tuple[str, ...]] = ("features_at_projector",)

    def plan(self, geom: Geometry, key: str, entering: Entering) -> Schedule:
        if not entering.features_at_projector:
            raise RecipeError(f"{key}.method", "CDPruner scores the projector's input features, which only the "
                                               "first projector-output step receives; put it before the others")
        if not self.text_encoder:
            raise RecipeError(f"{key}.text_encoder", "CDPruner needs CLIP's text tower: set it to the CLIP "
                                                     "checkpoint the vision tower came from")
        check(self.text_encoder, f"{key}.text_encoder", geom.vision_hidden_size)
        if self.text_segments < 1:
            raise RecipeError(f"{key}.text_segments", f"{self.text_segments} must be at least 1")
        n = entering.image_tokens
        k = self.visual_token_num
        if not 1 <= k < n:
            raise RecipeError(f"{key}.visual_token_num", f"{k} is outside [1, {n - 1}] for {n} image tokens")
        return (Step("cdpruner", Site.PROJECTOR_OUT, 0, n, k, Output.KEPT, question=True, scored=k),)

    def question(self, key: str) -> QuestionSpec:
        return question_spec(self.text_encoder, f"{key}.text_encoder", segments=self.text_segments, truncate=False)

    def load_module(self) -> QuestionHead:
        return QuestionHead.load(self.text_encoder)

    def scoring_flops(self, step: Step, geom: Geometry, n_tokens: int) -> int:
        """The N×N similarity, CLIP's visual projection of every token (width taken as Dv), and the greedy
        DPP's k rank-one updates of an N-vector over up to k rows."""
        n, k, d = n_tokens, step.n_out, geom.hidden_size
        return 2 * n * n * d + 2 * n * geom.vision_hidden_size ** 2 + k * k * n

    def apply(
        self, state: ImageTokens, ctx: ImageContext, step: Step, forced: Tensor | None = None
    ) -> tuple[ImageTokens, Tensor]:
        if state.hidden.shape[1] != step.n_in:
            raise ValueError(f"CDPruner takes {step.n_in} image tokens, got {state.hidden.shape[1]}")
        if forced is None:
            if ctx.features is None:
                raise ValueError("CDPruner needs the projector's input features (ImageContext.features)")
            rel = relevance(ctx.module, ctx.features, ctx)  # (B, N)
            kept = greedy_map(dpp_kernel(state.hidden, rel), step.n_out, ctx.decision)  # (B, k)
        else:
            kept = forced
        return keep_tokens(state, kept), kept
