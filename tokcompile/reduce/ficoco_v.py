"""FiCoCo-V's filter, correlate and compress for one vision block (`ficoco.py` has the method, its recipe keys
and its deviations from the official code).

Both of a block's decisions go through the context's decision (`Step.scored` = 2): the keep scores before the
local penalty (which follows from them), then the attention logits of the discarded tokens' rows, from which
their targets are picked. A graph whose discards or targets differ from eager's at a near-tie is replayed on its
own numbers; a target shows in no index output, only in the merged features.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

import torch

from tokcompile.reduce.ops import gather_tokens, rank_desc, topk_sorted

if TYPE_CHECKING:
    from torch import Tensor

    from tokcompile.reduce.context import Decide

PROTECTED = 1  # CLIP's CLS token
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


def keep_scores(logits: Tensor, window: Tensor, n_windows: int, decide: Decide | None = None) -> Tensor:
    """Filter: (B, t, t) head-averaged attention logits and (B, t-1) patch windows -> (B, t-1) keep scores `u`
    after the local penalty (low: discard first). `decide` maps the scores before the penalty to the ones to
    decide on."""
    c = torch.nn.functional.normalize(logits[:, 0, 1:], dim=-1)  # (B, t-1) CLS row over the patches
    p = torch.nn.functional.normalize(logits[:, 1:, 1:].mean(-1), dim=-1)  # (B, t-1) mean over patch keys
    u = BETA * c - (1 - BETA) * p  # (B, t-1)
    if decide is not None:
        u = decide(u)
    n = u.shape[-1]
    member = window[..., None] == torch.arange(n_windows, device=u.device)  # (B, t-1, W)
    lowest = torch.where(member, u[..., None], float("inf")).amin(1)  # (B, W)
    idx = torch.arange(n, device=u.device)[None, :, None]  # (1, t-1, 1)
    at_min = member & (u[..., None] == lowest[:, None, :])  # (B, t-1, W)
    first = torch.where(at_min, idx, n).amin(1)  # (B, W) lowest index reaching each window's minimum
    penalised = (idx == first[:, None, :]).any(-1)  # (B, t-1); empty windows point past the end
    return torch.where(penalised, torch.where(u > 0, u / 2, u * 2), u)


def top_targets(rows: Tensor, allowed: Tensor, k: int) -> Tensor:
    """The k best allowed entries of each row, best first, ties to the lowest index: (B, r, t) logits and
    (B, t) bool -> (B, r, k) indices."""
    t = rows.shape[-1]
    idx = torch.arange(t, device=rows.device)
    cur = rows.masked_fill(~allowed[:, None, :], float("-inf"))  # (B, r, t)
    picks = []
    for _ in range(k):  # static trip count
        best = cur.amax(-1, keepdim=True)  # (B, r, 1)
        pick = torch.where(cur == best, idx, t).amin(-1)  # (B, r)
        picks.append(pick)
        cur = cur.masked_fill(idx == pick[..., None], float("-inf"))
    return torch.stack(picks, -1)


def ficoco_merge(x: Tensor, logits: Tensor, patch: Tensor, side: int, r: int, k: int,
                 forced: Tensor | None = None, decide: Decide | None = None) -> tuple[Tensor, Tensor]:
    """One block's filter, correlate and compress.

    Args:
        x: (B, t, Dv) tokens after the attention residual, CLS first.
        logits: (B, t, t) head-averaged scaled attention logits of the block, fp32.
        patch: (B, t-1) original patch index of every non-CLS token.
        side: the original patch grid's side.
        r: patches discarded; k: targets per discarded token.
        forced: (B, t-r) kept tower indices to use instead of the filter's (eager references replay them).
        decide: the context's decision (without `forced`): the keep scores, then the discarded rows' logits.

    Returns:
        ((B, t-r, Dv) merged kept tokens, (B, t-r) their tower indices, ascending, CLS = 0 first).
    """
    B, t, _ = x.shape
    decide = decide if forced is None else None  # a replayed selection decides nothing
    if forced is None:
        u = keep_scores(logits, window_ids(patch, side), (side // WINDOW) ** 2, decide)  # (B, t-1)
        discard = rank_desc(-u) < r  # (B, t-1): the r lowest scores, ties to the lowest index
    else:
        discard = ~(forced[..., None] == torch.arange(1, t, device=x.device)).any(1)  # (B, t-1)
    dropped = topk_sorted(discard.float(), r) + PROTECTED  # (B, r) tower indices
    survivors = topk_sorted((~discard).float(), t - 1 - r) + PROTECTED  # (B, t-1-r)
    kept = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=x.device), survivors], 1)  # (B, t-r)
    allowed = torch.ones(B, t, dtype=torch.bool, device=x.device)
    allowed[:, 1:] = ~discard  # (B, t): CLS and the kept patches
    rows = logits.gather(1, dropped[..., None].expand(B, r, t))  # (B, r, t)
    targets = top_targets(rows if decide is None else decide(rows), allowed, k)  # (B, r, k)
    weights = rows.gather(2, targets).softmax(-1)  # (B, r, k) = P_i[τ] / Σ P_i[τ'] with P_i = softmax(A[i])
    onehot = targets[..., None] == torch.arange(t, device=x.device)  # (B, r, k, t)
    send = (onehot * weights[..., None]).sum(2).transpose(1, 2).to(x.dtype)  # (B, t, r): weight of i into j
    merged = (x + send @ gather_tokens(x, dropped)) / (1 + send.sum(-1, keepdim=True))  # (B, t, Dv)
    return gather_tokens(merged, kept), kept
