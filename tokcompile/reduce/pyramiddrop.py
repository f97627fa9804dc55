"""PyramidDrop: "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy
Reduction" (Xing et al., CVPR 2025, arXiv:2410.17247).

The decoder is cut into stages at `layer_list`; before each listed layer l runs, every image token still in the
sequence is scored by the attention the last prompt token pays it under layer l's own input norm, q/k
projections and RoPE, averaged over heads. Stage s keeps the top `int(N·ratio_s)` of the ORIGINAL N image
tokens (LightCompress's `image_token_ratio_list` is of the original count), in their original order, and every
text token. Each stage caches a shorter sequence (pattern C2); on 1-D RoPE the survivors are renumbered
contiguously from l on (P2), as LightCompress does.

Static-export deviations from the paper and LightCompress (`token_reduction/pyramiddrop.py`):
- The score row is computed from layer l's projections on its input for the last token only (the layer keeps
  its fused attention); GQA maps query head h to KV head h // (H / Hkv) as HF's attention does (LightCompress
  multiplies without `repeat_kv`, which only runs for MHA). Scores stay fp32 (no cast back to the model dtype).
- Ties rank by (score descending, index ascending); LightCompress's `topk` leaves their order unspecified.
- Every sample of a batch keeps its own tokens with any padding side; padded keys never get probability
  (LightCompress prunes nothing unless padding is on the right).
- M-RoPE families (Qwen) keep their original position ids (P1); LightCompress supports only LLaVA.
- Counts are fixed when the recipe is resolved; each stage must keep at least one image token (LightCompress's
  `topk(0)` would silently drop the whole image).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from tokcompile.errors import RecipeError
from tokcompile.reduce.base import REDUCERS, Entering, is_int, is_number
from tokcompile.reduce.ops import topk_sorted
from tokcompile.reduce.prune import keep_image_tokens
from tokcompile.reduce.schedule import Positions, Schedule, Site, Step

if TYPE_CHECKING:
    from torch import Tensor

    from tokcompile.models.geometry import Geometry
    from tokcompile.reduce.context import DecoderContext
    from tokcompile.reduce.state import TokenState


def keep_count(n_original: int, ratio: float) -> int:
    """LightCompress's stage count `int(N·ratio)` (floor), of the ORIGINAL image-token count N."""
    return int(n_original * ratio)


@REDUCERS.register("pyramiddrop")
@dataclass(frozen=True)
class PyramidDropConfig:
    """PyramidDrop parameters under LightCompress's names.

    Args:
        layer_list: decoder layers before which a stage prunes, strictly increasing.
        image_token_ratio_list: per stage, the fraction of the ORIGINAL image tokens kept, non-increasing.
    """

    layer_list: Any = (8, 16, 24)
    image_token_ratio_list: Any = (0.5, 0.25, 0.125)

    method: ClassVar[str] = "PyramidDrop"
    sites: ClassVar[frozenset[Site]] = frozenset({Site.DECODER_LAYER})

    def __post_init__(self) -> None:
        for name in ("layer_list", "image_token_ratio_list"):  # YAML lists -> tuples (frozen, hashable)
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))

    def _lists(self, key: str) -> tuple[tuple[int, ...], tuple[float, ...]]:
        layers, ratios = self.layer_list, self.image_token_ratio_list
        if not isinstance(layers, (list, tuple)) or not layers or not all(is_int(x) for x in layers):
            raise RecipeError(f"{key}.layer_list", f"expected a non-empty list of decoder layer indices, got "
                                                   f"{layers!r}; e.g. [8, 16, 24]")
        if not isinstance(ratios, (list, tuple)) or not all(is_number(r) for r in ratios):
            raise RecipeError(f"{key}.image_token_ratio_list", f"expected a list of fractions, got {ratios!r}; "
                                                               "e.g. [0.5, 0.25, 0.125]")
        if len(ratios) != len(layers):
            raise RecipeError(f"{key}.image_token_ratio_list", f"has {len(ratios)} entries but layer_list has "
                                                               f"{len(layers)}; give one ratio per layer")
        return tuple(layers), tuple(float(r) for r in ratios)

    def plan(self, geom: Geometry, key: str, entering: Entering) -> Schedule:
        layers, ratios = self._lists(key)
        last = geom.n_layers - 1
        for a, b in zip(layers, layers[1:]):
            if b <= a:
                raise RecipeError(f"{key}.layer_list", f"{list(layers)} is not strictly increasing ({a} then {b}); "
                                                       "list each stage's first layer once, in order")
        bad = [x for x in layers if not 0 <= x <= last]
        if bad:
            raise RecipeError(f"{key}.layer_list", f"layer {bad[0]} is outside the decoder's layers 0..{last} of "
                                                   "this model")
        for r in ratios:
            if not 0.0 < r <= 1.0:
                raise RecipeError(f"{key}.image_token_ratio_list", f"{r} is outside (0, 1]; each ratio is the "
                                                                   "fraction of the original image tokens kept")
        for a, b in zip(ratios, ratios[1:]):
            if b > a:
                raise RecipeError(f"{key}.image_token_ratio_list", f"{list(ratios)} increases ({a} then {b}); "
                                                                   "a stage cannot keep more than the one before")
        n = entering.image_tokens
        positions = Positions.RENUMBER if geom.rope == "1d" else Positions.KEEP
        steps, n_in = [], n
        for layer, r in zip(layers, ratios):
            k = keep_count(n, r)
            if k < 1:
                raise RecipeError(f"{key}.image_token_ratio_list", f"ratio {r} keeps 0 of {n} image tokens; use at "
                                                                   f"least {1 / n:.4g}")
            steps.append(Step("pyramiddrop", Site.DECODER_LAYER, layer, n_in, k, positions=positions, scored=1))
            n_in = k
        return tuple(steps)

    def scoring_flops(self, step: Step, geom: Geometry, n_tokens: int) -> int:
        """The last token's query (2·d·dq), this layer's keys over every entering token (2·n·d·dkv; the layer
        computes them again inside its attention) and one row of scores (2·n·dq)."""
        dq, dkv = geom.n_heads * geom.head_dim, geom.n_kv_heads * geom.head_dim
        return 2 * geom.hidden_size * dq + 2 * n_tokens * geom.hidden_size * dkv + 2 * n_tokens * dq

    def apply(
        self, state: TokenState, ctx: DecoderContext, step: Step, forced: Tensor | None = None
    ) -> tuple[TokenState, Tensor]:
        if forced is None:
            attn = ctx.last_token_attention("current")  # (B, T) layer l's last-token row over the tokens entering it
            scores = ctx.decision(attn.gather(1, ctx.image_span(step.n_in)))  # (B, N_s) the current image tokens
            kept = topk_sorted(scores, step.n_out)  # (B, k_s), ascending, relative to the entering image span
        else:
            kept = forced  # eager references replay a selection made earlier
        return keep_image_tokens(state, kept, step), kept
