"""VisPruner: "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in VLMs"
(Zhang et al., ICCV 2025; official code Theia-4869/VisPruner).

Two kinds of visual cue, both from the vision tower, pick the tokens before the projector. Important tokens
are the patches the [CLS] query attends to most at the selected layer (mean over heads). The rest of the budget
goes to diverse tokens: among the remaining patches, in the order of their attention, duplicates are removed
in rounds. Each round splits the candidates alternately into two halves, scores every token of the first half
by its highest cosine similarity to the second half, and drops the 8 most similar, until the budget is left.
`prune_ratio` fixes the kept count `T = round(P · (1 - prune_ratio))` and `important_ratio` its important part
`int(T · important_ratio)`; the kept patches keep their original order and contiguous positions (P0).

Static-export deviations from LightCompress (`token_reduction/vispruner.py`, LLaVA path):
- The rounds are unrolled: their number and each round's drop count come from the plan (they depend only on P
  and the two ratios). Orders are built from pairwise ranks by (score descending, index ascending) and inverted
  with a scatter, where LightCompress uses `argsort`, whose order among equal scores is unspecified.
- Scores and similarities are fp32 (LightCompress casts the attention to the model dtype first).
- Budgets whose pairing LightCompress cannot run (an odd number of candidates, or a round dropping more than
  half of them, where its indexing fails) are refused at `--plan` with the nearest budgets that work.
- The pairing follows the full attention order of the candidates and each round's similarity order, so the
  selection depends on every near-tie among them: two backends can keep different sets. Every score vector
  ranked goes through `ctx.decision` (the attention, then each round's similarities: `Step.scored`), so
  parity can replay a graph's ranking in eager and record such a near-tie instead of failing.
- As with FasterVLM, the [CLS] row is recomputed from the selected block's queries and keys, CLS is kept as
  tower token 0 for LLaVA's feature selection to drop, and every sample of a batch picks its own tokens.

On the Qwen families (LightCompress's Qwen2.5-VL path, Qwen2-VL by the same steps without windows) it runs at
the projector output: the important tokens are those receiving the most attention in the tower's last block
(head mean, summed over queries, averaged over each 2x2 group: `ImageContext.received_attention`), the rounds
de-duplicate the projected features, one important token is added when the candidates would be odd (as
LightCompress does), and the kept tokens keep their original order and M-RoPE ids.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from tokcompile.errors import RecipeError
from tokcompile.reduce.base import REDUCERS, Entering
from tokcompile.reduce.fastervlm import PROTECTED, cls_scores
from tokcompile.reduce.ops import gather_tokens, rank_desc
from tokcompile.reduce.prune import keep_tokens, protected_first
from tokcompile.reduce.schedule import Output, Schedule, Site, Step

if TYPE_CHECKING:
    from torch import Tensor

    from tokcompile.models.geometry import Geometry
    from tokcompile.reduce.context import ImageContext, VisionContext
    from tokcompile.reduce.state import ImageTokens

DROP_PER_ROUND = 8  # LightCompress's `min(8, R - diverse_token_num)`


def budget(patches: int, prune_ratio: float, important_ratio: float) -> tuple[int, int]:
    """(kept T, important T_imp) as LightCompress computes them: `round(P·(1 - prune_ratio))`, `int(T·r)`."""
    kept = int(round(patches * (1 - prune_ratio)))
    return kept, int(kept * important_ratio)


def drop_rounds(residual: int, diverse: int) -> tuple[int, ...] | None:
    """The number dropped in each de-duplication round, starting from `residual` candidates; None when
    LightCompress's pairing cannot run it (an odd candidate count, or more dropped than half the candidates)."""
    rounds = []
    while diverse > 0:
        r = min(DROP_PER_ROUND, residual - diverse)
        if r <= 0:
            break
        if residual % 2 or r > residual // 2:
            return None
        rounds.append(r)
        residual -= r
    return tuple(rounds)


def _split(patches: int, prune_ratio: float, important_ratio: float,
           even_candidates: bool) -> tuple[int, int, tuple[int, ...] | None]:
    """(kept, important, drop per round or None when the pairing cannot run them). With `even_candidates`
    (LightCompress's Qwen path) one important token is added when the candidates would be odd; where that makes
    the important tokens outnumber the budget, LightCompress keeps them all."""
    kept, important = budget(patches, prune_ratio, important_ratio)
    if even_candidates and (patches - important) % 2:
        important += 1
        kept = max(kept, important)
    return kept, important, drop_rounds(patches - important, kept - important)


def order_desc(scores: Tensor) -> Tensor:
    """(B, N) scores -> (B, N) indices sorted by (score descending, index ascending)."""
    rank = rank_desc(scores)  # (B, N) distinct ranks
    idx = torch.arange(scores.shape[-1], device=scores.device)[None].expand_as(rank)  # (B, N)
    return torch.zeros_like(rank).scatter(1, rank, idx)  # order[b, rank[b, i]] = i


def vispruner_select(scores: Tensor, features: Tensor, important: int, diverse: int,
                     rounds: tuple[int, ...], decide: Callable[[Tensor], Tensor] = lambda s: s) -> Tensor:
    """Important then diverse patches: (B, P) [CLS] scores and (B, P, C) features -> (B, T) kept, ascending.
    `decide` (`ctx.decision`) sees every score vector ranked: the attention, then each round's similarities."""
    order = order_desc(decide(scores))  # (B, P) patches by attention
    keep_important = order[:, :important]  # (B, T_imp)
    if diverse == 0:
        return keep_important.sort(dim=-1).values
    residual = order[:, important:]  # (B, R) candidates, in attention order
    x = features.float()
    xn = x / x.norm(dim=-1, keepdim=True)  # (B, P, C) unit rows
    for r in rounds:  # static trip count
        cand = gather_tokens(xn, residual)  # (B, R, C)
        a, b = cand[:, ::2], cand[:, 1::2]  # (B, R/2, C) each
        similarity = decide((a @ b.transpose(1, 2)).amax(dim=-1))  # (B, R/2): closest partner in the other half
        distinct = order_desc(similarity)[:, r:]  # (B, R/2 - r) the r most similar of `a` dropped
        residual = torch.cat([residual[:, ::2].gather(1, distinct), residual[:, 1::2]], dim=1)  # (B, R - r)
    kept = torch.cat([keep_important, residual], dim=1)  # (B, T_imp + T_div)
    return kept.sort(dim=-1).values  # (B, T) distinct patch indices, ascending


@REDUCERS.register("vispruner")
@dataclass(frozen=True)
class VisPrunerConfig:
    """VisPruner parameters under LightCompress's names.

    Args:
        prune_ratio: the fraction of image patches pruned, in [0, 1) (LightCompress: 0.6667, 0.7778, 0.8889 keep
            192, 128 and 64 of LLaVA-1.5's 576).
        important_ratio: the fraction of the kept tokens chosen by [CLS] attention, in [0, 1]; the rest are the
            diverse tokens.
    """

    prune_ratio: float = 0.7778
    important_ratio: float = 0.5

    method: ClassVar[str] = "VisPruner"
    sites: ClassVar[frozenset[Site]] = frozenset({Site.VISION_OUT, Site.PROJECTOR_OUT})

    def sites_used(self) -> frozenset[Site]:
        """The site follows the family (`plan`): the tower's output where it is offered, else the projector's."""
        return frozenset()

    def _counts(self, patches: int, key: str, even_candidates: bool = False) -> tuple[int, int, tuple[int, ...]]:
        """(kept, important, drop per round), or a RecipeError naming the key to change. `even_candidates`:
        LightCompress's Qwen path, which adds one important token when the candidates would be odd."""
        p, r = self.prune_ratio, self.important_ratio
        if not 0.0 <= p < 1.0:
            raise RecipeError(f"{key}.prune_ratio", f"{p} is outside [0, 1); use the fraction of image patches pruned")
        if not 0.0 <= r <= 1.0:
            raise RecipeError(f"{key}.important_ratio", f"{r} is outside [0, 1]; use the fraction of the kept tokens "
                                                        "chosen by [CLS] attention")
        kept, important, rounds = _split(patches, p, r, even_candidates)
        if kept < 1:
            raise RecipeError(f"{key}.prune_ratio", f"prune_ratio {p} keeps 0 of {patches} image patches; lower it "
                                                    f"below {1 - 0.5 / patches:.4f}")
        if rounds is None:
            tries = {min(1.0, round((v + 0.5) / kept, 4)) for v in range(max(0, important - 3), important + 4)}
            near = sorted(t for t in tries if t != r and _split(patches, p, t, even_candidates)[2] is not None)
            near = sorted(near, key=lambda t: abs(t - r))[:2]
            hint = f" (e.g. {' or '.join(f'{t:.4g}' for t in sorted(near))})" if near else ""
            raise RecipeError(f"{key}.important_ratio", f"{kept} kept with {important} important leaves "
                              f"{patches - important} candidates, which LightCompress's pairwise de-duplication "
                              f"cannot split; choose an important_ratio giving another important count{hint}")
        return kept, important, rounds

    def plan(self, geom: Geometry, key: str, entering: Entering) -> Schedule:
        if Site.VISION_OUT not in entering.family_sites:  # the Qwen families: LightCompress's Qwen2.5-VL path
            if not entering.tower_at_projector:
                if entering.after is None:  # the family offers neither the tower's output nor its attention
                    raise entering.refusal("VisPruner", key, Site.VISION_OUT, geom)
                raise RecipeError(f"{key}.method", "VisPruner scores with the vision tower's attention, which an "
                                                   "earlier step has already changed on this family; remove one "
                                                   "of the two")
            n = entering.image_tokens
            kept, rounds = self._counts(n, key, even_candidates=True)[::2]
            return (Step("vispruner", Site.PROJECTOR_OUT, 0, n, kept, Output.KEPT, scored=1 + len(rounds)),)
        if entering.after == (Site.VISION_BLOCK, geom.vision_layers - 1):
            raise RecipeError(
                f"{key}.method",
                f"VisPruner scores with the [CLS] attention of vision block {geom.vision_layers - 1}, which a "
                "reduction inside that same block has already changed; stop the earlier reduction one block sooner",
            )
        t = entering.vision_tokens
        kept, _, rounds = self._counts(t - PROTECTED, key)
        return (Step("vispruner", Site.VISION_OUT, 0, t, kept + PROTECTED, Output.KEPT, scored=1 + len(rounds)),)

    def scoring_flops(self, step: Step, geom: Geometry, n_tokens: int) -> int:
        """The [CLS] row against every key (2·t·Dv) and each round's half-against-half similarities
        (2·(R/2)²·Dv); normalisation and ranking are left out. On the Qwen families: every tower query against
        every key of the last block (2·S²·Dv) and the rounds on the projected features (2·(R/2)²·D)."""
        if step.site is Site.PROJECTOR_OUT:
            patches, width = step.n_in, geom.hidden_size
            total = 2 * geom.vision_tokens ** 2 * geom.vision_hidden_size
        else:
            patches, width = step.n_in - PROTECTED, geom.vision_hidden_size
            total = 2 * n_tokens * geom.vision_hidden_size
        kept, important, rounds = self._counts(patches, "sparse", even_candidates=step.site is Site.PROJECTOR_OUT)
        residual = patches - important
        for r in rounds:
            total += 2 * (residual // 2) ** 2 * width
            residual -= r
        return total

    def apply(
        self, state: ImageTokens, ctx: VisionContext | ImageContext, step: Step, forced: Tensor | None = None
    ) -> tuple[ImageTokens, Tensor]:
        if step.site is Site.PROJECTOR_OUT:  # scores: attention received per image token; diversity: its features
            kept = forced  # eager references replay a selection made earlier
            if kept is None:
                kept_n, important, rounds = self._counts(step.n_in, "sparse", even_candidates=True)
                kept = vispruner_select(ctx.received_attention(step.n_in), state.hidden, important,
                                        kept_n - important, rounds, ctx.decision)  # (B, T) ascending
            return keep_tokens(state, kept), kept
        t = state.hidden.shape[1]
        p = state.n_protected
        if ctx.keys.shape[2] != t:  # Python ints: the block's keys must be the tokens scored here
            raise ValueError(f"VisPruner scores {t} tokens with a block that attended over {ctx.keys.shape[2]}")
        if forced is None:
            kept_n, important, rounds = self._counts(t - p, "sparse")
            patches = vispruner_select(cls_scores(ctx, p), state.hidden[:, p:], important, kept_n - important,
                                       rounds, ctx.decision) + p  # (B, T)
            kept = protected_first(patches, p)  # (B, T + p) tower tokens, CLS first, ascending
        else:
            kept = forced  # eager references replay a selection made earlier
        return keep_tokens(state, kept), kept
