"""RandomPrune: the random-selection baseline of LightCompress (LLMC+: "Benchmarking Vision-Language Model
Compression with a Plug-and-play Toolkit", AAAI 2026, arXiv:2508.09981; `token_reduction/random.py`).

Layers 0..K-1 see every token. Before decoder layer K, `round(N·(1-R))` of the N image tokens are kept, chosen
uniformly at random with no score at all, and every text token is kept; survivors keep their original RoPE
position ids (policy P1), so layers >= K cache fewer entries (pattern C1). It is the control that tells whether
a scoring method (FastV, PyramidDrop, ...) beats chance at the same layer and budget.

Static-export deviations from LightCompress (`RandomPrune`, `metric: random`):
- The random choice is fixed at compile time: `seed` (default 0, not a LightCompress key) seeds a numpy PCG64
  generator (`np.random.default_rng(seed).permutation(N)[:k]`, sorted) while the graph is traced, so the kept
  set is a constant tensor in the graph, the same for every sample and every call. LightCompress draws a fresh
  `torch.randperm` on every prompt's first turn (from the global torch RNG, seeded once by `base.seed`) and
  reuses it for later turns of that prompt. The step's `kept_j` output records the set; the recipe, seed
  included, is in the manifest.
- The image span is found per sample from the placeholder id (LightCompress uses one configured start index for
  the whole batch); the same relative indices are kept in every sample's span.
- `metric: holitom_merge` (FastV's attention top-k plus a merge of every dropped token into its most similar
  kept one, with a Python loop over tokens) is not a random choice and is refused at plan time.
- `prune_ratio` must keep at least one token (use VTW to withdraw them all); `pruning_loc` 0 prunes before the
  first decoder layer, still with the original position ids, as LightCompress's hook on block 0 does.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from tokcompile.errors import RecipeError
from tokcompile.reduce.base import REDUCERS, Entering
from tokcompile.reduce.prune import keep_image_tokens
from tokcompile.reduce.schedule import Schedule, Site, Step

if TYPE_CHECKING:
    from torch import Tensor

    from tokcompile.models.geometry import Geometry
    from tokcompile.reduce.context import DecoderContext
    from tokcompile.reduce.state import TokenState


def keep_count(n: int, prune_ratio: float) -> int:
    """LightCompress's `round(N·(1 - rate))` (Python's round: half to even)."""
    return int(round(n * (1.0 - prune_ratio)))


@functools.lru_cache(maxsize=64)
def random_kept(n: int, k: int, seed: int) -> tuple[int, ...]:
    """The k of n image-span indices kept for `seed`, ascending: the first k of a seeded permutation (how
    LightCompress takes `randperm(N)[:k]`), drawn from numpy's PCG64 so the set is the same on every machine."""
    perm = np.random.default_rng(seed).permutation(n)  # (n,)
    return tuple(sorted(int(i) for i in perm[:k]))


@REDUCERS.register("randomprune")
@dataclass(frozen=True)
class RandomPruneConfig:
    """RandomPrune parameters under LightCompress's names (plus `seed`, the static draw's seed).

    Args:
        pruning_loc: K, the first decoder layer that sees the reduced sequence, in 0..L-1.
        prune_ratio: R, the fraction of image tokens pruned, in [0, 1).
        metric: LightCompress's switch; only `random` is a random choice and is offered.
        seed: seeds the draw of the kept set, fixed when the graph is built (LightCompress draws per call).
    """

    pruning_loc: int
    prune_ratio: float
    metric: str = "random"
    seed: int = 0

    method: ClassVar[str] = "RandomPrune"
    sites: ClassVar[frozenset[Site]] = frozenset({Site.DECODER_LAYER})

    def plan(self, geom: Geometry, key: str, entering: Entering) -> Schedule:
        if self.metric == "holitom_merge":
            raise RecipeError(
                f"{key}.metric",
                "holitom_merge is not a random choice (it keeps layer pruning_loc-1's last-token attention top-k "
                "and averages every other image token into its most similar kept one); use metric: random, or "
                "method FastV for the attention top-k",
            )
        if self.metric != "random":
            raise RecipeError(f"{key}.metric", f"unknown metric {self.metric!r}; use random")
        last = geom.n_layers - 1
        if not 0 <= self.pruning_loc <= last:
            raise RecipeError(
                f"{key}.pruning_loc",
                f"{self.pruning_loc} is outside the decoder's layers 0..{last} of this model "
                "(the image tokens are pruned before that layer runs)",
            )
        if not 0.0 <= self.prune_ratio < 1.0:
            raise RecipeError(
                f"{key}.prune_ratio", f"{self.prune_ratio} is outside [0, 1); use the fraction of image tokens pruned"
            )
        if self.seed < 0:
            raise RecipeError(f"{key}.seed", f"{self.seed} is negative; use an integer >= 0")
        n = entering.image_tokens
        k = keep_count(n, self.prune_ratio)
        if k < 1:
            raise RecipeError(
                f"{key}.prune_ratio",
                f"prune_ratio {self.prune_ratio} keeps 0 of {n} image tokens; lower it below {1 - 0.5 / n:.4f} "
                "(or use method VTW to withdraw every image token)",
            )
        return (Step("randomprune", Site.DECODER_LAYER, self.pruning_loc, n, k, scored=0),)  # a constant set

    def scoring_flops(self, step: Step, geom: Geometry, n_tokens: int) -> int:
        """Nothing is scored: the kept set is a constant."""
        return 0

    def apply(
        self, state: TokenState, ctx: DecoderContext, step: Step, forced: Tensor | None = None
    ) -> tuple[TokenState, Tensor]:
        if forced is None:
            fixed = torch.tensor(random_kept(step.n_in, step.n_out, self.seed), dtype=torch.long,
                                 device=state.hidden.device)  # (k,) a graph constant
            # The same set for every sample; the batch axis comes from a tensor, so it stays dynamic.
            kept = torch.zeros_like(state.image_start, dtype=torch.long)[:, None] + fixed[None, :]  # (B, k)
        else:
            kept = forced  # eager references replay a selection made earlier
        return keep_image_tokens(state, kept, step), kept
