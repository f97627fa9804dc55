"""FiCoCo-L: "Filter, Correlate, Compress" inside the decoder (AAAI 2026; official code kawhiiiileo/FiCoCo,
`llava/model/language_model/FiCoCo_L.py` and `llava_llama.py`).

In every decoder layer after `control_encoding_layer`, between the attention residual and the MLP, `r` image
tokens are discarded and their content is added to the image tokens that stay (`ALGORITHMS.md` §3.2):
- **Scores.** A = the layer's raw attention logits q·kᵀ/√d averaged over heads, for the whole sequence and
  before any mask (image queries see the text keys after them). V is the current image span, X the text after
  it.
- **Filter.** Redundancy ρ_i = γ·Σ_{j∈V} A_ij − (1−γ)·mean_{t∈X} A_it (γ = 0.6); the `r` image tokens with
  the largest ρ are discarded.
- **Correlate.** C = α·A_VV + (1−α)·A_VX·A_XV (α = 0.6) with −∞ on the diagonal; each discarded token sends
  to the k image tokens its row of softmax(C) prefers, weighted by their probabilities renormalised over the
  k. k counts the entries of a row above its 0.998 quantile, which on distinct values depends only on |V|.
- **Compress.** Additive: x_j ← x_j + Σ_i w_ij·x_i on the residual stream; the discarded tokens are dropped
  and the kept ones stay in their original order.

Layer l caches its T_l tokens (its attention ran before the merge) and layer l+1 caches T_l − r: one cache
group per merging layer. The static form and its deviations from the official code (the clean algorithm):
- V is the true image span of each sample (the official code takes positions [0, 576), which in LLaVA-1.5
  covers the 35 system tokens and misses the last 35 image tokens, and protects position 0 as a "class
  token"); X is the text after it, without padding (and, in the no-cache reference of generation, without
  the generated tokens re-run after the prompt).
- Targets are kept image tokens only (the official code may send to the token itself or to another
  discarded one, and that mass is lost). Ties rank by (score, index ascending); `torch.topk` leaves them open.
- k is fixed at plan time from |V| (the official code counts per row and takes the maximum over the
  discarded tokens: it can differ only where a row has ties at the quantile).
- Positions: survivors keep their position ids (P1). `faithful: true` renumbers them 0.. over the shorter
  sequence at every merge (the official prefill's P2, 1-D RoPE only); the official decode, which places a new
  token r positions below the shortened cache, is not reproduced.
- Scores are fp32 whatever the model dtype; every sample of a batch merges its own tokens. The redundancy and
  the discarded rows of C (before the −∞ diagonal) go through `ctx.decision` (`Step.scored` = 2), so a graph
  whose discards or targets differ from eager's at a near-tie is checked by replaying it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tokcompile.errors import RecipeError
from tokcompile.reduce.ficoco_v import top_targets
from tokcompile.reduce.ops import gather_tokens, rank_desc, topk_sorted
from tokcompile.reduce.schedule import Output, Positions, Site, Step

if TYPE_CHECKING:
    from torch import Tensor

    from tokcompile.models.geometry import Geometry
    from tokcompile.reduce.context import Decide, DecoderContext
    from tokcompile.reduce.state import TokenState

GAMMA = 0.6  # weight of the image-to-image logit sum in the redundancy
ALPHA = 0.6  # weight of the direct image-to-image logits in the correlation
DEFAULT_R = 14  # the official decoder defaults (llava_llama.py)
DEFAULT_CONTROL_LAYER = 4


def plan_steps(geom: Geometry, n: int, r: int, control: int, faithful: bool, key: str, r_key: str,
               layer_key: str) -> list[Step]:
    """One step per decoder layer after `control`, each discarding `r` of the `n` image tokens entering it."""
    if faithful and geom.rope != "1d":
        raise RecipeError(f"{key}.faithful", "the official positions (P2) renumber 1-D RoPE ids; this model's "
                                             "M-RoPE keeps its ids: remove faithful")
    first = control + 1
    if first >= geom.n_layers:
        raise RecipeError(f"{key}.{layer_key}", f"{control} leaves no decoder layer to compress (layers "
                                                f"0..{geom.n_layers - 1}); use at most {geom.n_layers - 2}")
    if r < 1:
        raise RecipeError(f"{key}.{r_key}", "0 discards nothing; use at least 1")
    positions = Positions.RENUMBER if faithful else Positions.KEEP
    steps = []
    for layer in range(first, geom.n_layers):
        if n - r < 1:
            raise RecipeError(f"{key}.{r_key}", f"{r} per layer from decoder layer {first} leaves no image token "
                                                f"by layer {layer} ({n} left); lower it")
        steps.append(Step("ficoco_l", Site.DECODER_MID, layer, n, n - r, Output.KEPT, positions=positions,
                          scored=2))
        n -= r
    return steps


def scoring_flops(step: Step, geom: Geometry, n_tokens: int) -> int:
    """The layer's queries again (2·T·D·H·d), every head's logits (2·T²·H·d), the indirect correlation over
    the text (2·n²·T) and the compress (2·n·r·D), for T tokens in the layer and n image tokens."""
    dq, T, n, r = geom.n_heads * geom.head_dim, n_tokens, step.n_in, step.n_in - step.n_out
    return 2 * T * geom.hidden_size * dq + 2 * T * T * dq + 2 * n * n * T + 2 * n * r * geom.hidden_size


def span_masks(state: TokenState, n: int) -> tuple[Tensor, Tensor]:
    """(B, n) indices of the image span and (B, T) bool of the text after it that the scores read: real
    prompt tokens only (no padding, no generated token re-run after the prompt)."""
    B, T = state.valid.shape
    span = state.image_start[:, None] + torch.arange(n, device=state.valid.device)[None]  # (B, n)
    idx = torch.arange(T, device=state.valid.device)[None]  # (1, T)
    after = (idx >= state.image_start[:, None] + n) & (idx < T - state.n_appended) & state.valid  # (B, T)
    return span, after


def ficoco_l_merge(x: Tensor, logits: Tensor, span: Tensor, text: Tensor, r: int, k: int,
                   forced: Tensor | None = None, decide: Decide | None = None) -> tuple[Tensor, Tensor]:
    """One layer's filter, correlate and compress over the image span.

    Args:
        x: (B, T, D) residual stream after the layer's attention.
        logits: (B, T, T) head-mean raw attention logits of the layer, fp32, unmasked.
        span: (B, n) sequence indices of the image tokens; text: (B, T) bool, the text keys X.
        r: image tokens discarded; k: targets per discarded token.
        forced: (B, n - r) kept image tokens to use instead of the filter's (eager references replay them).
        decide: the context's decision (without `forced`): the redundancy, then the discarded rows of C.

    Returns:
        ((B, T, D) the stream with the kept image tokens compressed, (B, n - r) kept image-span indices,
        ascending).
    """
    decide = decide if forced is None else None
    B, T, D = x.shape
    n = span.shape[1]
    rows = logits.gather(1, span[..., None].expand(B, n, T))  # (B, n, T): image queries
    a_vv = rows.gather(2, span[:, None, :].expand(B, n, n))  # (B, n, n)
    w_text = text.float() / text.float().sum(-1, keepdim=True).clamp(min=1)  # (B, T): mean over X
    if forced is None:
        rho = GAMMA * a_vv.sum(-1) - (1 - GAMMA) * (rows * w_text[:, None, :]).sum(-1)  # (B, n)
        rho = rho if decide is None else decide(rho)
        discard = rank_desc(rho) < r  # (B, n): the r largest, ties to the lowest index
    else:
        discard = ~(forced[..., None] == torch.arange(n, device=x.device)).any(1)  # (B, n)
    dropped = topk_sorted(discard.float(), r)  # (B, r) image-span indices
    kept = topk_sorted((~discard).float(), n - r)  # (B, n - r)
    a_vx = rows * text[:, None, :]  # (B, n, T): image queries on text keys (other keys zero)
    a_xv = logits.gather(2, span[:, None, :].expand(B, T, n)) * text[..., None]  # (B, T, n): text queries
    corr = ALPHA * a_vv + (1 - ALPHA) * (a_vx @ a_xv)  # (B, n, n); its −∞ diagonal is never a kept target
    sent = corr.gather(1, dropped[..., None].expand(B, r, n))  # (B, r, n): the discarded tokens' rows
    targets = top_targets(sent if decide is None else decide(sent), ~discard, k)  # (B, r, k), kept tokens only
    weights = sent.gather(2, targets).softmax(-1)  # (B, r, k) = P_i[τ] / Σ P_i[τ'] with P_i = softmax(C_i)
    onehot = targets[..., None] == torch.arange(n, device=x.device)  # (B, r, k, n)
    send = (onehot * weights[..., None]).sum(2).transpose(1, 2).to(x.dtype)  # (B, n, r): weight of i into j
    image = gather_tokens(x, span)  # (B, n, D)
    image = image + send @ gather_tokens(image, dropped)  # (B, n, D): additive compress
    merged = x.scatter(1, span[..., None].expand(B, n, D), image)  # (B, T, D)
    return merged, kept


def apply_decoder(state: TokenState, ctx: DecoderContext, step: Step, k: int,
                  forced: Tensor | None = None) -> tuple[TokenState, Tensor]:
    """The FiCoCo-L step at its mid-layer site: (the shorter state, (B, n_out) kept image tokens)."""
    from dataclasses import replace

    from tokcompile.reduce.prune import keep_image_tokens

    n, r = step.n_in, step.n_in - step.n_out
    if ctx.keys_here is None or ctx.keys_here.shape[2] != state.hidden.shape[1]:
        raise ValueError("FiCoCo-L runs between a decoder layer's attention and its MLP, over the tokens the "
                         "attention saw")
    span, text = span_masks(state, n)
    merged, kept = ficoco_l_merge(state.hidden, ctx.head_mean_logits(), span, text, r, k, forced, ctx.decision)
    return keep_image_tokens(replace(state, hidden=merged), kept, step), kept
