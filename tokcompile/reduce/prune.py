"""Dropping image tokens: the gathers every pruning method shares, before the decoder and inside it."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from tokcompile.reduce.ops import gather_tokens, keep_image_tokens_index
from tokcompile.reduce.schedule import Positions, Step
from tokcompile.reduce.state import ImageTokens, TokenState


def contiguous_positions(valid: Tensor) -> Tensor:
    """1-D positions 0, 1, ... over the real tokens of each row: (B, T) (padding gets 0, never attended)."""
    return (valid.long().cumsum(1) - 1).clamp(min=0)


def renumber(positions: Tensor, valid: Tensor, n_appended: int) -> Tensor:
    """P2: positions (B, T) renumbered 0.. over the valid tokens, except the `n_appended` trailing generated
    tokens of a no-cache reference, which stay at T + t, where cached decode puts them."""
    renumbered = contiguous_positions(valid)  # (B, T)
    if n_appended:
        T = valid.shape[1]
        tail = torch.arange(T, device=valid.device)[None] >= T - n_appended  # (1, T)
        renumbered = torch.where(tail, positions, renumbered)
    return renumbered


def keep_image_tokens(state: TokenState, kept: Tensor, step: Step) -> TokenState:
    """The sequence with only the image tokens `kept` (B, k) (ascending, relative to the current image span)
    and every text token, under the step's position policy.

    P1 (`Positions.KEEP`): survivors keep their position ids. P2 (`Positions.RENUMBER`, 1-D RoPE only):
    positions are renumbered 0.. over the shorter sequence.
    """
    T = state.hidden.shape[1]
    src = keep_image_tokens_index(state.image_start, kept, step.n_in, T)  # (B, T - N + k)
    # The last real token normally follows the image span, so it moves left by the pruned count.
    after = state.last >= state.image_start + step.n_in
    last = torch.where(after, state.last - (step.n_in - step.n_out), state.last)  # (B,)
    valid = gather_tokens(state.valid, src)  # (B, T')
    positions = gather_tokens(state.positions, src)  # (B, T') or (B, T', R): original ids
    if step.positions is Positions.RENUMBER:
        positions = renumber(positions, valid, state.n_appended)
    return replace(
        state,
        hidden=gather_tokens(state.hidden, src),  # (B, T', D)
        positions=positions,
        valid=valid,
        n_image=step.n_out,
        last=last,
        sizes=None if state.sizes is None else gather_tokens(state.sizes, src),  # (B, T')
        side=tuple(gather_tokens(s, src) for s in state.side),  # (B, T', D) each
    )


def keep_tokens(state: ImageTokens, kept: Tensor, hidden: Tensor | None = None) -> ImageTokens:
    """Only the image tokens `kept` (B, k) of a state before the decoder: features, sources and sizes gathered
    alike. `hidden` (B, k, D) stands in for the gathered features when the method computed its own (a merge)."""
    return replace(
        state,
        hidden=gather_tokens(state.hidden, kept) if hidden is None else hidden,  # (B, k, D)
        source=gather_tokens(state.source, kept),  # (B, k)
        sizes=None if state.sizes is None else gather_tokens(state.sizes, kept),  # (B, k)
        features=None if state.features is None else gather_tokens(state.features, kept),  # (B, k, Dv)
        side=tuple(gather_tokens(s, kept) for s in state.side),  # (B, k, D) each
    )


def protected_first(patches: Tensor, n_protected: int) -> Tensor:
    """Kept tower indices: the `n_protected` leading tokens (CLS), then `patches` (B, k) (ascending, already
    offset past them) -> (B, p + k), ascending."""
    head = torch.arange(n_protected, device=patches.device)[None].expand(patches.shape[0], n_protected)  # (B, p)
    return torch.cat([head, patches], dim=1)
