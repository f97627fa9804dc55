"""VisionZip: "VisionZip: Longer is Better but Not Necessary in Vision Language Models" (Yang et al., CVPR 2025,
arXiv:2412.04467).

At the vision tower's selected layer, the `dominant` patches that the CLS token attends to most (its attention
row summed over heads) are kept with CLS, in their original order. The remaining tokens are compressed into
`contextual` tokens: targets are taken uniformly among them (every `max(1, R // contextual)`-th, the first
`contextual`), every other remaining token joins the target whose head-averaged, L2-normalised key it matches
best, and each contextual token is its target PLUS the mean of the tokens that joined it. The decoder sees
`dominant + contextual` image tokens (CLS is dropped by LLaVA's feature selection), with contiguous positions.

Static-export deviations from the paper and LightCompress (`token_reduction/visionzip.py`):
- The layer is the one LLaVA's `vision_feature_layer` selects (the last block that runs); LightCompress hard-codes
  block -2 (`attentions[-2]`, `hidden_states[-2]`, block -2's `k_proj`), the same layer for LLaVA-1.5.
- Dominant ranks by (score descending, index ascending) through `rank_desc` (LightCompress's `topk` leaves ties
  unspecified); a token's best target is the lowest-index one among equal dot products (as `torch.argmax`).
- Boolean-mask selects become a static slot per token (cumsum over the kept mask, target positions from
  Python-int arithmetic) and one constant-k top-k over the slots; the merge is a one-hot matmul over every
  token (zero rows for those that do not merge). Scores and the key metric are fp32; the merge uses the
  model dtype.
- `prune_only` reports `kept (B, 1+D)` and skips the discarded merge (`contextual: 0` is accepted there;
  LightCompress divides by it). Every sample of a batch keeps its own tokens. Sizes, when a previous step
  carries them, are summed into each contextual token (LightCompress has none).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar

import torch

from tokcompile.errors import RecipeError
from tokcompile.reduce.base import REDUCERS, Entering, is_int, is_number
from tokcompile.reduce.ops import first_argmax, gather_tokens, rank_desc
from tokcompile.reduce.prune import keep_tokens
from tokcompile.reduce.schedule import Output, Schedule, Site, Step
from tokcompile.reduce.visionzip_tower import counts, zip_merged

if TYPE_CHECKING:
    from torch import Tensor

    from tokcompile.models.geometry import Geometry
    from tokcompile.reduce.context import ImageContext, VisionContext
    from tokcompile.reduce.state import ImageTokens


@REDUCERS.register("visionzip")
@dataclass(frozen=True)
class VisionZipConfig:
    """VisionZip parameters under LightCompress's names (all required there except the two flags).

    Args:
        dominant: patches kept by CLS attention (LLaVA-1.5: 54, 108, 162); on the Qwen families, the fraction of
            the image tokens kept by the attention they receive (`visionzip_tower.py`), or a count.
        contextual: merged tokens made from the rest (LLaVA-1.5: 10, 20, 30); on the Qwen families, a fraction
            or a count.
        prune_only: keep only CLS and the dominant patches.
        merge_only: no dominant patches: CLS plus `contextual` tokens merged from every patch.
    """

    dominant: int | float
    contextual: int | float
    prune_only: bool = False
    merge_only: bool = False

    method: ClassVar[str] = "VisionZip"
    sites: ClassVar[frozenset[Site]] = frozenset({Site.VISION_OUT, Site.PROJECTOR_OUT})

    def sites_used(self) -> frozenset[Site]:
        """The site follows the family (`plan`): the tower's output where it is offered, else the projector's."""
        return frozenset()

    def n_dominant(self) -> int:
        return 0 if self.merge_only else self.dominant

    def plan(self, geom: Geometry, key: str, entering: Entering) -> Schedule:
        if Site.VISION_OUT not in entering.family_sites:
            return self._plan_tower(geom, key, entering)
        for name in ("dominant", "contextual"):
            if not is_int(getattr(self, name)):
                raise RecipeError(f"{key}.{name}", f"expected an integer count of patches on {geom.family}, got "
                                                   f"{getattr(self, name)!r}")
        t = entering.vision_tokens
        P = t - 1  # patches: CLS is protected
        for name in ("prune_only", "merge_only"):
            if not isinstance(getattr(self, name), bool):
                raise RecipeError(f"{key}.{name}", f"expected true or false, got {getattr(self, name)!r}")
        if self.prune_only and self.merge_only:
            raise RecipeError(f"{key}.merge_only", "prune_only and merge_only cannot both be true; set one to false")
        if not 0 <= self.dominant <= P:
            raise RecipeError(f"{key}.dominant", f"{self.dominant} is outside 0..{P} (the patches entering)")
        if self.prune_only:
            if self.dominant < 1:
                raise RecipeError(f"{key}.dominant", "prune_only with dominant 0 keeps no image token; use >= 1")
            if self.contextual < 0:
                raise RecipeError(f"{key}.contextual", f"{self.contextual} is negative")
            return (Step("visionzip", Site.VISION_OUT, 0, t, 1 + self.dominant, Output.KEPT, scored=1),)
        D = self.n_dominant()
        if not 1 <= self.contextual <= P - D:
            what = "the patches entering" if self.merge_only else f"the {P} patches minus dominant {D}"
            raise RecipeError(f"{key}.contextual", f"{self.contextual} is outside 1..{P - D} ({what}); "
                                                   "dominant + contextual must fit the patches")
        return (Step("visionzip", Site.VISION_OUT, 0, t, 1 + D + self.contextual, Output.ASSIGN, scored=2),)

    def _plan_tower(self, geom: Geometry, key: str, entering: Entering) -> Schedule:
        """The Qwen families: at the projector output, scored by the tower's last block."""
        if not entering.tower_at_projector:
            if entering.after is None:  # the family offers neither the tower's output nor its attention
                raise entering.refusal("VisionZip", key, Site.VISION_OUT, geom)
            raise RecipeError(f"{key}.method", "VisionZip scores with the vision tower's attention, which an earlier "
                                               "step has already changed on this family; remove one of the two")
        for name in ("prune_only", "merge_only"):
            if getattr(self, name) is not False:
                raise RecipeError(f"{key}.{name}", f"LightCompress's Qwen path always keeps dominant and contextual "
                                                   f"tokens; remove {name}")
        n = entering.image_tokens
        for name in ("dominant", "contextual"):
            v = getattr(self, name)
            if not is_number(v) or v < 0 or (not is_int(v) and v >= 1):
                raise RecipeError(f"{key}.{name}", f"{v!r}: on {geom.family} it is a fraction of the {n} image tokens "
                                                   "(as LightCompress reads it there) or a count; use a value in "
                                                   "[0, 1), e.g. 0.1875, or an integer")
        D, C = counts(n, self.dominant, self.contextual)
        if D + C > n:
            raise RecipeError(f"{key}.contextual", f"{D} dominant and {C} contextual tokens exceed the {n} image "
                                                   "tokens; lower one of them")
        return (Step("visionzip", Site.PROJECTOR_OUT, 0, n, D + C, Output.ASSIGN, scored=2),)

    def scoring_flops(self, step: Step, geom: Geometry, n_tokens: int) -> int:
        """The CLS row against every key (2·t·Dv) and, when merging, every token's head-mean key against the
        targets (2·t·C·dv). On the Qwen families: every tower query against every key of the last block
        (2·S²·Dv) and the N image tokens' metric against the C targets (2·N·C·dv)."""
        dv = geom.vision_hidden_size // geom.vision_heads
        if step.site is Site.PROJECTOR_OUT:
            S, C = geom.vision_tokens, counts(step.n_in, self.dominant, self.contextual)[1]
            return 2 * S * S * geom.vision_hidden_size + 2 * step.n_in * C * dv
        flops = 2 * n_tokens * geom.vision_hidden_size
        if step.output is Output.ASSIGN:
            flops += 2 * n_tokens * self.contextual * dv
        return flops

    def apply(
        self, state: ImageTokens, ctx: VisionContext | ImageContext, step: Step, forced: Tensor | None = None
    ) -> tuple[ImageTokens, Tensor]:
        if step.site is Site.PROJECTOR_OUT:
            D, C = counts(step.n_in, self.dominant, self.contextual)
            return zip_merged(state, ctx, step, D, C, forced)
        x = state.hidden  # (B, t, Dv), the selected layer's output, CLS at 0
        B, t, _ = x.shape
        dev = x.device
        D = 1 + self.n_dominant()  # kept by attention: CLS + dominant patches
        C = 0 if self.prune_only else self.contextual
        idx = torch.arange(t, device=dev)[None].expand(B, t)  # (B, t)

        if forced is None:
            cls_row = ctx.attention(torch.zeros(1, dtype=torch.long, device=dev)).sum(1)[:, 0]  # (B, t) head sum
            dom = rank_desc(ctx.decision(cls_row[:, 1:])) < D - 1  # (B, t-1) the top patches
            is_dom = torch.cat([torch.ones_like(dom[:, :1]), dom], dim=1)  # (B, t) CLS always kept
        elif self.prune_only:  # eager references replay an earlier selection: kept (B, 1+D)
            is_dom = (idx[:, :, None] == forced[:, None, :]).any(-1)  # (B, t)
        else:  # ... or an earlier assignment: (B, t) output slots
            is_dom = forced < D  # (B, t)
        slot_dom = is_dom.long().cumsum(1) - 1  # (B, t) dominant slots, original order, CLS 0

        if self.prune_only:
            kept = torch.topk(-torch.where(is_dom, slot_dom, t).float(), D, dim=-1).indices  # (B, D) ascending
            return keep_tokens(state, kept), kept

        # Targets: remaining positions 0, step, 2·step, ... (the first C), as LightCompress samples them.
        R = t - D
        stride = max(1, R // C)
        pos = (~is_dom).long().cumsum(1) - 1  # (B, t) position among the remaining tokens
        is_tgt = ~is_dom & (pos % stride == 0) & (pos // stride < C)  # (B, t) exactly C per sample
        slot = torch.where(is_dom, slot_dom, D + pos // stride)  # (B, t) kept and target slots
        order = torch.topk(-torch.where(is_dom | is_tgt, slot, t).float(), D + C, dim=-1).indices  # (B, D+C)
        tgt = order[:, D:]  # (B, C) targets in target order

        if forced is None:
            m = ctx.mean_keys().float()  # (B, t, dv) keys averaged over heads
            m = m / m.norm(dim=-1, keepdim=True)  # (B, t, dv)
            sim = m @ gather_tokens(m, tgt).transpose(1, 2)  # (B, t, C) every token against the targets
            best = first_argmax(ctx.decision(sim))  # (B, t), reported for parity
        else:
            best = (forced - D).clamp(min=0)  # (B, t)
        joins = ~is_dom & ~is_tgt  # (B, t) tokens merged into a target
        assign = torch.where(joins, D + best, slot)  # (B, t) output slot of every token

        onehot = ((best[..., None] == torch.arange(C, device=dev)) & joins[..., None]).to(x.dtype)  # (B, t, C)
        members = onehot.sum(1).clamp(min=1)  # (B, C) members, at least 1 (an empty target stays itself)
        mean = (onehot.transpose(1, 2) @ x) / members[..., None]  # (B, C, Dv) mean of the members
        hidden = torch.cat([gather_tokens(x, order[:, :D]), gather_tokens(x, tgt) + mean], dim=1)  # (B, D+C, Dv)
        sizes = None
        if state.sizes is not None:
            s = state.sizes  # (B, t)
            joined = (onehot.transpose(1, 2) @ s.to(x.dtype)[..., None])[..., 0].to(s.dtype)  # (B, C)
            sizes = torch.cat([gather_tokens(s, order[:, :D]), gather_tokens(s, tgt) + joined], dim=1)  # (B, D+C)
        return replace(state, hidden=hidden, source=gather_tokens(state.source, order), sizes=sizes), assign
