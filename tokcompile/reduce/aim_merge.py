"""AIM's stage 1 (`aim.py`): iterative bipartite merging of the projected image features, within one image's grid
or within each video frame, never across frames (official `llava/model/token_merge.py`, called per frame on the
pooled video features with r = N₀ // 2, N₀ // 4, ...; `ALGORITHMS.md` §6.1).

Iteration i (1-based) is ToMe's bipartite matching with the features themselves as the metric (cosine): even
tokens are sources, odd ones destinations, each source's best destination is its match, and the r_i = ⌊N₀/2^i⌋
(at most ⌊t/2⌋) best-matched sources merge into their destinations by an equal-weight mean. Both decisions are
taken on the sources-by-destinations cosine matrices alone, which go through `ctx.decision` (`Step.scored` = 1
per iteration: every frame's matrix together), so a graph whose merges differ from eager's at a near-tie is
replayed on its own matrices. The output is the unmerged sources by match strength, then the destinations in
order. N₀ and t count one image's or one frame's tokens; a video's frames merge side by side (each frame's
output in frame order), and the tokens after the frames (LLaVA-OneVision's newline) pass unchanged.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from tokcompile.errors import RecipeError
from tokcompile.reduce.ops import gather_tokens, rank_desc
from tokcompile.reduce.schedule import Output, Site, Step

if TYPE_CHECKING:
    from torch import Tensor

    from tokcompile.models.geometry import Geometry
    from tokcompile.reduce.base import Entering
    from tokcompile.reduce.context import Decide
    from tokcompile.reduce.state import ImageTokens


def merge_iterations(merge_ratio: float) -> int | None:
    """k with merge_ratio = 1 - 2^-k (k >= 1), or None."""
    for k in range(1, 16):
        if abs(merge_ratio - (1 - 2.0 ** -k)) < 1e-9:
            return k
    return None


def merge_steps(geom: Geometry, entering: Entering, merge_ratio: float, key: str) -> list[Step]:
    """One projector-output step per iteration; counts are of the whole span (every frame's r_i at once)."""
    frames = geom.frames
    if frames is None and not geom.one_image_grid:
        raise RecipeError(f"{key}.merge_ratio", f"stage 1 merges within one image's grid or one video frame; "
                                                f"{geom.family} ({geom.media}) puts several tiles and row ends in "
                                                "its span: remove merge_ratio")
    n = entering.image_tokens
    if frames is not None and n != geom.n_image_tokens:
        raise RecipeError(f"{key}.merge_ratio", f"stage 1 merges within each video frame, but an earlier step "
                                                f"changed the span ({n} of {geom.n_image_tokens} tokens): remove "
                                                "one of the two")
    count, trailing = frames or (1, 0)
    t0 = t = (n - trailing) // count  # one image's or one frame's tokens
    steps = []
    for i in range(1, merge_iterations(merge_ratio) + 1):
        r = min(t0 // 2 ** i, t // 2)
        if r < 1:
            raise RecipeError(f"{key}.merge_ratio", f"{merge_ratio} needs more halvings than the {t0} tokens of "
                                                    f"one {'frame' if frames else 'image'} allow")
        steps.append(Step("aim_merge", Site.PROJECTOR_OUT, 0, n, n - count * r, Output.ASSIGN, scored=1))
        n, t = n - count * r, t - r
    return steps


def bipartite_mean_merge(x: Tensor, r: int, forced: Tensor | None = None,
                         decide: Decide | None = None) -> tuple[Tensor, Tensor]:
    """One iteration: (B, t, D) tokens -> ((B, t - r, D) merged tokens, (B, t) the output slot of every entering
    token). `forced` (B, t) replays an earlier assignment; `decide` maps the (B, na, nb) cosine matrix to the one
    to decide on."""
    B, t, D = x.shape
    na = (t + 1) // 2  # sources: even positions; destinations: odd ones
    if forced is None:
        m = torch.nn.functional.normalize(x.float(), dim=-1)  # (B, t, D)
        scores = m[:, 0::2] @ m[:, 1::2].transpose(1, 2)  # (B, na, nb)
        if decide is not None:
            scores = decide(scores)
        best = scores.amax(-1)  # (B, na)
        nb = scores.shape[-1]
        dst = torch.where(scores == best[..., None], torch.arange(nb, device=x.device), nb).amin(-1)  # (B, na)
        rank = rank_desc(best)  # (B, na): match strength, ties to the lower index
        slot_a = torch.where(rank < r, (na - r) + dst, rank - r)  # (B, na)
        slot_b = (na - r) + torch.arange(t // 2, device=x.device)[None].expand(B, t // 2)  # (B, nb)
        assign = torch.stack([slot_a[:, : t // 2], slot_b], -1).reshape(B, -1)  # (B, 2·nb) interleaved
        if t % 2:
            assign = torch.cat([assign, slot_a[:, -1:]], 1)  # (B, t)
    else:
        assign = forced
    onehot = (assign[..., None] == torch.arange(t - r, device=x.device)).to(x.dtype)  # (B, t, t - r)
    merged = (onehot.transpose(1, 2) @ x) / onehot.sum(1)[..., None].clamp(min=1)  # (B, t - r, D)
    return merged, assign


def merge_step(state: ImageTokens, step: Step, frames: tuple[int, int] | None, forced: Tensor | None,
               decision: Decide) -> tuple[ImageTokens, Tensor]:
    """One iteration over the span: every frame (or the one image) merges on its own; -> (the new tokens, (B, n)
    the output slot of every entering token). `decision` is the context's (`ctx.decision`)."""
    count, trailing = frames or (1, 0)
    n, dev = step.n_in, state.hidden.device
    B, _, D = state.hidden.shape
    t = (n - trailing) // count  # tokens per frame entering
    r = (n - step.n_out) // count
    offset = torch.arange(count, device=dev)[:, None] * (t - r)  # (F, 1): each frame's first output slot
    local = None
    if forced is not None:  # replay: back to each frame's own slots
        local = (forced[:, : count * t].reshape(B, count, t) - offset).reshape(B * count, t)
    def decide(scores: Tensor) -> Tensor:  # (B·F, na, nb): every frame's matrix of a sample in one vector
        return decision(scores.reshape(B, count, *scores.shape[1:])).reshape(scores.shape)

    merged, assign = bipartite_mean_merge(state.hidden[:, : count * t].reshape(B * count, t, D), r, local, decide)
    tail = count * (t - r) + torch.arange(trailing, device=dev)  # (trailing,) slots of the tokens after the frames
    assign = torch.cat([(assign.reshape(B, count, t) + offset).reshape(B, count * t),
                        tail[None].expand(B, trailing)], 1)  # (B, n)
    hidden = torch.cat([merged.reshape(B, count * (t - r), D), state.hidden[:, count * t:]], 1)  # (B, n', D)
    # each slot's source: its destination's (the one member at an odd place in its frame), else its only member's
    idx = torch.arange(n, device=dev)  # (n,)
    odd = (idx < count * t) & (idx % t % 2 == 1)  # (n,)
    member = assign[..., None] == torch.arange(step.n_out, device=dev)  # (B, n, n')
    key = torch.where(member, (idx + n * odd)[None, :, None], -1)  # (B, n, n'): destinations first
    representative = key.amax(1) % n  # (B, n')
    return replace(state, hidden=hidden, source=gather_tokens(state.source, representative)), assign
