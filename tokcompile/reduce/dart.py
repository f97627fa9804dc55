"""DART: "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More" (Wen et
al., 2025, arXiv:2502.11494; official code ZichenWen1/DART, LightCompress `token_reduction/dart.py`).

Before decoder layer K, a few pivot tokens are chosen by the L1 norm of their keys in layer K-1 (after RoPE,
all KV heads concatenated): `pivot_image_token` image tokens and `pivot_text_token` text tokens after the image.
For each pivot in turn, the `TOPK` remaining image tokens least similar to it (cosine of the hidden states
entering layer K after the decoder's final norm) are kept and leave the candidate pool. The image pivots and
every selection survive, in original order, with their original positions (P1):
`TOPK = int(N·(1 - reduction_ratio) / (pivot_image_token + pivot_text_token))` and the kept count is
`pivot_image_token + (pivot_image_token + pivot_text_token)·TOPK`: 124 of 576 at 0.7778 with 4 + 4 pivots
(TOPK = 15; the official code's budget of 128 gives TOPK = 16 and 132).
No attention map is needed, so every layer keeps its fused attention.

Static-export deviations from LightCompress:
- Pivots are visited in ascending sequence order (LightCompress iterates a Python set, whose order depends on
  the index values and the set's table size).
- Ties rank by (score descending, index ascending) for pivots and selections (`torch.topk` leaves them
  unspecified). Norms and similarities are fp32.
- Every sample of a batch picks its own pivots and tokens; text pivots are chosen among each sample's real
  tokens after its image (LightCompress indexes sample 0 at a configured offset). A prompt needs at least
  `pivot_text_token` tokens after the image, which every chat template gives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from tokcompile.errors import RecipeError
from tokcompile.reduce.base import REDUCERS, Entering
from tokcompile.reduce.ops import gather_tokens, rank_desc, topk_sorted
from tokcompile.reduce.prune import keep_image_tokens
from tokcompile.reduce.schedule import Schedule, Site, Step

if TYPE_CHECKING:
    from torch import Tensor

    from tokcompile.models.geometry import Geometry
    from tokcompile.reduce.context import DecoderContext
    from tokcompile.reduce.state import TokenState


def counts(n: int, reduction_ratio: float, pivot_image: int, pivot_text: int) -> tuple[int, int]:
    """(TOPK per pivot, kept image tokens) as LightCompress computes them."""
    per_pivot = int(n * (1 - reduction_ratio) / (pivot_image + pivot_text))
    return per_pivot, pivot_image + (pivot_image + pivot_text) * per_pivot


def dart_select(key_l1: Tensor, normed: Tensor, image_start: Tensor, valid: Tensor, n: int, pivot_image: int,
                pivot_text: int, per_pivot: int, decide: Callable[[Tensor], Tensor] = lambda s: s) -> Tensor:
    """Pivots, then the least similar image tokens per pivot.

    Args:
        key_l1: (B, T) L1 norm of every token's layer-(K-1) keys.
        normed: (B, T, D) the final norm of the hidden states entering layer K.
        image_start: (B,) first image token; n: image tokens.
        valid: (B, T) real tokens.
        decide: `ctx.decision`, handed every score vector ranked: the key norms, then each pivot's similarities.

    Returns:
        (B, k) kept image tokens, relative to the span, ascending.
    """
    B, T = key_l1.shape
    dev = key_l1.device
    key_l1 = decide(key_l1)  # (B, T) both kinds of pivot rank on it
    span = image_start[:, None] + torch.arange(n, device=dev)[None]  # (B, n)
    image_pivots = topk_sorted(key_l1.gather(1, span), pivot_image)  # (B, p_img) relative, ascending
    after = (torch.arange(T, device=dev)[None] >= (image_start + n)[:, None]) & valid  # (B, T) text after image
    text_pivots = topk_sorted(key_l1.masked_fill(~after, float("-inf")), pivot_text)  # (B, p_txt) absolute
    image_h = gather_tokens(normed, span).float()  # (B, n, D)
    pivots_h = torch.cat([gather_tokens(image_h, image_pivots), gather_tokens(normed, text_pivots).float()], 1)
    idx = torch.arange(n, device=dev)
    chosen = (image_pivots[..., None] == idx).any(1)  # (B, n) image pivots are kept
    candidate = ~chosen  # (B, n)
    for j in range(pivot_image + pivot_text):  # ascending sequence order: image pivots precede text pivots
        sim = decide(F.cosine_similarity(pivots_h[:, j : j + 1], image_h, dim=-1))  # (B, n)
        score = (-sim).masked_fill(~candidate, float("-inf"))  # least similar first
        pick = rank_desc(score) < per_pivot  # (B, n)
        chosen = chosen | pick
        candidate = candidate & ~pick
    return topk_sorted(chosen.float(), pivot_image + (pivot_image + pivot_text) * per_pivot)  # (B, k)


@REDUCERS.register("dart")
@dataclass(frozen=True)
class DARTConfig:
    """DART parameters under LightCompress's names.

    Args:
        pruning_loc: K, the first decoder layer that sees the reduced sequence (pivots from layer K-1's keys;
            official DART: 2, LightCompress's config: 5).
        reduction_ratio: the fraction of image tokens the budget prunes, in [0, 1).
        pivot_image_token: image pivots; pivot_text_token: text pivots (4 and 4).
    """

    pruning_loc: int = 2
    reduction_ratio: float = 0.7778
    pivot_image_token: int = 4
    pivot_text_token: int = 4

    method: ClassVar[str] = "DART"
    sites: ClassVar[frozenset[Site]] = frozenset({Site.DECODER_LAYER})

    def plan(self, geom: Geometry, key: str, entering: Entering) -> Schedule:
        r, pi, pt = self.reduction_ratio, self.pivot_image_token, self.pivot_text_token
        if not 0.0 <= r < 1.0:
            raise RecipeError(f"{key}.reduction_ratio", f"{r} is outside [0, 1); use the fraction of image tokens "
                                                        "pruned")
        for name, v in (("pruning_loc", self.pruning_loc), ("pivot_image_token", pi), ("pivot_text_token", pt)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise RecipeError(f"{key}.{name}", f"expected an integer >= 0, got {v!r}")
        last = geom.n_layers - 1
        if not 1 <= self.pruning_loc <= last:
            raise RecipeError(f"{key}.pruning_loc", f"{self.pruning_loc} is outside the decoder's layers 1..{last} "
                                                    "(DART takes its pivots from layer pruning_loc-1's keys)")
        if pi + pt < 1:
            raise RecipeError(f"{key}.pivot_image_token", "DART needs at least one pivot; use 4 and 4")
        n = entering.image_tokens
        per_pivot, k = counts(n, r, pi, pt)
        if k < 1 or per_pivot < 1:
            raise RecipeError(f"{key}.reduction_ratio", f"{r} gives {per_pivot} tokens per pivot with {pi} + {pt} "
                                                        f"pivots over {n} image tokens; lower it")
        if n - pi < (pi + pt) * per_pivot:
            raise RecipeError(f"{key}.reduction_ratio", f"{r} asks for {(pi + pt) * per_pivot} selections from "
                                                        f"{n - pi} image tokens; raise it")
        return (Step("dart", Site.DECODER_LAYER, self.pruning_loc, n, k, scored=1 + pi + pt),)

    def scoring_flops(self, step: Step, geom: Geometry, n_tokens: int) -> int:
        """One cosine row per pivot over the image tokens (2·N·D each) and the final norm of the sequence."""
        pivots = self.pivot_image_token + self.pivot_text_token
        return 2 * pivots * step.n_in * geom.hidden_size + 4 * n_tokens * geom.hidden_size

    def apply(
        self, state: TokenState, ctx: DecoderContext, step: Step, forced: Tensor | None = None
    ) -> tuple[TokenState, Tensor]:
        if forced is None:
            if ctx.prev_keys is None:
                raise ValueError("DART needs the previous layer's keys")
            keys = ctx.prev_keys.float()  # (B, Hkv, T, d) as layer K-1's attention used them
            if keys.shape[2] != state.hidden.shape[1]:  # Python ints: a step between K-1 and K changed the tokens
                raise ValueError("DART's pivots need layer K-1's keys over the tokens entering layer K")
            key_l1 = keys.permute(0, 2, 1, 3).flatten(2).abs().sum(-1)  # (B, T)
            per_pivot, _ = counts(step.n_in, self.reduction_ratio, self.pivot_image_token, self.pivot_text_token)
            kept = dart_select(key_l1, ctx.ops.final_norm(state.hidden), state.image_start, state.valid, step.n_in,
                               self.pivot_image_token, self.pivot_text_token, per_pivot,
                               ctx.decision)  # (B, k) ascending
        else:
            kept = forced  # eager references replay a selection made earlier
        return keep_image_tokens(state, kept, step), kept
