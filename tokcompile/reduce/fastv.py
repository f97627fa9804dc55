"""FastV: "An Image is Worth 1/2 Tokens After Layer 2" (Chen et al., ECCV 2024, arXiv:2403.06764).

Layers 0..K-1 see every token. Before layer K, each image token is scored by the attention that the last
prompt token pays it in layer K-1, averaged over heads; the top `round(N·(1-R))` image tokens survive and
every text token is kept. Survivors keep their original RoPE positions (policy P1), so layers >= K cache
fewer entries (pattern C1).

Static-export deviations from the paper and the official code:
- The score row is computed from layer K-1's own input norm, q projection and RoPE against the keys that
  layer's attention used, instead of re-running it with `output_attentions=True`; the layer keeps SDPA.
- Ties rank by (score descending, index ascending) so that every backend selects the same set.
- Every sample of a batch keeps its own tokens (the official code indexes batch element 0), and the
  scoring token is each sample's last real (non-padding) token.
- The keep count is fixed when the recipe is resolved, so the graph has a constant top-k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from tokcompile.errors import RecipeError
from tokcompile.reduce.base import REDUCERS, Entering
from tokcompile.reduce.ops import topk_sorted
from tokcompile.reduce.prune import keep_image_tokens
from tokcompile.reduce.schedule import Schedule, Site, Step

if TYPE_CHECKING:
    from torch import Tensor

    from tokcompile.models.geometry import Geometry
    from tokcompile.reduce.context import DecoderContext
    from tokcompile.reduce.state import TokenState


def keep_count(n: int, rate: float) -> int:
    """FastV's keep count `round(N·(1-R))` (Python's round: half to even, as LightCompress uses)."""
    return int(round(n * (1.0 - rate)))


@REDUCERS.register("fastv")
@dataclass(frozen=True)
class FastVConfig:
    """FastV parameters under LightCompress's names.

    Args:
        pruning_loc: K, the first decoder layer that sees the reduced sequence (scores come from K-1).
        rate: R, the fraction of image tokens pruned, in [0, 1).
    """

    pruning_loc: int = 3
    rate: float = 0.778

    method: ClassVar[str] = "FastV"
    sites: ClassVar[frozenset[Site]] = frozenset({Site.DECODER_LAYER})

    def plan(self, geom: Geometry, key: str, entering: Entering) -> Schedule:
        if not 0.0 <= self.rate < 1.0:
            raise RecipeError(f"{key}.rate", f"{self.rate} is outside [0, 1); use the fraction of image tokens pruned")
        last = geom.n_layers - 1
        if not 1 <= self.pruning_loc <= last:
            raise RecipeError(
                f"{key}.pruning_loc",
                f"{self.pruning_loc} is outside the decoder's layers 1..{last} of this model "
                f"(FastV scores with layer pruning_loc-1, so it must be at least 1)",
            )
        n = entering.image_tokens
        k = keep_count(n, self.rate)
        if k < 1:
            raise RecipeError(
                f"{key}.rate",
                f"rate {self.rate} keeps 0 of {n} image tokens; lower it below {1 - 0.5 / n:.4f}",
            )
        return (Step("fastv", Site.DECODER_LAYER, self.pruning_loc, n, k, scored=1),)

    def apply(
        self, state: TokenState, ctx: DecoderContext, step: Step, forced: Tensor | None = None
    ) -> tuple[TokenState, Tensor]:
        if forced is None:
            attn = ctx.last_token_attention("previous")  # (B, T) over the tokens that entered layer K-1
            scores = ctx.decision(attn.gather(1, ctx.image_span(step.n_in)))  # (B, N), reported for parity
            kept = topk_sorted(scores, step.n_out)  # (B, k), ascending
        else:
            kept = forced  # eager references replay a selection made earlier
        return keep_image_tokens(state, kept, step), kept
