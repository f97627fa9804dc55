"""AIM: "Adaptive Inference of Multi-Modal LLMs via Token Merging and Pruning" (Zhong et al., ICCV 2025;
official code LaVi-Lab/AIM, `llava/model/token_merge.py` and `other_packages/transformers/.../qwen2/
modeling_qwen2.py`).

Stage 1, merging before the decoder (`aim_merge.py`, with `merge_ratio`): iterative bipartite merging of the
projected features within one image or within each video frame. `merge_ratio` is the fraction of image tokens
merged away, 1 - 2^-k for k iterations (0.5, 0.75, 0.875, ...). No sizes are carried.

Stage 2, progressive pruning inside the decoder (`ALGORITHMS.md` §6.2): after every decoder layer l, each
token's importance is its PageRank in that layer's attention graph. Per head, M = softmax(logits / τ) over the
causal (and unpruned) keys with τ = 0.1; π starts uniform and takes 5 steps π ← π·M (no damping); the
importance is the RMS of π over the heads. Text and system tokens are protected; the image tokens with the
highest importance survive, `int(N·ρ_l)` of the N image tokens that entered the decoder, from layer l+1 on.
ρ_l comes from a scheduler that compiles to those integer counts when the recipe is resolved:
- `piecewise` (the official code's): 1 up to `prune_start_layer`, then down by 1/(end - start + 1) per layer
  from `prune_start_layer` to 0 at `prune_end_layer` (official, 28 layers: 14 and 21);
- `linear`, `exponential`, `step`, `cosine` (the seed's, with `final_prune_ratio` p at depth L):
  the pruned fraction is p·l/L, p·(2^(l/L) - 1), 0 before L//2 then p, and p·(1 - cos(π·l/L))/2.

The official code only masks pruned tokens as keys, so it saves no compute; here they leave the sequence
(pattern C2: one cache length per change, positions kept, P1), which is exactly masking for every token that
stays. One difference remains and is measured in the tests and the README: the official PageRank walks the
rows of masked tokens too (they are still queries there), and their mass enters at its first step; removed
tokens have no rows here. Further deviations:
- Scores are fp32; ties rank by (importance, index ascending) (`torch.sort` leaves them open). Stage 2's
  importance and stage 1's cosine matrices go through `ctx.decision` (`Step.scored`), so a near-tie in a graph
  is checked by replaying it.
- Padding is neither a row nor a key of the walk, and every sample of a batch keeps its own tokens.
- Stage 1 merges a single image's grid (LLaVA-1.5, Qwen2-VL, Qwen2.5-VL) or each frame of a LLaVA-OneVision
  video at the projector output. Images whose span holds several tiles and row-end tokens (LLaVA-NeXT,
  OneVision images) are refused for it: the official code merges per image, before tiles are packed.
- Stage 2 counts are of the image tokens after stage 1, as the official `keep_num` counts the sequence it sees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from tokcompile.errors import RecipeError
from tokcompile.reduce.aim_merge import merge_iterations, merge_step, merge_steps
from tokcompile.reduce.base import REDUCERS, Entering, is_number
from tokcompile.reduce.ops import topk_sorted
from tokcompile.reduce.prune import keep_image_tokens
from tokcompile.reduce.schedule import Schedule, Site, Step

if TYPE_CHECKING:
    from torch import Tensor

    from tokcompile.models.geometry import Geometry
    from tokcompile.reduce.context import DecoderContext
    from tokcompile.reduce.state import TokenState

SCHEDULERS = ("piecewise", "linear", "exponential", "step", "cosine")


def retain_ratio(scheduler: str, layer: int, n_layers: int, final_prune_ratio: float, start: int, end: int) -> float:
    """ρ_l: the fraction of the decoder's image tokens that survives layer `layer`."""
    L, p, x = n_layers, final_prune_ratio, layer / n_layers
    if scheduler == "piecewise":
        return 1.0 if layer < start else max(0.0, 1.0 - (layer - start + 1) / (end - start + 1))
    pruned = {"linear": p * x, "exponential": p * (2 ** x - 1), "step": 0.0 if layer < L // 2 else p,
              "cosine": p * (1 - math.cos(x * math.pi)) / 2}[scheduler]
    return 1.0 - pruned


def pagerank_importance(logits: Tensor, valid: Tensor, tau: float, iters: int) -> Tensor:
    """(B, H, T, T) raw attention logits of one layer and (B, T) real tokens -> (B, T) importance: per head the
    PageRank of softmax(logits / τ) over causal real keys after `iters` steps from the uniform start, then
    the RMS over heads (fp32)."""
    B, H, T, _ = logits.shape
    causal = torch.ones(T, T, dtype=torch.bool, device=logits.device).tril()  # (T, T)
    allowed = causal[None] & valid[:, None, :] & valid[:, :, None]  # (B, T, T): real rows, real earlier keys
    z = logits.float().masked_fill(~allowed[:, None], float("-inf")) / tau  # (B, H, T, T)
    walk = z.softmax(-1).nan_to_num(0.0)  # (B, H, T, T); padding rows have no key: all zero
    pi = (valid.float() / valid.float().sum(-1, keepdim=True))[:, None, None, :].expand(B, H, 1, T)  # (B, H, 1, T)
    for _ in range(iters):  # static trip count
        pi = pi @ walk  # (B, H, 1, T)
    return pi[:, :, 0].pow(2).mean(1).sqrt()  # (B, T)


@REDUCERS.register("aim")
@dataclass(frozen=True)
class AIMConfig:
    """AIM's in-decoder pruning under the official and the seed's names.

    Args:
        prune_scheduler: piecewise (official), linear, exponential, step or cosine.
        prune_start_layer, prune_end_layer: the piecewise schedule (official 14 and 21 for 28 layers).
        final_prune_ratio: the other schedulers' pruned fraction at depth L (seed default 0.7).
        tau_imp, iters: the PageRank temperature and steps (official 0.1 and 5).
        merge_ratio: stage 1's fraction of image tokens merged away, 1 - 2^-k for k iterations (official code:
            2 iterations, 0.75); none skips stage 1.
    """

    prune_scheduler: str = "piecewise"
    prune_start_layer: int = 14
    prune_end_layer: int = 21
    final_prune_ratio: float = 0.7
    tau_imp: float = 0.1
    iters: int = 5
    merge_ratio: float | None = None

    method: ClassVar[str] = "AIM"
    sites: ClassVar[frozenset[Site]] = frozenset({Site.PROJECTOR_OUT, Site.DECODER_LAYER})

    def sites_used(self) -> frozenset[Site]:
        return self.sites if self.merge_ratio is not None else frozenset({Site.DECODER_LAYER})

    def _check(self, geom: Geometry, key: str) -> None:
        if self.merge_ratio is not None:
            if not is_number(self.merge_ratio) or merge_iterations(self.merge_ratio) is None:
                raise RecipeError(f"{key}.merge_ratio", f"{self.merge_ratio!r} is not 1 - 2^-k: use 0.5, 0.75, 0.875, "
                                                        "... (k halving iterations), or remove it to skip stage 1")
        if self.prune_scheduler not in SCHEDULERS:
            raise RecipeError(f"{key}.prune_scheduler", f"unknown scheduler {self.prune_scheduler!r}; use one of "
                                                        f"{', '.join(SCHEDULERS)}")
        last = geom.n_layers - 1
        s, e = self.prune_start_layer, self.prune_end_layer
        if self.prune_scheduler == "piecewise" and not (isinstance(s, int) and isinstance(e, int) and 0 <= s <= e):
            raise RecipeError(f"{key}.prune_start_layer", f"{s!r}..{e!r} is not a layer range start <= end within "
                                                          f"0..{last}")
        if self.prune_scheduler == "piecewise" and s > last - 1:
            raise RecipeError(f"{key}.prune_start_layer", f"{s} leaves no layer after it to prune for (layers "
                                                          f"0..{last}); use at most {last - 1}")
        if not is_number(self.final_prune_ratio) or not 0.0 <= self.final_prune_ratio <= 1.0:
            raise RecipeError(f"{key}.final_prune_ratio", f"{self.final_prune_ratio!r} is outside [0, 1]")
        if not is_number(self.tau_imp) or not self.tau_imp > 0:
            raise RecipeError(f"{key}.tau_imp", f"{self.tau_imp!r}: use a temperature above 0 (official 0.1)")
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 1:
            raise RecipeError(f"{key}.iters", f"{self.iters!r}: use at least 1 PageRank step (official 5)")

    def plan(self, geom: Geometry, key: str, entering: Entering) -> Schedule:
        self._check(geom, key)
        steps = merge_steps(geom, entering, self.merge_ratio, key) if self.merge_ratio is not None else []
        iterations = len(steps)
        n = n0 = steps[-1].n_out if steps else entering.image_tokens
        for layer in range(geom.n_layers - 1):  # after the last layer nothing is left to prune for
            rho = retain_ratio(self.prune_scheduler, layer, geom.n_layers, self.final_prune_ratio,
                               self.prune_start_layer, self.prune_end_layer)
            k = min(n, int(n0 * rho))
            if k < n:
                # The PageRank importance is ranked (one decision), unless every image token leaves (none).
                steps.append(Step("aim", Site.DECODER_LAYER, layer + 1, n, k, scored=1 if k else 0))
                n = k
        if len(steps) == iterations:
            raise RecipeError(f"{key}.prune_scheduler", f"{self.prune_scheduler} prunes no image token in this "
                                                        f"model's {geom.n_layers} layers; change its parameters")
        return tuple(steps)

    def scoring_flops(self, step: Step, geom: Geometry, n_tokens: int) -> int:
        """Stage 1: the source-destination cosines of every frame or the image (2·(t/2)²·D each). Stage 2: layer
        l-1's queries again (2·T·D·H·d), every head's logits (2·T²·H·d) and the PageRank steps (iters · 2·H·T²)."""
        if step.site is Site.PROJECTOR_OUT:
            count, trailing = geom.frames or (1, 0)
            t = (step.n_in - trailing) // count
            return count * 2 * (t // 2) * ((t + 1) // 2) * geom.hidden_size
        dq, T = geom.n_heads * geom.head_dim, n_tokens
        return 2 * T * geom.hidden_size * dq + 2 * T * T * dq + self.iters * 2 * geom.n_heads * T * T

    def apply(
        self, state: TokenState, ctx: DecoderContext, step: Step, forced: Tensor | None = None
    ) -> tuple[TokenState, Tensor]:
        if step.site is Site.PROJECTOR_OUT:
            return merge_step(state, step, ctx.frames, forced, ctx.decision)
        if forced is not None:
            kept = forced  # eager references replay a selection made earlier
        elif step.n_out == 0:
            kept = state.image_start[:, None][:, :0].to(torch.long)  # (B, 0): every image token leaves
        else:
            prev = ctx.prev_state  # the tokens that entered layer l = step.layer - 1, as its attention saw them
            importance = pagerank_importance(ctx.attention_logits("previous"), prev.valid, self.tau_imp,
                                             self.iters)  # (B, T)
            scores = ctx.decision(importance.gather(1, ctx.image_span(step.n_in)))  # (B, N) fp32
            kept = topk_sorted(scores, step.n_out)  # (B, k), ascending
        return keep_image_tokens(state, kept, step), kept
