"""PACT's pruning half: EUTI importance scores and the rules that keep image tokens by them (`ALGORITHMS.md` §5
step 1; official `orailix/PACT`, the reduction loop of `modeling_qwen2.py`).

Scores come from the layer of reduction itself, on the hidden states entering it: its input norm and q/k
projections, before RoPE unless `use_cosine_in_token_pruning`. "Non-text" tokens are every real token up to
the last image token (the prefix and the image). Per head, the mean non-text query attends over the non-text
keys (`use_all_non_text_pruning`, else the image keys); the softmax is averaged over heads and, when
`multiply_by_norm`, multiplied by the norm of each token's residual stream. The FastV-style variant
(`use_attention_in_token_pruning`) uses every non-text query and averages over them, optionally causal.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from tokcompile.reduce.ops import gather_tokens, rank_desc

if TYPE_CHECKING:
    from tokcompile.reduce.context import DecoderContext
    from tokcompile.reduce.pact import PACTConfig


def euti_scores(cfg: PACTConfig, ctx: DecoderContext, n: int) -> Tensor:
    """(B, n) importance of every image token, fp32 (model dtype with `do_not_upcast_to_full_precision_for_
    pruning`, as the official matmul)."""
    st = ctx.state
    span = ctx.image_span(n)  # (B, n)
    image_h = gather_tokens(st.hidden, span)  # (B, n, D)
    if cfg.prune_with_norm:
        return image_h.float().norm(p=2, dim=-1)  # (B, n)
    T = st.hidden.shape[1]
    idx = torch.arange(T, device=st.hidden.device)[None]  # (1, T)
    non_text = st.valid & (idx < (st.image_start + n)[:, None])  # (B, T): prefix and image
    is_image = (idx >= st.image_start[:, None]) & (idx < (st.image_start + n)[:, None])  # (B, T)
    keys_in = non_text if cfg.use_all_non_text_pruning else is_image  # (B, T)
    rope = cfg.use_cosine_in_token_pruning
    q = ctx.ops.query(ctx.layer, st.hidden, st.positions, rope=rope)  # (B, H, T, d)
    k = ctx.ops.keys(ctx.layer, st.hidden, st.positions, rope=rope)  # (B, Hkv, T, d)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (B, H, T, d) as repeat_kv
    w = non_text[:, None, :, None].to(q.dtype)  # (B, 1, T, 1)
    if not cfg.use_attention_in_token_pruning:
        q = (q * w).sum(2, keepdim=True) / w.sum(2, keepdim=True)  # (B, H, 1, d): the mean non-text query
    if not cfg.do_not_upcast_to_full_precision_for_pruning:
        q, k = q.float(), k.float()
    logits = (q / math.sqrt(q.shape[-1])) @ k.transpose(-1, -2)  # (B, H, 1 or T, T)
    allowed = keys_in[:, None, None, :]  # (B, 1, 1, T)
    if cfg.use_attention_in_token_pruning and cfg.use_mask_in_use_attention_in_token_pruning:
        causal = idx[0][None, :] <= idx[0][:, None]  # (T, T): key j at or before query i
        allowed = allowed & causal[None, None]  # (B, 1, T, T)
    probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1, dtype=torch.float32).mean(1)  # (B, 1|T, T)
    probs = torch.nan_to_num(probs, nan=0.0)  # a query with no key allowed
    if cfg.use_attention_in_token_pruning:  # the mean over the non-text queries
        rows = non_text.float()[..., None]  # (B, T, 1)
        probs = (probs * rows).sum(1, keepdim=True) / rows.sum(1, keepdim=True)  # (B, 1, T)
    scores = gather_tokens(probs[:, 0], span)  # (B, n)
    if cfg.multiply_by_norm:
        scores = scores.float() * image_h.float().norm(p=cfg.norm_to_use, dim=-1)
    return scores.float()


def quantile(sorted_scores: Tensor, q: float) -> Tensor:
    """torch.quantile's linear interpolation at q over rows already sorted ascending: (B, n) -> (B, 1)."""
    n = sorted_scores.shape[-1]
    rank = np.float32(q) * np.float32(n - 1)  # torch computes the rank in the scores' dtype
    below = int(np.floor(rank))
    above = min(below + 1, n - 1)
    weight = float(rank - np.float32(below))
    lo, hi = sorted_scores[:, below : below + 1], sorted_scores[:, above : above + 1]
    return torch.lerp(lo, hi, weight)


def keep_by_score(cfg: PACTConfig, scores: Tensor, n_keep: int) -> Tensor:
    """(B, n) bool, the image tokens pruning keeps.

    The percentage rule keeps `n_keep` = int(n·λ): the tokens above the n_keep-th largest score and, with
    `avoid_numerical_instability_prune`, ties at it by ascending index up to exactly n_keep; without it (and for
    `prune_with_norm`, which has no tie rule) ties at the threshold are all dropped. The IQR rule keeps the tokens
    above Q1 + alpha·(Q3 - Q1): a count that depends on the data.
    """
    B, n = scores.shape
    if not cfg.prunes():
        return torch.ones_like(scores, dtype=torch.bool)
    if cfg.token_pruning and cfg.use_IQR_in_token_pruning:
        ordered = torch.sort(scores, dim=-1).values  # (B, n) ascending
        q1, q3 = quantile(ordered, 0.25), quantile(ordered, 0.75)
        return scores > q1 + cfg.alpha_IQR * (q3 - q1)
    if cfg.token_pruning and cfg.avoid_numerical_instability_prune:
        return rank_desc(scores) < n_keep
    threshold = torch.topk(scores, n_keep, dim=-1).values[:, -1:]  # (B, 1) the n_keep-th largest
    return scores > threshold
