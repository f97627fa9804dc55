"""Shared pure ops for reducers: tensors in, tensors out, static shapes only.

Nothing here lets a tensor value decide a shape: no boolean-mask indexing, no `nonzero`, no
`masked_scatter`, no `.item()`. Counts are Python ints from the schedule.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def attention_row(q: Tensor, k: Tensor, key_valid: Tensor) -> Tensor:
    """Softmax attention probabilities of one query per sample, in fp32.

    Args:
        q: (B, H, 1, d) queries after RoPE.
        k: (B, Hkv, T, d) keys after RoPE; H must be a multiple of Hkv (GQA).
        key_valid: (B, T) bool, False for padded keys.

    Returns:
        (B, H, T) probabilities; padded keys get 0.
    """
    B, H, _, d = q.shape
    Hkv = k.shape[1]
    qg = q.float().reshape(B, Hkv, H // Hkv, d)  # (B, Hkv, G, d) with H = Hkv*G, grouped as repeat_kv does
    logits = qg @ k.float().transpose(-1, -2) / math.sqrt(d)  # (B, Hkv, G, T)
    logits = logits.reshape(B, H, -1)  # (B, H, T)
    logits = logits.masked_fill(~key_valid[:, None, :], float("-inf"))
    return logits.softmax(dim=-1)


def rank_desc(scores: Tensor) -> Tensor:
    """Rank of every score in its row under (score descending, index ascending): (B, N) with values 0..N-1.

    Ranks are computed by pairwise comparison, so they are distinct and every backend agrees on them even
    when scores tie; a sort would leave tie order to the backend (and `sort(stable=True)` has no ONNX
    lowering). The cost is N² comparisons per sample, small next to a decoder layer.
    """
    s = scores.float()
    N = s.shape[-1]
    idx = torch.arange(N, device=s.device)
    other, me = s[:, None, :], s[:, :, None]  # (B, 1, N) over j, (B, N, 1) over i
    beats = (other > me) | ((other == me) & (idx[None, None, :] < idx[None, :, None]))  # (B, N, N)
    return beats.sum(-1)  # (B, N)


def topk_sorted(scores: Tensor, k: int) -> Tensor:
    """Indices of the k best scores per row under (score descending, index ascending), ascending: (B, k)."""
    rank = rank_desc(scores).float()  # distinct values: top-k of -rank has no ties
    return torch.topk(-rank, k, dim=-1).indices.sort(dim=-1).values  # (B, k)


def keep_image_tokens_index(image_start: Tensor, kept: Tensor, n_image: int, seq_len: int) -> Tensor:
    """Source index of every token of the reduced sequence: text kept, image span replaced by `kept`.

    Args:
        image_start: (B,) first image-token index.
        kept: (B, k) kept image indices relative to the span, ascending.
        n_image: image tokens before the step (N).
        seq_len: sequence length before the step (T).

    Returns:
        (B, T - N + k) indices into the old sequence, ascending per row.
    """
    B, k = kept.shape
    new_len = seq_len - n_image + k
    j = torch.arange(new_len, device=kept.device)[None, :].expand(B, new_len)  # (B, T')
    rel = j - image_start[:, None]  # (B, T')
    after = j + (n_image - k)  # text after the span shifts right by the pruned count
    text = torch.where(rel < 0, j, after)
    if k == 0:  # every image token withdrawn
        return text
    in_span = (rel >= 0) & (rel < k)
    from_kept = image_start[:, None] + kept.gather(1, rel.clamp(0, k - 1))  # (B, T')
    return torch.where(in_span, from_kept, text)


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """Gather along the token axis: x (B, T, ...) and index (B, T') -> (B, T', ...)."""
    shape = index.shape + x.shape[2:]
    idx = index.reshape(*index.shape, *([1] * (x.dim() - 2))).expand(shape)
    return x.gather(1, idx)


def first_argmax(scores: Tensor) -> Tensor:
    """(..., C) -> (...): the index of the largest score along the last axis, the lowest on ties (the rule of
    `torch.argmax`, made explicit so every backend agrees)."""
    C = scores.shape[-1]
    cols = torch.arange(C, device=scores.device)  # (C,)
    best = scores.amax(dim=-1, keepdim=True)  # (..., 1)
    return torch.where(scores == best, cols, C).amin(dim=-1)  # (...)
