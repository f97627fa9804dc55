"""DivPrune: "Diversity-based Visual Token Pruning for Large Multimodal Models" (Alvar et al., CVPR 2025,
arXiv:2503.02175).

Token pruning is cast as a Max-Min Diversity Problem over the projected image tokens: with the cosine
distance `1 - cos` between every pair, the first kept token is the one farthest from its nearest neighbour,
and each next one is the candidate whose distance to the already kept set is largest. The greedy selection
keeps `round((1 - reduction_ratio) · N)` tokens before the decoder, needs no attention scores and no
training, and every decoder layer (and the cache) sees the shorter prompt (pattern C0).

Static-export deviations from the paper and LightCompress (`token_reduction/divprune.py`):
- The greedy loop runs a Python-int number of times (the keep count, fixed in `plan()`); picks are recorded
  in a 0/1 mask and the kept indices come from a constant-k top-k over it, so no shape depends on the data.
- The first pick takes each token's nearest-neighbour distance with the diagonal excluded (LightCompress takes
  the column's second-smallest entry), and already kept tokens are excluded explicitly (LightCompress relies
  on their self-distance being ~0): the two agree except for (near-)duplicate tokens, where LightCompress
  may keep a token twice.
- Ties go to the lowest index, written out (max, then the smallest index reaching it) so every backend agrees.
- Distances are computed in fp32 whatever the model dtype, and every sample of a batch picks its own tokens
  (LightCompress prunes batch element 0's span at a hard-coded offset for the whole batch).
- Every pick's scores go through `ctx.decision` (the nearest-neighbour distances, then each later pick's
  distances to the kept set: `Step.scored` = k), so a graph whose pick differs from eager's at a near-tie is
  checked by replaying its scores.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from tokcompile.errors import RecipeError
from tokcompile.reduce.base import REDUCERS, Entering
from tokcompile.reduce.ops import first_argmax
from tokcompile.reduce.prune import keep_tokens
from tokcompile.reduce.schedule import Output, Schedule, Site, Step

if TYPE_CHECKING:
    from torch import Tensor

    from tokcompile.models.geometry import Geometry
    from tokcompile.reduce.context import ImageContext
    from tokcompile.reduce.state import ImageTokens


def keep_count(n: int, reduction_ratio: float) -> int:
    """DivPrune's budget `round((1 - ratio) · N)` (Python's round: half to even, as LightCompress uses)."""
    return int(round((1 - reduction_ratio) * n))


def cosine_distance(features: Tensor) -> Tensor:
    """(B, N, D) -> (B, N, N) fp32 `1 - cos` (rows normalised, then one matmul, as LightCompress does)."""
    x = features.float()  # (B, N, D)
    xn = x / x.norm(dim=-1, keepdim=True)  # (B, N, D)
    return 1.0 - xn @ xn.transpose(1, 2)  # (B, N, N)


def divprune_select(features: Tensor, k: int, decide: Callable[[Tensor], Tensor] = lambda s: s) -> Tensor:
    """Greedy max-min diversity, per sample: (B, N, D) features -> (B, k) int64 kept indices, ascending.

    `decide` (`ctx.decision`) sees the (B, N) distances each of the k picks ranks on, before the kept tokens
    are masked out (their distance to the kept set is ~0, never the largest)."""
    dist = cosine_distance(features)  # (B, N, N): dist[b, i, j], row i a kept token, column j a candidate
    B, N = dist.shape[:2]
    eye = torch.eye(N, dtype=torch.bool, device=dist.device)[None]  # (1, N, N)
    # Pick 0: every column's nearest-neighbour distance, the token itself excluded.
    nn_dist = dist.masked_fill(eye, float("inf")).amin(dim=1)  # (B, N)
    idx = torch.arange(N, device=dist.device)[None, :]  # (1, N)
    pick = first_argmax(decide(nn_dist))  # (B,)
    picked = idx == pick[:, None]  # (B, N) one-hot of the first pick
    min_dist = dist.gather(1, pick[:, None, None].expand(B, 1, N))[:, 0]  # (B, N): row of the pick
    for _ in range(k - 1):  # static trip count
        scores = decide(min_dist).masked_fill(picked, float("-inf"))  # (B, N): kept tokens never again
        pick = first_argmax(scores)  # (B,)
        picked = picked | (idx == pick[:, None])  # (B, N)
        row = dist.gather(1, pick[:, None, None].expand(B, 1, N))[:, 0]  # (B, N)
        min_dist = torch.minimum(min_dist, row)  # (B, N): distance of every candidate to the kept set
    # Exactly k ones: a constant-k top-k over the 0/1 mask is the kept set; sort for the original order.
    return torch.topk(picked.float(), k, dim=-1).indices.sort(dim=-1).values  # (B, k)


@REDUCERS.register("divprune")
@dataclass(frozen=True)
class DivPruneConfig:
    """DivPrune parameters under LightCompress's names.

    Args:
        reduction_ratio: the fraction of image tokens pruned, in [0, 1) (LightCompress: 0.7778, 0.8889, 0.9444
            keep 128, 64 and 32 of LLaVA-1.5's 576).
    """

    reduction_ratio: float = 0.9444

    method: ClassVar[str] = "DivPrune"
    sites: ClassVar[frozenset[Site]] = frozenset({Site.PROJECTOR_OUT})

    def plan(self, geom: Geometry, key: str, entering: Entering) -> Schedule:
        r = self.reduction_ratio
        if not 0.0 <= r < 1.0:
            raise RecipeError(
                f"{key}.reduction_ratio", f"{r} is outside [0, 1); use the fraction of image tokens pruned"
            )
        n = entering.image_tokens
        k = keep_count(n, r)
        if k < 1:
            raise RecipeError(
                f"{key}.reduction_ratio",
                f"reduction_ratio {r} keeps 0 of {n} image tokens; lower it below {1 - 0.5 / n:.4f}",
            )
        return (Step("divprune", Site.PROJECTOR_OUT, 0, n, k, Output.KEPT, scored=k),)

    def scoring_flops(self, step: Step, geom: Geometry, n_tokens: int) -> int:
        """The cosine-similarity matrix of the N projected features (2·N²·D); the greedy loop's k·N min/max
        updates are left out."""
        return 2 * step.n_in * step.n_in * geom.hidden_size

    def apply(
        self, state: ImageTokens, ctx: ImageContext, step: Step, forced: Tensor | None = None
    ) -> tuple[ImageTokens, Tensor]:
        if forced is None:
            kept = divprune_select(state.hidden, step.n_out, ctx.decision)  # (B, k), ascending
        else:
            kept = forced  # eager references replay a selection made earlier
        return keep_tokens(state, kept), kept
