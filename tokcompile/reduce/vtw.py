"""VTW: "Boosting Multimodal Large Language Models with Visual Tokens Withdrawal for Rapid Inference"
(Lin et al., AAAI 2025, arXiv:2405.05803).

Visual tokens matter in the shallow decoder layers only: once their information has flowed into the text
tokens (an "attention sink" of visual tokens), the deep layers barely use them. VTW therefore withdraws
every image token before decoder layer K, so layers 0..K-1 run the whole prompt and layers K..L-1 run the
text tokens alone, as queries and as keys/values (pattern C1: those layers cache no image token). The text
keeps its original RoPE position ids (the official `pe_type="keep"`, policy P1), gap included.

Static-export deviations from the paper and the official code (lzhxmu/VTW `VTWLlamaModel.forward`):
- The image span is found from the image placeholder id, not hard-coded to [35, 611) for LLaVA-1.5, and each
  sample of a padded batch withdraws its own span; the withdrawal is a fixed-size gather (T -> T - N).
- K is fixed when the recipe is resolved. The official `--findk` KL-threshold search is a separate command,
  `python -m tokcompile vtw-search recipe.yml` (`tokcompile/vtw_search.py`), which prints the K to write; PACT's
  rule (orailix/PACT) that picks K to match a single-layer reduction's average visual-token count is a key.
- K must lie in 1..L-1: K = 0 would give the decoder no image at all and K = L would withdraw nothing.
- The step reports an empty kept set, a (B, 0) int64 output, so parity and the layout treat VTW like any
  other pruning step (FastV keeping 0 tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from tokcompile.errors import RecipeError
from tokcompile.reduce.base import REDUCERS, Entering, is_int, is_number
from tokcompile.reduce.prune import keep_image_tokens
from tokcompile.reduce.schedule import Schedule, Site, Step

if TYPE_CHECKING:
    from torch import Tensor

    from tokcompile.models.geometry import Geometry
    from tokcompile.reduce.context import DecoderContext
    from tokcompile.reduce.state import TokenState

_PACT_KEYS = ("withdraw_visual_tokens", "VTW_equivalant_layer_for_reduction", "equivalent_reduc_percentage_vtw")


def equivalent_layer(n_layers: int, k0: int, p: float) -> int:
    """PACT's withdrawal layer: the layer K whose average visual-token count N·K/L matches a single-layer
    reduction at K0 that keeps the fraction p of the visual tokens, N·(K0 + p·(L - K0))/L.

    The fraction of layer-slots withdrawn is 1 - (1 - p)·(L - K0)/L; K is that fraction of L, rounded with
    Python's round (half to even), evaluated in the same order as PACT so its .5 cases round alike.
    """
    share = 1 - (1 - p) * ((n_layers - k0) / n_layers)
    return round(share * n_layers)


@REDUCERS.register("vtw")
@dataclass(frozen=True)
class VTWConfig:
    """VTW parameters: LightCompress-style `pruning_loc`, or PACT's three keys (never both).

    Args:
        pruning_loc: K, the first decoder layer that no longer sees any image token.
        withdraw_visual_tokens: PACT's switch; true with the two keys below to pick K by PACT's rule.
        VTW_equivalant_layer_for_reduction: PACT's K0, the layer of the single-layer reduction to match.
        equivalent_reduc_percentage_vtw: PACT's p, the fraction of visual tokens that reduction KEEPS at K0.
        eta: the KL threshold `python -m tokcompile vtw-search` picks K with (the official `--findk`'s eta;
            0.003 when absent). The compile itself does not read it.
    """

    pruning_loc: int | None = None
    withdraw_visual_tokens: bool | None = None
    VTW_equivalant_layer_for_reduction: int | None = None
    equivalent_reduc_percentage_vtw: float | None = None
    eta: float | None = None

    method: ClassVar[str] = "VTW"
    sites: ClassVar[frozenset[Site]] = frozenset({Site.DECODER_LAYER})

    def withdrawal_layer(self, n_layers: int, key: str) -> int:
        """K from the parameters given, checked against this model's L decoder layers."""
        L = n_layers
        pact = {k: getattr(self, k) for k in _PACT_KEYS if getattr(self, k) is not None}
        if self.pruning_loc is not None and pact:
            raise RecipeError(
                f"{key}.{next(iter(pact))}",
                f"give either pruning_loc or PACT's keys ({', '.join(_PACT_KEYS)}), not both; remove one",
            )
        if self.pruning_loc is not None:
            K = self.pruning_loc
            if not is_int(K):
                raise RecipeError(f"{key}.pruning_loc", f"expected an integer, got {type(K).__name__} {K!r}")
            if not 1 <= K <= L - 1:
                raise RecipeError(
                    f"{key}.pruning_loc",
                    f"{K} is outside 1..{L - 1} for this model's {L} decoder layers (0 would give the decoder "
                    f"no image at all, {L} would withdraw nothing)",
                )
            return K
        if not pact:
            raise RecipeError(f"{key}.pruning_loc", "required: the decoder layer before which every image token "
                                                    f"is withdrawn, in 1..{L - 1} (or PACT's {', '.join(_PACT_KEYS)})")
        flag, k0, p = (getattr(self, k) for k in _PACT_KEYS)
        if flag is not None and not isinstance(flag, bool):
            raise RecipeError(f"{key}.withdraw_visual_tokens", f"expected true or false, got {flag!r}")
        if flag is not True:
            raise RecipeError(
                f"{key}.withdraw_visual_tokens",
                "must be true, with VTW_equivalant_layer_for_reduction and equivalent_reduc_percentage_vtw, for "
                "VTW to withdraw anything; or give pruning_loc instead",
            )
        for name, value in zip(_PACT_KEYS[1:], (k0, p)):
            if value is None:
                raise RecipeError(f"{key}.{name}", "required with withdraw_visual_tokens: true (PACT picks the "
                                                   "withdrawal layer from VTW_equivalant_layer_for_reduction K0 "
                                                   "and equivalent_reduc_percentage_vtw p)")
        if not is_int(k0) or not 0 <= k0 <= L:
            raise RecipeError(f"{key}.VTW_equivalant_layer_for_reduction",
                              f"{k0!r} is not a decoder layer in 0..{L} of this model")
        if not is_number(p) or not 0.0 <= p <= 1.0:
            raise RecipeError(f"{key}.equivalent_reduc_percentage_vtw",
                              f"{p!r} is outside [0, 1]; it is the fraction of visual tokens kept at K0")
        K = equivalent_layer(L, k0, float(p))
        if not 1 <= K <= L - 1:
            raise RecipeError(
                f"{key}.equivalent_reduc_percentage_vtw",
                f"K0={k0}, p={p} give the withdrawal layer {K}, outside 1..{L - 1} for this model's {L} decoder "
                f"layers ({'nothing would be withdrawn' if K >= L else 'the decoder would see no image'}); "
                f"change p or K0",
            )
        return K

    def plan(self, geom: Geometry, key: str, entering: Entering) -> Schedule:
        if self.eta is not None and (not is_number(self.eta) or not self.eta > 0):
            raise RecipeError(f"{key}.eta", f"got {self.eta!r}; use a KL threshold above 0 (official: 0.003)")
        K = self.withdrawal_layer(geom.n_layers, key)
        return (Step("vtw", Site.DECODER_LAYER, K, entering.image_tokens, 0, scored=0),)  # nothing is ranked

    def scoring_flops(self, step: Step, geom: Geometry, n_tokens: int) -> int:
        """VTW withdraws every image token without scoring any."""
        return 0

    def apply(
        self, state: TokenState, ctx: DecoderContext, step: Step, forced: Tensor | None = None
    ) -> tuple[TokenState, Tensor]:
        # Nothing is scored: the kept set is empty whatever the tokens. Shape from the batch, so it stays dynamic.
        kept = state.image_start[:, None][:, :0].to(torch.long) if forced is None else forced  # (B, 0)
        return keep_image_tokens(state, kept, step), kept  # (B, T - N, D) text tokens, original positions
