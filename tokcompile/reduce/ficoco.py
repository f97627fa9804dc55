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
from functools import cache
from typing import TYPE_CHECKING, ClassVar

import torch

from tokcompile.errors import RecipeError
from tokcompile.reduce import ficoco_l
from tokcompile.reduce.base import REDUCERS, Entering
from tokcompile.reduce.ops import gather_tokens, rank_desc, topk_sorted
from tokcompile.reduce.prune import keep_tokens
from tokcompile.reduce.schedule import Output, Schedule, Site, Step, image_tokens_after_vision

if TYPE_CHECKING:
    from torch import Tensor

    from tokcompile.models.geometry import Geometry
    from tokcompile.reduce.context import VisionContext
    from tokcompile.reduce.state import ImageTokens

PROTECTED = 1  # CLIP's CLS token
DEFAULT_R = 42  # the official tower settings (clip_encoder.py)
DEFAULT_CONTROL_LAYER = 11
BETA = 0.35
QUANTILE = 0.998
WINDOW = 2  # the local penalty's window side, in patches


@cache
def fan_out(t: int) -> int:
    """Targets per discarded token: entries of a length-t row above its 0.998 quantile, as `torch.quantile`
    (linear interpolation, fp32) places it on distinct values."""
    row = torch.arange(t, dtype=torch.float32)
    return int((row > torch.quantile(row, QUANTILE)).sum())


def window_ids(patch: Tensor, side: int) -> Tensor:
    """(B, n) original patch index -> (B, n) its 2x2 window on the side x side grid, or -1 outside every
    window (the last row and column of an odd grid)."""
    per_row = side // WINDOW
    row, col = patch // side, patch % side
    inside = (row < per_row * WINDOW) & (col < per_row * WINDOW)
    return torch.where(inside, (row // WINDOW) * per_row + col // WINDOW, -1)


def keep_scores(logits: Tensor, window: Tensor, n_windows: int) -> Tensor:
    """Filter: (B, t, t) head-averaged attention logits and (B, t-1) patch windows -> (B, t-1) keep scores `u`
    after the local penalty (low: discard first)."""
    c = torch.nn.functional.normalize(logits[:, 0, 1:], dim=-1)  # (B, t-1) CLS row over the patches
    p = torch.nn.functional.normalize(logits[:, 1:, 1:].mean(-1), dim=-1)  # (B, t-1) mean over patch keys
    u = BETA * c - (1 - BETA) * p  # (B, t-1)
    n = u.shape[-1]
    member = window[..., None] == torch.arange(n_windows, device=u.device)  # (B, t-1, W)
    lowest = torch.where(member, u[..., None], float("inf")).amin(1)  # (B, W)
    idx = torch.arange(n, device=u.device)[None, :, None]  # (1, t-1, 1)
    at_min = member & (u[..., None] == lowest[:, None, :])  # (B, t-1, W)
    first = torch.where(at_min, idx, n).amin(1)  # (B, W) lowest index reaching each window's minimum
    penalised = (idx == first[:, None, :]).any(-1)  # (B, t-1); empty windows point past the end
    return torch.where(penalised, torch.where(u > 0, u / 2, u * 2), u)


def top_targets(rows: Tensor, allowed: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k best allowed entries of each row, best first, ties to the lowest index: (B, r, t) logits and
    (B, t) bool -> ((B, r, k) indices, (B, r, k) logits)."""
    t = rows.shape[-1]
    idx = torch.arange(t, device=rows.device)
    cur = rows.masked_fill(~allowed[:, None, :], float("-inf"))  # (B, r, t)
    picks, values = [], []
    for _ in range(k):  # static trip count
        best = cur.amax(-1, keepdim=True)  # (B, r, 1)
        pick = torch.where(cur == best, idx, t).amin(-1)  # (B, r)
        picks.append(pick)
        values.append(best[..., 0])
        cur = cur.masked_fill(idx == pick[..., None], float("-inf"))
    return torch.stack(picks, -1), torch.stack(values, -1)


def ficoco_merge(x: Tensor, logits: Tensor, patch: Tensor, side: int, r: int, k: int,
                 forced: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One block's filter, correlate and compress.

    Args:
        x: (B, t, Dv) tokens after the attention residual, CLS first.
        logits: (B, t, t) head-averaged scaled attention logits of the block, fp32.
        patch: (B, t-1) original patch index of every non-CLS token.
        side: the original patch grid's side.
        r: patches discarded; k: targets per discarded token.
        forced: (B, t-r) kept tower indices to use instead of the filter's (eager references replay them).

    Returns:
        ((B, t-r, Dv) merged kept tokens, (B, t-r) their tower indices, ascending, CLS = 0 first).
    """
    B, t, _ = x.shape
    if forced is None:
        u = keep_scores(logits, window_ids(patch, side), (side // WINDOW) ** 2)  # (B, t-1)
        discard = rank_desc(-u) < r  # (B, t-1): the r lowest scores, ties to the lowest index
    else:
        discard = ~(forced[..., None] == torch.arange(1, t, device=x.device)).any(1)  # (B, t-1)
    dropped = topk_sorted(discard.float(), r) + PROTECTED  # (B, r) tower indices
    survivors = topk_sorted((~discard).float(), t - 1 - r) + PROTECTED  # (B, t-1-r)
    kept = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=x.device), survivors], 1)  # (B, t-r)
    allowed = torch.ones(B, t, dtype=torch.bool, device=x.device)
    allowed[:, 1:] = ~discard  # (B, t): CLS and the kept patches
    rows = logits.gather(1, dropped[..., None].expand(B, r, t))  # (B, r, t)
    targets, target_logits = top_targets(rows, allowed, k)  # (B, r, k)
    weights = target_logits.softmax(-1)  # (B, r, k) = P_i[τ] / Σ P_i[τ'] with P_i = softmax(A[i])
    onehot = targets[..., None] == torch.arange(t, device=x.device)  # (B, r, k, t)
    send = (onehot * weights[..., None]).sum(2).transpose(1, 2).to(x.dtype)  # (B, t, r): weight of i into j
    merged = (x + send @ gather_tokens(x, dropped)) / (1 + send.sum(-1, keepdim=True))  # (B, t, Dv)
    return gather_tokens(merged, kept), kept


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
            steps.append(Step("ficoco", Site.VISION_BLOCK, layer, t, t - r, output=Output.KEPT))
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
        hidden, kept = ficoco_merge(x, logits, state.source[:, p:] - p, ctx.patch_grid[1], r, fan_out(t), forced)
        return keep_tokens(state, kept, hidden), kept  # hidden (B, t - r, Dv): the compressed features
