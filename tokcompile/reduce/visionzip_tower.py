"""VisionZip where the projector merges groups of tower tokens (Qwen2-VL, Qwen2.5-VL): LightCompress's
Qwen2.5-VL path (`token_reduction/visionzip.py`: `Qwen2_5_VLVisionAttention_forward`, `merger_hook`,
`prune_qwenv25vl_hook`), at the projector output (`visionzip.py` holds the recipe and the CLIP path).

- Scores come from the tower's last block as it ran (its window mask included): its attention probabilities,
  averaged over heads and summed over the queries (the attention each tower token receives), averaged over the
  tower tokens each image token merged from (Qwen's 2x2 groups), in the processor's token order.
- The key metric is that block's RoPE'd keys averaged over heads and over each group, L2-normalised.
- `dominant` and `contextual` are fractions of the N image tokens, as LightCompress's Qwen path reads them
  (integers of at least 1 are counts): int(dominant·N) dominant tokens by score; max(int(contextual·N), 1)
  targets taken uniformly among the rest (every max(1, R // C)-th, the first C); every other remaining token
  joins the target with the most similar metric (the first on ties), and each target becomes itself PLUS the
  mean of the tokens that joined it.
- The dominant tokens and the targets stay in their original order (LightCompress cuts the sequence with a mask)
  and keep their M-RoPE ids (P0).

Deviations: the dominant top-k ranks by (score descending, index ascending) (`torch.topk` leaves ties open);
scores and the metric are fp32; every sample of a batch picks its own tokens (LightCompress runs the whole batch's
tower tokens as one sequence and prunes with sample 0's span).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from tokcompile.reduce.ops import first_argmax, gather_tokens, rank_desc

if TYPE_CHECKING:
    from torch import Tensor

    from tokcompile.reduce.context import ImageContext
    from tokcompile.reduce.schedule import Step
    from tokcompile.reduce.state import ImageTokens


def counts(n: int, dominant: float, contextual: float) -> tuple[int, int]:
    """(dominant tokens, contextual tokens) of N image tokens: fractions as LightCompress's Qwen path reads them
    (int(d·N), max(int(c·N), 1)); an integer of at least 1 is taken as a count (the LLaVA spelling, on which
    LightCompress's Qwen path would fail)."""
    def one(v: float, least: int) -> int:
        return v if isinstance(v, int) and v >= 1 else max(int(v * n), least)

    return one(dominant, 0), one(contextual, 1)


def zip_merged(state: ImageTokens, ctx: ImageContext, step: Step, n_dominant: int, n_contextual: int,
               forced: Tensor | None) -> tuple[ImageTokens, Tensor]:
    """-> (the D + C kept tokens in original order, (B, N) the output slot of every image token). A replay
    (`forced`) recomputes the choice from the same tower, which it must equal."""
    x = state.hidden  # (B, N, D)
    B, n, _ = x.shape
    D, C = n_dominant, n_contextual
    score = ctx.decision(ctx.received_attention(n))  # (B, N), reported for parity
    metric = ctx.grouped_keys(n)  # (B, N, dv)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    is_dom = rank_desc(score) < D  # (B, N)
    stride = max(1, (n - D) // C)
    pos = (~is_dom).long().cumsum(1) - 1  # (B, N) position among the remaining tokens
    is_tgt = ~is_dom & (pos % stride == 0) & (pos // stride < C)  # (B, N) exactly C per sample
    kept = is_dom | is_tgt  # (B, N)
    slot_of_kept = kept.long().cumsum(1) - 1  # (B, N) slot of every kept token, original order
    order = torch.topk(-torch.where(kept, slot_of_kept, n).float(), D + C, dim=-1).indices  # (B, D+C) ascending
    tgt_idx = torch.topk(-torch.where(is_tgt, pos, n).float(), C, dim=-1).indices  # (B, C) targets in order
    sim = metric @ gather_tokens(metric, tgt_idx).transpose(1, 2)  # (B, N, C)
    best = first_argmax(ctx.decision(sim))  # (B, N) the most similar target
    joins = ~kept  # (B, N) tokens merged into a target
    assign = torch.where(joins, gather_tokens(slot_of_kept, tgt_idx).gather(1, best), slot_of_kept)  # (B, N)
    if forced is not None and not torch.equal(forced, assign):
        raise ValueError("visionzip replay: the tower gives another choice than the one replayed")
    onehot = ((best[..., None] == torch.arange(C, device=x.device)) & joins[..., None]).to(x.dtype)  # (B, N, C)
    members = onehot.sum(1).clamp(min=1)  # (B, C) at least 1: an empty target stays itself
    mean = (onehot.transpose(1, 2) @ x) / members[..., None]  # (B, C, D) mean of each target's joiners
    is_tgt_slot = gather_tokens(is_tgt.long(), order).bool()  # (B, D+C)
    rank_in_tgt = is_tgt_slot.long().cumsum(1) - 1  # (B, D+C) which target a slot holds
    added = torch.where(is_tgt_slot[..., None], gather_tokens(mean, rank_in_tgt.clamp(min=0)), 0.0)  # (B, D+C, D)
    hidden = gather_tokens(x, order) + added  # (B, D+C, D)
    sizes = None
    if state.sizes is not None:
        joined = (onehot.transpose(1, 2) @ state.sizes.to(x.dtype)[..., None])[..., 0]  # (B, C)
        sizes = gather_tokens(state.sizes, order) + torch.where(
            is_tgt_slot, gather_tokens(joined, rank_in_tgt.clamp(min=0)), 0).to(state.sizes.dtype)
    return replace(state, hidden=hidden, source=gather_tokens(state.source, order), sizes=sizes), assign
