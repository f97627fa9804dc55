"""FasterVLM: "[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM Inference
Faster" (Zhang et al., 2024, arXiv:2412.01818).

The [CLS] token's attention over the patches at the vision tower's selected layer measures how much each patch
matters to the image's global representation, and it is far less biased than the decoder's text-to-image
attention that FastV relies on. FasterVLM averages that row over the heads and keeps the
`round(P · (1 - rate))` highest-scoring patches in their original order before the projector, so the
projector and every decoder layer see the shorter image span (contiguous positions, P0). The scores come from
attention the tower computes anyway: no training and no extra forward pass.

Static-export deviations from the paper and LightCompress (`token_reduction/fastervlm.py`):
- The [CLS] row is recomputed from the selected block's queries and keys in fp32 (one row, the tower keeps
  its fused attention) instead of forcing `output_attentions` on the whole tower; LightCompress casts the row
  to the model dtype (fp16) before averaging, which can create ties fp32 does not have.
- The kept set comes from a constant-k top-k ranked by (score descending, index ascending), then sorted; no
  boolean mask (`features[mask]`) decides a shape, and `torch.topk`'s unspecified tie order is fixed.
- The budget counts the patches entering the step (after any earlier tower reduction), not the config's
  `image_seq_length`; with nothing before it they are the same (576 for LLaVA-1.5: rate 0.778 keeps 128).
- The step runs inside the tower on (CLS + patches): CLS is kept (index 0 of the step's output) for LLaVA's
  feature selection to drop, so the step counts k + 1 tower tokens. Under the "full" strategy CLS reaches the
  decoder too (LightCompress's "full" branch is not a meaningful selection).
- Every sample keeps its own patches (LightCompress's LlavaHf path prunes batch element 0 only) and the
  decoder gets contiguous positions (P0, as in LightCompress's original-LLaVA path and the paper's code;
  its LlavaHf path keeps the kept tokens' original position ids).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from tokcompile.errors import RecipeError
from tokcompile.reduce.base import REDUCERS, Entering
from tokcompile.reduce.ops import topk_sorted
from tokcompile.reduce.prune import keep_tokens, protected_first
from tokcompile.reduce.schedule import Output, Schedule, Site, Step

if TYPE_CHECKING:
    from torch import Tensor

    from tokcompile.models.geometry import Geometry
    from tokcompile.reduce.context import VisionContext
    from tokcompile.reduce.state import ImageTokens

PROTECTED = 1  # CLIP's CLS token: scores the patches, never dropped


def keep_count(patches: int, rate: float) -> int:
    """LightCompress's budget `round(P · (1 - rate))` (Python's round: half to even)."""
    return int(round(patches * (1 - rate)))


def cls_scores(ctx: VisionContext, n_protected: int) -> Tensor:
    """The [CLS] query's attention over the patches at the selected block, averaged over heads: (B, t - p)."""
    rows = torch.zeros(1, dtype=torch.long, device=ctx.queries.device)  # (1,): the CLS query
    attn = ctx.attention(rows)  # (B, Hv, 1, t) fp32 softmax, as the block's attention computed it
    return attn.mean(1)[:, 0, n_protected:]  # (B, t - p)


@REDUCERS.register("fastervlm")
@dataclass(frozen=True)
class FasterVLMConfig:
    """FasterVLM parameters under LightCompress's names.

    Args:
        rate: the fraction of image patches pruned, in [0, 1) (LightCompress: 0.778 keeps 128 of LLaVA-1.5's 576).
    """

    rate: float = 0.778

    method: ClassVar[str] = "FasterVLM"
    sites: ClassVar[frozenset[Site]] = frozenset({Site.VISION_OUT})

    def plan(self, geom: Geometry, key: str, entering: Entering) -> Schedule:
        r = self.rate
        if not 0.0 <= r < 1.0:
            raise RecipeError(f"{key}.rate", f"{r} is outside [0, 1); use the fraction of image patches pruned")
        if entering.after == (Site.VISION_BLOCK, geom.vision_layers - 1):
            raise RecipeError(
                f"{key}.method",
                f"FasterVLM scores with the [CLS] attention of vision block {geom.vision_layers - 1}, which a "
                "reduction inside that same block has already changed; stop the earlier reduction one block sooner",
            )
        t = entering.vision_tokens
        patches = t - PROTECTED
        k = keep_count(patches, r)
        if k < 1:
            raise RecipeError(
                f"{key}.rate", f"rate {r} keeps 0 of {patches} image patches; lower it below {1 - 0.5 / patches:.4f}"
            )
        return (Step("fastervlm", Site.VISION_OUT, 0, t, k + PROTECTED, Output.KEPT, scored=1),)

    def scoring_flops(self, step: Step, geom: Geometry, n_tokens: int) -> int:
        """One [CLS] query row against every key of the selected block, all heads: 2·t·Dv."""
        return 2 * n_tokens * geom.vision_hidden_size

    def apply(
        self, state: ImageTokens, ctx: VisionContext, step: Step, forced: Tensor | None = None
    ) -> tuple[ImageTokens, Tensor]:
        t = state.hidden.shape[1]
        p = state.n_protected
        if ctx.keys.shape[2] != t:  # Python ints: the block's keys must be the tokens scored here
            raise ValueError(f"FasterVLM scores {t} tokens with a block that attended over {ctx.keys.shape[2]}")
        if forced is None:
            scores = ctx.decision(cls_scores(ctx, p))  # (B, P) [CLS] attention, reported for parity
            top = topk_sorted(scores, step.n_out - p) + p  # (B, k) patches, ascending
            kept = protected_first(top, p)  # (B, k + p) tower tokens, CLS first, ascending
        else:
            kept = forced  # eager references replay a selection made earlier
        return keep_tokens(state, kept), kept
