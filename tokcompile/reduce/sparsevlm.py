"""SparseVLM: "Visual Token Sparsification for Efficient Vision-Language Model Inference" (Zhang et al., ICML
2025, arXiv:2410.04417; official code Gumpest/SparseVLMs, here as LightCompress runs it:
`token_reduction/sparsevlm.py`, config `configs/sparsification/methods/SparseVLM/sparsevlm.yml`).

Text raters are chosen once, from the decoder's input embeddings: m = the mean over image rows of the softmax
over the text after the image of (image · textᵀ); raters are the text tokens with m above its mean. After each
decoder layer in `pruning_loc` (default 2, 6, 15), the image tokens are scored by that layer's attention
probabilities (head mean, causal), rows = raters, averaged; the top k stay, k from LightCompress's fixed tables.
With `merge_flag`, the ⌊0.3·pruned⌋ + 1 best-scored pruned tokens are recycled: clustered by DPC-kNN
(`dpc_knn.py`) into ⌊recycled/10⌋ + 1 tokens, inserted after the kept image tokens (in centre order), each at its
centre's position id (P1). Every count follows from the tables, so the schedule is static; the rater set varies
per sample and enters as a mask.

Static-export deviations from LightCompress:
- Scores, raters and distances are fp32; ties rank by (score descending, index ascending). The density noise
  (1e-6 uniform) is off and the recycled tokens are clustered in image order, so DPC-kNN's ties go to the lower
  image index (`dpc_knn.py`). They are common: with one cluster every density ties (a token's one nearest
  neighbour is itself), and LightCompress's noise then picks the centre, and so the merged token's position, at
  random.
- Every sample of a batch has its own raters, scores and clusters (LightCompress indexes sample 0); padding
  never enters a softmax.
- Each stage's scores go through `ctx.decision`, and with `merge_flag` DPC-kNN's density, γ and point-to-centre
  distances too (`Step.scored` 1 or 4), so that a graph whose selection or clusters differ from eager's at a
  near-tie is checked by replaying them.
- `stage_tokens` (not a LightCompress key) replaces the tables with explicit per-stage counts, or fractions of
  the image tokens entering the stage, for geometries the tables were not made for.
- `prune_flag: false` (merging the best-scored tokens and keeping the rest) is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from tokcompile.errors import RecipeError
from tokcompile.reduce.base import REDUCERS, Entering, is_int, is_number
from tokcompile.reduce.dpc_knn import distances, dpc_knn, gamma_rank, merge_clusters
from tokcompile.reduce.ops import first_argmax, gather_tokens, topk_sorted
from tokcompile.reduce.prune import keep_image_tokens
from tokcompile.reduce.schedule import Output, Schedule, Site, Step
from tokcompile.reduce.sparsevlm_scores import image_scores, rater_mask

if TYPE_CHECKING:
    from torch import Tensor

    from tokcompile.models.geometry import Geometry
    from tokcompile.reduce.context import DecoderContext
    from tokcompile.reduce.state import TokenState

# LightCompress's `update_list`: kept image tokens per stage, by retained-token setting. With pruning_loc
# [2, 6, 15] only the three LLaVA-1.5 settings exist; with one other layer, single-stage counts, and fractions
# of the image tokens for LLaVA-NeXT's settings (keyed by round((1 - reduction_ratio) · 2880)).
THREE_STAGES = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}
ONE_STAGE = {
    True: {192: (180,), 128: (114,), 64: (48,), 960: (0.3125,), 640: (0.1979,), 320: (0.0833,), 160: (0.0261,)},
    False: {192: (192,), 128: (128,), 64: (64,), 960: (0.3333,), 640: (0.2222,), 320: (0.1111,), 160: (0.0555,)},
}  # by merge_flag


def stage_counts(n: int, per_stage: tuple[float, ...], merge: bool) -> list[tuple[int, int, int, int]]:
    """(n_in, kept, recycled, clusters) per stage, as LightCompress counts them: kept = min(count, n_in − 1)
    (a count below 1 is a fraction of n_in, rounded), recycled = ⌊0.3·pruned⌋ + 1, clusters = ⌊recycled/10⌋ + 1."""
    out = []
    for count in per_stage:
        want = round(count * n) if count < 1 else int(count)
        kept = max(min(want, n - 1), 0)
        recycled = int((n - kept) * 0.3) + 1 if merge and n > kept else 0
        clusters = int(recycled / 10) + 1 if recycled else 0
        out.append((n, kept, recycled, clusters))
        n = kept + clusters
    return out


@REDUCERS.register("sparsevlm")
@dataclass(frozen=True)
class SparseVLMConfig:
    """SparseVLM parameters under LightCompress's names.

    Args:
        pruning_loc: the decoder layers whose outputs are pruned, ascending ([2, 6, 15]; an integer is one).
        reduction_ratio: LightCompress's setting: retained = round(N·(1 − ratio)) picks the table (0.6667 -> 192
            on LLaVA-1.5).
        retained_tokens: the table's setting (192, 128 or 64) directly, when no reduction_ratio is given.
        merge_flag: recycle pruned tokens into clusters (LightCompress's default, true).
        prune_flag: must be true.
        stage_tokens: per-stage kept counts (integers) or fractions of the entering image tokens, instead of the
            tables (tokcompile's key).
    """

    pruning_loc: Any = (2, 6, 15)
    reduction_ratio: float | None = None
    retained_tokens: int | None = None
    merge_flag: bool = True
    prune_flag: bool = True
    stage_tokens: Any = None

    method: ClassVar[str] = "SparseVLM"
    sites: ClassVar[frozenset[Site]] = frozenset({Site.DECODER_LAYER})

    def locs(self, key: str, geom: Geometry) -> tuple[int, ...]:
        loc = self.pruning_loc
        locs = tuple(loc or ()) if isinstance(loc, (list, tuple)) else (loc,)  # a scalar is one layer
        last = geom.n_layers - 2
        if (not locs or any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= last for v in locs)
                or list(locs) != sorted(set(locs))):
            raise RecipeError(f"{key}.pruning_loc", f"{self.pruning_loc!r} must be ascending decoder layers in "
                                                    f"0..{last} (the layer after each one runs on the pruned tokens)")
        return locs

    def per_stage(self, key: str, n: int, locs: tuple[int, ...]) -> tuple[float, ...]:
        """The table row (or `stage_tokens`) for these layers, or the error LightCompress would fail with."""
        if not self.prune_flag:
            raise RecipeError(f"{key}.prune_flag", "false (merge-only SparseVLM) is not supported; use true")
        if self.stage_tokens is not None:
            row = tuple(self.stage_tokens) if isinstance(self.stage_tokens, (list, tuple)) else ()
            if len(row) != len(locs) or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0
                                            or (v >= 1 and v != int(v)) for v in row):
                raise RecipeError(f"{key}.stage_tokens", f"{self.stage_tokens!r} needs one count (an integer) or "
                                                         f"fraction (below 1) per pruning_loc entry ({len(locs)})")
            return row
        if self.reduction_ratio is not None:
            r = self.reduction_ratio
            if not is_number(r) or not 0 <= r < 1:
                raise RecipeError(f"{key}.reduction_ratio", f"{r!r} is not a fraction in [0, 1); LightCompress's "
                                                            "settings are 0.6667, 0.7778 and 0.8889")
            retained, where = round(n * (1 - r)), f"reduction_ratio {r} gives round({n}·(1 − {r}))"
        elif self.retained_tokens is not None:
            if not is_int(self.retained_tokens):
                raise RecipeError(f"{key}.retained_tokens", f"expected an integer (192, 128 or 64), got "
                                                            f"{self.retained_tokens!r}")
            retained, where = self.retained_tokens, "retained_tokens"
        else:
            raise RecipeError(f"{key}.reduction_ratio", "SparseVLM needs reduction_ratio (0.6667, 0.7778 or 0.8889 "
                                                        "on LLaVA-1.5) or retained_tokens (192, 128 or 64)")
        table = THREE_STAGES if locs == (2, 6, 15) else ONE_STAGE[self.merge_flag]
        setting = retained if retained in (192, 128, 64) else round((1 - (self.reduction_ratio or 0)) * 2880)
        row = table.get(setting, ())
        if len(row) < len(locs):
            known = ", ".join(str(s) for s in table)
            raise RecipeError(f"{key}.{'reduction_ratio' if self.reduction_ratio is not None else 'retained_tokens'}",
                              f"{where} = {retained}; LightCompress's tables for pruning_loc {list(locs)} have "
                              f"{len(locs)} stage(s) only for the settings {known}; give stage_tokens instead")
        return row

    def plan(self, geom: Geometry, key: str, entering: Entering) -> Schedule:
        locs = self.locs(key, geom)
        n = entering.image_tokens
        steps = []
        for loc, (n_in, kept, recycled, clusters) in zip(locs, stage_counts(n, self.per_stage(key, n, locs),
                                                                             self.merge_flag)):
            output = Output.ASSIGN if clusters else Output.KEPT
            steps.append(Step("sparsevlm", Site.DECODER_LAYER, loc + 1, n_in, kept + clusters, output,
                              detail=(kept, recycled, clusters), scored=4 if clusters else 1))
        return tuple(steps)

    def scoring_flops(self, step: Step, geom: Geometry, n_tokens: int) -> int:
        """The scored layer's queries again (2·T·D·H·d) and its full attention map (2·T²·H·d); the raters
        (2·N·T·D, counted at every stage); DPC-kNN over the recycled tokens (3·m²·D)."""
        T, D, H, d = n_tokens, geom.hidden_size, geom.n_heads, geom.head_dim
        _, recycled, _ = step.detail
        return 2 * T * D * H * d + 2 * T * T * H * d + 2 * step.n_in * T * D + 3 * recycled * recycled * D

    def apply(
        self, state: TokenState, ctx: DecoderContext, step: Step, forced: Tensor | None = None
    ) -> tuple[TokenState, Tensor]:
        n = step.n_in
        kept_n, recycled, clusters = step.detail
        dev = state.hidden.device
        idx = torch.arange(n, device=dev)[None]  # (1, n)
        if forced is None:
            if ctx.embedded is None or ctx.prev_keys is None:
                raise ValueError("SparseVLM needs the input embeddings and the previous layer's attention")
            score = ctx.decision(image_scores(ctx, rater_mask(ctx.embedded), n))  # (B, n) fp32
            kept = topk_sorted(score, kept_n)  # (B, k) ascending
            if not clusters:
                return keep_image_tokens(state, kept, step), kept
            pruned_score = score.scatter(1, kept, float("-inf"))  # (B, n): kept tokens out of the running
            recycle = topk_sorted(pruned_score, recycled)  # (B, m) the best pruned ones, ascending
        else:  # eager references replay an earlier result
            if not clusters:
                return keep_image_tokens(state, forced, step), forced
            kept = topk_sorted(((forced >= 0) & (forced < kept_n)).float(), kept_n)  # (B, k)
            recycle = topk_sorted((forced >= kept_n).float(), recycled)  # (B, m) the recycled, ascending
        span = state.image_start[:, None] + idx  # (B, n)
        x = gather_tokens(gather_tokens(state.hidden, span), recycle)  # (B, m, D) the layer's output
        if forced is None:
            centre, slot = dpc_knn(x, clusters, ctx.decision)  # (B, c), (B, m)
        else:  # the clusters as recorded; each one's centre is its member of largest γ, as DPC-kNN picked it
            slot = forced.gather(1, recycle) - kept_n  # (B, m)
            gamma = gamma_rank(distances(x), clusters)  # (B, m)
            member = slot[:, None, :] == torch.arange(clusters, device=dev)[None, :, None]  # (B, c, m)
            centre = first_argmax(torch.where(member, -gamma[:, None, :].float(), float("-inf")))  # (B, c)
        merged = merge_clusters(x, slot, clusters)  # (B, c, D)
        # Kept tokens, then one token per cluster at its centre's place (hidden replaced by the merge below).
        out = keep_image_tokens(state, torch.cat([kept, recycle.gather(1, centre)], 1), step)
        out_span = state.image_start[:, None] + kept_n + torch.arange(clusters, device=dev)[None]  # (B, c)
        hidden = out.hidden.scatter(1, out_span[..., None].expand_as(merged), merged.to(out.hidden.dtype))
        assign = torch.full_like(idx.expand(state.hidden.shape[0], n), -1)  # (B, n)
        assign = assign.scatter(1, kept, torch.arange(kept_n, device=dev)[None].expand_as(kept))
        assign = assign.scatter(1, recycle, kept_n + slot)
        return replace(out, hidden=hidden), assign
