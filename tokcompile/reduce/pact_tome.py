"""ToMe inside the decoder, as PACT's `use_tome` baseline runs it (official `TOME`, `bipartite_soft_matching`,
`merge_connected_components` in orailix/PACT `transformers/PACT/utils.py`, and the `use_tome` branch of its
reduction loop).

Before every decoder layer l, the current image tokens split into A (even positions of the span) and B (odd);
each A token's most similar B token (cosine of that layer's clustering vectors, RoPE'd keys by default) is its
match, and the r_l A tokens with the most similar matches merge into them. Merged tokens are size-weighted means
at their B token's place; every other token stays, in original order, with its position id (P1). Sizes bias
attention (log size) in that layer and every later one, in prefill and decode.

The schedule is static: with L layers, N image tokens, p = `perc_tokeep_tome_total` and L_eq =
`tome_equivalant_layer_for_reduction`, keep = 1 − (1 − p)·(L − L_eq)/L, r₀ = 6·L·(1 − keep)/((L + 1)(2L + 1))·N
(fp32, as the official tensor arithmetic), r_l = int(r₀·(L − l)/L) + 1, clamped to [0, n_l // 2 − 2]. Layers
with r_l = 0 have no step. Sizes are exact counts (the official code stores them as fp16 logarithms between
layers, which rounds them).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from tokcompile.reduce.ops import gather_tokens, rank_desc, topk_sorted
from tokcompile.reduce.prune import keep_image_tokens

if TYPE_CHECKING:
    from torch import Tensor

    from tokcompile.reduce.context import Decide
    from tokcompile.reduce.schedule import Step
    from tokcompile.reduce.state import TokenState


def merges_per_layer(n: int, n_layers: int, keep_total: float, equivalent_layer: int) -> list[int]:
    """r_l for every decoder layer, as the official schedule computes it (see the module docstring)."""
    keep = 1 - (1 - keep_total) * ((n_layers - equivalent_layer) / n_layers)
    r0 = np.float32(6 * n_layers * (1 - keep) / ((n_layers + 1) * (2 * n_layers + 1))) * np.float32(n)
    out = []
    for layer in range(n_layers):
        r = int(np.float32(r0) * np.float32((n_layers - layer) / n_layers)) + 1
        r = max(min(r, n // 2 - 2), 0)
        out.append(r)
        n -= r
    return out


def tome_labels(x: Tensor, r: int, decide: Decide | None = None) -> Tensor:
    """(B, n) the token each image token merges into (itself unless it is one of the r merged A tokens).

    x: (B, n, F) the clustering vectors of the image span; A = even positions, B = odd. decide: maps the
    (B, nA, nB) similarities (both decisions follow from them) to the ones decided on (`ctx.decision`)."""
    B, n, _ = x.shape
    unit = F.normalize(x.float(), dim=-1)  # (B, n, F)
    a, b = unit[:, 0::2], unit[:, 1::2]  # (B, nA, F), (B, nB, F)
    sim = a @ b.transpose(1, 2)  # (B, nA, nB)
    sim = sim if decide is None else decide(sim)
    best, match = sim.amax(-1), sim.argmax(-1)  # (B, nA): the most similar B (first on ties)
    merged = rank_desc(best) < r  # (B, nA): the r most similar A tokens (ties to the lower index)
    label = torch.arange(n, device=x.device)[None].expand(B, n)  # (B, n)
    a_pos = label[:, 0::2]  # (B, nA)
    return label.scatter(1, a_pos, torch.where(merged, 2 * match + 1, a_pos))


def labels_from_slots(assign: Tensor) -> Tensor:
    """The labels an assignment (B, n) of output slots came from: an A (even) token that shares its slot with a
    B (odd) token merged into it (B tokens always stay)."""
    B, n = assign.shape
    idx = torch.arange(n, device=assign.device)[None].expand(B, n)
    odd = (idx % 2 == 1)[:, None, :]  # (1, 1, n)
    joins = (assign[:, :, None] == assign[:, None, :]) & odd & (idx % 2 == 0)[:, :, None]  # (B, n, n)
    target = torch.where(joins, idx[:, None, :], n).amin(-1)  # (B, n): the odd token sharing the slot, or n
    return torch.where(target < n, target, idx)


def tome_step(state: TokenState, x: Tensor | None, step: Step, forced: Tensor | None = None,
              decide: Decide | None = None) -> tuple[TokenState, Tensor]:
    """Merge step.n_in − step.n_out image tokens: (the new state, (B, n_in) output slot of every image token).

    x: (B, n_in, F) the clustering vectors of the image span (unused when `forced` replays an assignment)."""
    n, k = step.n_in, step.n_out
    B = state.hidden.shape[0]
    dev = state.hidden.device
    idx = torch.arange(n, device=dev)[None].expand(B, n)
    label = tome_labels(x, n - k, decide) if forced is None else labels_from_slots(forced)  # (B, n)
    stays = label == idx  # (B, n): the B tokens and the unmerged A tokens
    kept = topk_sorted(stays.float(), k)  # (B, k) ascending
    slot = stays.long().cumsum(1) - 1  # (B, n): slot of each staying token
    assign = slot.gather(1, label)  # (B, n): slot of every token's destination
    span = state.image_start[:, None] + idx  # (B, n)
    sizes = torch.ones(B, n, device=dev) if state.sizes is None else gather_tokens(state.sizes, span).float()
    onehot = (assign[:, :, None] == torch.arange(k, device=dev)).float() * sizes[..., None]  # (B, n, k)
    total = onehot.sum(1)  # (B, k) the merged sizes
    image = gather_tokens(state.hidden, span).float()  # (B, n, D)
    merged = (onehot.transpose(1, 2) @ image) / total[..., None]  # (B, k, D) size-weighted means
    out = keep_image_tokens(state, kept, step)
    out_span = state.image_start[:, None] + torch.arange(k, device=dev)[None]  # (B, k)
    hidden = out.hidden.scatter(1, out_span[..., None].expand_as(merged), merged.to(out.hidden.dtype))
    base = torch.ones_like(out.valid, dtype=torch.float) if out.sizes is None else out.sizes.float()
    return replace(out, hidden=hidden, sizes=base.scatter(1, out_span, total)), assign
