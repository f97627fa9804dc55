"""FiCoCo-V: "Filter, Correlate, Compress" inside the vision encoder (AAAI 2026; v1 "Rethinking Token Reduction
in MLLMs"; official code kawhiiiileo/FiCoCo, `FiCoCo_V.py` and `clip_encoder.py`).

In every vision block after `control_encoding_layer`, between the attention residual and the MLP, `r` patch
tokens are discarded and their content is recycled into the tokens that stay:
- **Filter.** From the block's head-averaged attention logits A = mean_h(q·kᵀ/√d): the CLS row over the
  patches `c` and each patch's mean logit over the patches `p`, both L2-normalised over the tokens; the keep
  score is `u = β·ĉ − (1−β)·p̂` (β = 0.35). A local penalty spreads the discards: in every 2x2 window of the
  original patch grid the alive token with the lowest `u` gets `u/2` (u > 0) or `2u`. The `r` patches with the
  lowest `u` are discarded (CLS never).
- **Correlate.** Each discarded token i sends its content to the k kept tokens its attention row A[i] prefers,
  weighted by their softmax probabilities renormalised over the k; k is the number of entries above the row's
  0.998 quantile, which for distinct values depends only on the token count t (k = 2 from t ≈ 502, else 1).
- **Compress.** Self-preserving: `x_j ← (x_j + Σ_i w_ij·x_i) / (1 + Σ_i w_ij)` over the discarded tokens
  sending to j. The kept tokens stay in their original order, CLS first; no sizes are carried.

This is the clean algorithm of `ALGORITHMS.md` §3.1. Static-export notes and deviations from the official code:
- k is computed at plan time from t, exactly as `torch.quantile` places the 0.998 quantile on t distinct values
  (the official code counts per row and takes the maximum over the discarded tokens: it can differ only when a
  row has ties at the quantile).
- Targets are kept tokens only (the official code may pick the token itself or another discarded one, and that
  mass is lost). Ties rank by (score, index ascending) everywhere.
- Scores are fp32. Each block's keep scores (before the penalty) and its discarded rows' logits go through
  `ctx.decision` (`Step.scored` = 2, `ficoco_v.py`), as do FiCoCo-L's, so a graph whose discards or targets
  differ from eager's at a near-tie is checked by replaying it.
- `faithful: true` is refused: the official code's window scores live in one module-level map that is never
  reset across layers or images, so its result depends on earlier calls, and it reorders the kept tokens by
  score with CLS last, which LLaVA's feature selection then mistakes for a patch. Neither has a static,
  per-image form worth exporting.
- FiCoCo-L (`AT: true`) works inside the decoder: `tokcompile/reduce/ficoco_l.py`; with `merge_visual` too it
  is FiCoCo-VL, whose decoder stage takes `llm_r` and `llm_control_encoding_layer`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from tokcompile.errors import RecipeError
from tokcompile.reduce import ficoco_l
from tokcompile.reduce.base import REDUCERS, Entering
from tokcompile.reduce.ficoco_v import PROTECTED, fan_out, ficoco_merge
from tokcompile.reduce.prune import keep_tokens
from tokcompile.reduce.schedule import Output, Schedule, Site, Step, image_tokens_after_vision

if TYPE_CHECKING:
    from torch import Tensor

    from tokcompile.models.geometry import Geometry
    from tokcompile.reduce.context import VisionContext
    from tokcompile.reduce.state import ImageTokens

DEFAULT_R = 42  # the official tower settings (clip_encoder.py)
DEFAULT_CONTROL_LAYER = 11


@REDUCERS.register("ficoco")
@dataclass(frozen=True)
class FiCoCoConfig:
    """FiCoCo parameters under the official names.

    Args:
        merge_visual: FiCoCo-V in the vision tower (the official switch).
        AT: FiCoCo-L in the decoder (`tokcompile/reduce/ficoco_l.py`); with merge_visual, FiCoCo-VL.
        r: tokens discarded per block or layer after `control_encoding_layer`: FiCoCo-V's (official 42), or
            FiCoCo-L's (official 14) when merge_visual is false.
        control_encoding_layer: blocks (layers) up to this one (0-based) run unchanged: FiCoCo-V's (official
            11), or FiCoCo-L's (official 4) when merge_visual is false.
        llm_r, llm_control_encoding_layer: FiCoCo-L's r and layer in FiCoCo-VL (default 14 and 4, the official
            decoder's own constants), where r and control_encoding_layer set FiCoCo-V.
        faithful: FiCoCo-L only: the official prefill's positions (P2); refused for FiCoCo-V.
    """

    r: int | None = None
    control_encoding_layer: int | None = None
    merge_visual: bool = True
    AT: bool = False
    llm_r: int | None = None
    llm_control_encoding_layer: int | None = None
    faithful: bool = False

    method: ClassVar[str] = "FiCoCo"
    sites: ClassVar[frozenset[Site]] = frozenset({Site.VISION_BLOCK, Site.DECODER_MID})

    def sites_used(self) -> frozenset[Site]:
        return frozenset({Site.VISION_BLOCK} if self.merge_visual is not False else set()) | frozenset(
            {Site.DECODER_MID} if self.AT is True else set())

    def _check(self, key: str) -> None:
        for name in ("merge_visual", "AT", "faithful"):
            if not isinstance(getattr(self, name), bool):
                raise RecipeError(f"{key}.{name}", f"expected true or false, got {getattr(self, name)!r}")
        if self.faithful and self.merge_visual:
            raise RecipeError(f"{key}.faithful", "FiCoCo-V's official code keeps its window scores across layers "
                                                 "and images and reorders tokens with CLS last, which has no static "
                                                 "per-image form; remove faithful (it applies to FiCoCo-L alone)")
        if not self.merge_visual and not self.AT:
            raise RecipeError(f"{key}.merge_visual", "false with AT false turns FiCoCo off and leaves nothing to "
                                                     "do; set merge_visual (FiCoCo-V) or AT (FiCoCo-L) true")
        if not self.merge_visual:
            for name in ("llm_r", "llm_control_encoding_layer"):
                if getattr(self, name) is not None:
                    raise RecipeError(f"{key}.{name}", f"is for FiCoCo-VL; without merge_visual, r and "
                                                       f"control_encoding_layer set FiCoCo-L: use {name[4:]}")
        for name in ("r", "control_encoding_layer", "llm_r", "llm_control_encoding_layer"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise RecipeError(f"{key}.{name}", f"expected an integer >= 0, got {v!r}")

    def _decoder_params(self) -> tuple[int, int, str, str]:
        """FiCoCo-L's (r, control layer) and the keys that set them."""
        if self.merge_visual:
            r, layer, keys = self.llm_r, self.llm_control_encoding_layer, ("llm_r", "llm_control_encoding_layer")
        else:
            r, layer, keys = self.r, self.control_encoding_layer, ("r", "control_encoding_layer")
        return (ficoco_l.DEFAULT_R if r is None else r,
                ficoco_l.DEFAULT_CONTROL_LAYER if layer is None else layer, *keys)

    def plan(self, geom: Geometry, key: str, entering: Entering) -> Schedule:
        self._check(key)
        steps = self._plan_vision(geom, key, entering) if self.merge_visual else []
        if self.AT:
            n = image_tokens_after_vision(entering.image_tokens, entering.vision_tokens, tuple(steps))
            r, control, r_key, layer_key = self._decoder_params()
            steps += ficoco_l.plan_steps(geom, n, r, control, self.faithful, key, r_key, layer_key)
        return tuple(steps)

    def _plan_vision(self, geom: Geometry, key: str, entering: Entering) -> list[Step]:
        r = DEFAULT_R if self.r is None else self.r
        control = DEFAULT_CONTROL_LAYER if self.control_encoding_layer is None else self.control_encoding_layer
        patches = geom.vision_tokens - PROTECTED
        if math.isqrt(patches) ** 2 != patches:
            raise RecipeError(f"{key}.method", f"FiCoCo's local penalty needs a square patch grid, got {patches} "
                                               "patches")
        first = control + 1
        if first >= geom.vision_layers:
            raise RecipeError(f"{key}.control_encoding_layer", f"{control} leaves no vision block to compress "
                              f"(blocks 0..{geom.vision_layers - 1} run); use at most {geom.vision_layers - 2}")
        if r < 1:
            raise RecipeError(f"{key}.r", "0 discards nothing; use r >= 1")
        t = entering.vision_tokens
        steps = []
        for layer in range(first, geom.vision_layers):
            if t - PROTECTED - r < 1:
                raise RecipeError(f"{key}.r", f"{r} per block from block {first} leaves no image token by "
                                              f"block {layer} ({t - PROTECTED} patches left); lower r")
            steps.append(Step("ficoco", Site.VISION_BLOCK, layer, t, t - r, output=Output.KEPT, scored=2))
            t -= r
        return steps

    def scoring_flops(self, step: Step, geom: Geometry, n_tokens: int) -> int:
        """FiCoCo-V: the head-averaged logits (2·t²·Dv: the block's attention computes them too, but fused) and
        the compress matmul (2·t·r·Dv). FiCoCo-L: the layer's queries again (2·T·D·H·d), every head's logits
        (2·T²·H·d), the indirect correlation over the text (2·n²·T) and the compress (2·n·r·D)."""
        if step.site is Site.DECODER_MID:
            return ficoco_l.scoring_flops(step, geom, n_tokens)
        r = step.n_in - step.n_out
        return 2 * n_tokens * n_tokens * geom.vision_hidden_size + 2 * n_tokens * r * geom.vision_hidden_size

    def apply(
        self, state: ImageTokens, ctx: VisionContext, step: Step, forced: Tensor | None = None
    ) -> tuple[ImageTokens, Tensor]:
        if step.site is Site.DECODER_MID:
            return ficoco_l.apply_decoder(state, ctx, step, fan_out(step.n_in), forced)
        x = state.hidden  # (B, t, Dv)
        t, p = x.shape[1], state.n_protected
        if p != PROTECTED or ctx.patch_grid is None or ctx.patch_grid[0] != ctx.patch_grid[1]:
            raise ValueError("FiCoCo needs a CLS-first tower with a square patch grid")
        if ctx.keys.shape[2] != t:  # Python ints: the block's keys must be the tokens scored here
            raise ValueError(f"FiCoCo scores {t} tokens with a block that attended over {ctx.keys.shape[2]}")
        q, k = ctx.queries.float(), ctx.keys.float()  # (B, Hv, t, dv)
        logits = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).mean(1)  # (B, t, t) before any bias
        r = step.n_in - step.n_out
        hidden, kept = ficoco_merge(x, logits, state.source[:, p:] - p, ctx.patch_grid[1], r, fan_out(t), forced,
                                    ctx.decision)
        return keep_tokens(state, kept, hidden), kept  # hidden (B, t - r, Dv): the compressed features
