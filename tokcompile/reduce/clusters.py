"""Writing clusters of image tokens into a fixed number of slots inside the decoder.

Clusterings whose cluster count depends on the data (PACT's DBDPC, thresholded pruning) describe their result
as `label` (B, n): for every image token entering the step, the index of its cluster's centre (a centre gives
its own index), or -1 for a token dropped for good. That is the step's parity output (`Output.CLUSTER`) and all
that is needed to rebuild the step's tokens, so eager references can replay it.

The image span then holds `slots` tokens: the clusters first, in their centres' original order (the order the
official code leaves them in), then unused slots marked invalid. Invalid slots are never attended as keys, in
prefill or decode (the cache keeps the validity mask), so the result equals the dynamic method's shorter
sequence; it costs the compute of `slots` tokens. Unused slots count as image tokens of the span, so a later
step that scored them would have to mask them by `valid`; a recipe holds one decoder-side method, so no step
follows one of these today.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from tokcompile.reduce.ops import gather_tokens
from tokcompile.reduce.prune import keep_image_tokens, renumber
from tokcompile.reduce.schedule import Positions, Step
from tokcompile.reduce.state import TokenState


def slot_members(label: Tensor, slots: int) -> tuple[Tensor, Tensor, Tensor]:
    """The slot layout of a clustering.

    Args:
        label: (B, n) centre index of every entering image token, -1 when dropped.
        slots: the step's static slot count (at least the number of centres of any sample).

    Returns:
        src (B, slots) the image token whose place each slot takes (centres, then non-centres), member
        (B, n, slots) bool (token i belongs to slot s's cluster), used (B, slots) bool (the slot holds a cluster).
    """
    B, n = label.shape
    idx = torch.arange(n, device=label.device)[None].expand(B, n)  # (B, n)
    centre = label == idx  # (B, n)
    key = torch.where(centre, idx, n + idx).float()  # centres first in original order, then the others
    src = torch.topk(-key, slots, dim=-1).indices  # (B, slots), key ascending
    used = torch.arange(slots, device=label.device)[None] < centre.sum(-1, keepdim=True)  # (B, slots)
    member = (label[:, :, None] == src[:, None, :]) & (label >= 0)[:, :, None] & used[:, None, :]  # (B, n, S)
    return src, member, used


def write_clusters(state: TokenState, label: Tensor, step: Step, take_mean: bool = True,
                   with_sizes: bool = False, mean_positions: bool = False) -> TokenState:
    """The sequence with the image span replaced by the clusters of `label`, in `step.n_out` slots.

    Args:
        state: the tokens entering the step; its image span holds `step.n_in` tokens.
        label: (B, n_in) centre index of every image token, -1 when dropped.
        take_mean: a cluster is the plain mean of its members' hidden states (else its centre's).
        with_sizes: the clusters carry sizes (members, or the sum of their sizes if they had some), which bias
            attention from here on (proportional attention).
        mean_positions: a cluster sits at the rounded mean of its members' position ids (1-D RoPE), not at its
            centre's.
    """
    n, S = step.n_in, step.n_out
    span = state.image_start[:, None] + torch.arange(n, device=label.device)[None]  # (B, n)
    src, member, used = slot_members(label, S)
    out = keep_image_tokens(state, src, replace(step, positions=Positions.KEEP))  # gathers text and slots
    out_span = state.image_start[:, None] + torch.arange(S, device=label.device)[None]  # (B, S)
    weights = member.float().transpose(1, 2)  # (B, S, n)
    counts = weights.sum(-1)  # (B, S) members of every slot (0 for unused slots)
    hidden = gather_tokens(out.hidden, out_span)  # (B, S, D): the centres' own states
    if take_mean:
        image = gather_tokens(state.hidden, span).float()  # (B, n, D)
        mean = (weights @ image) / counts.clamp(min=1)[..., None]  # (B, S, D)
        hidden = torch.where(used[..., None], mean.to(hidden.dtype), hidden)
    valid = gather_tokens(out.valid, out_span) & used  # (B, S)
    sizes = out.sizes
    if with_sizes or state.sizes is not None:
        entering = torch.ones_like(label, dtype=torch.float) if state.sizes is None else gather_tokens(
            state.sizes, span).float()  # (B, n)
        slot_sizes = torch.where(used, (weights @ entering[..., None])[..., 0], 1.0)  # (B, S)
        base = torch.ones_like(out.valid, dtype=torch.float) if out.sizes is None else out.sizes.float()
        sizes = base.scatter(1, out_span, slot_sizes)  # (B, T'): text 1 (or its own), clusters their sizes
    positions = out.positions
    if mean_positions:
        pos = gather_tokens(state.positions, span).float()  # (B, n)
        mean_pos = torch.round((weights @ pos[..., None])[..., 0] / counts.clamp(min=1))  # (B, S)
        slot_pos = torch.where(used, mean_pos.to(positions.dtype), gather_tokens(positions, out_span))
        positions = positions.scatter(1, out_span, slot_pos)
    valid_all = out.valid.scatter(1, out_span, valid)  # (B, T')
    if step.positions is Positions.RENUMBER:
        positions = renumber(positions, valid_all, state.n_appended)
    return replace(out, hidden=out.hidden.scatter(1, out_span[..., None].expand_as(hidden), hidden),
                   valid=valid_all, positions=positions, sizes=sizes)
