"""Independent eager reference of FiCoCo-L (AAAI 2026), written the way the official code runs it.

Source read: kawhiiiileo/FiCoCo, `llava/model/language_model/llava_llama.py` (the decoder layer, its SDPA
replacement and the model loop) and `FiCoCo_L.py` (`Filter`, `Correlate`, `Compress`, `merge_ficoco_l`).
What the official code does, in my words:
* Its attention computes `q·kᵀ·scale` for every head (after `repeat_kv`), takes the mean over heads of these
  raw logits BEFORE the causal mask is added (`attn_score`), then runs softmax attention as usual.
* In every decoder layer with index > `control_encoding_layer` (4), after `hidden = residual + attention`
  and before the post-attention norm and MLP, it merges `r` (14) tokens of the "visual" span, which it takes
  to be positions [0, v_token) with v_token = 576 at the first layer and 14 less after every merging layer.
* `Filter`: with A = attn_score, Scores = 0.6·Σ_{j<v} A[i, j] − 0.4·mean_{t≥v} A[i, t] over the span's rows
  (position 0 is protected as a "class token"); `topk(Scores, r)` are merged.
* `Correlate`: C = 0.6·A_VV + 0.4·(A_VX @ A_XV) (X: every position from v on); the diagonal is −inf. The
  fan-out k is the largest number of entries of a merged token's row of C (batch element 0) above its 0.998
  `torch.quantile`. Targets: `topk(softmax(C), k)` per row; weights are those probabilities over their sum.
* `Compress` (mode "sum", sizes all one): `x.scatter_add_` of every merged token times its weights into its
  targets, then the unmerged span tokens are gathered back in their original order; the text is appended.
* Positions: at prefill each layer uses `arange(T_l)` over its current length (P2).

Where this reference differs from the official code, and why (the clean algorithm of ALGORITHMS.md §3.2):
* The span is the true image span (every placeholder position) and X is the text after it; no token is
  protected. The official [0, 576) span and its position-0 protection only fit LLaVA-1.5-7B's prompt, and even
  there they take in the 35 system tokens and leave out the last 35 image tokens.
* Targets are restricted to kept image tokens (the official code may send to itself or to another merged
  token, losing that mass); the 0.998 quantile is taken on C's rows as the official code takes it, before
  that restriction.
* Ties in the filter and among targets rank by (score descending, index ascending); `torch.topk` leaves them
  unspecified.
* Positions: P1 by default (survivors keep their original ids, all M-RoPE rows); `renumber_positions=True`
  gives the official prefill's P2 (1-D RoPE only).
* One unpadded sample, batch 1, fp32, eager attention with an explicit additive causal mask; only the
  prefill's next-token logits (the official decode places new tokens r positions below the cache; not kept).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from tests.references.pyramiddrop import _rotate_half
from tokcompile.reference import eager_attention as _eager

GAMMA, ALPHA, QUANTILE = 0.6, 0.6, 0.998


def head_mean_logits(layer: nn.Module, rotary_emb: nn.Module, h: Tensor, positions: Tensor) -> Tensor:
    """(T, T) mean over heads of q·kᵀ/√d for the hidden states `h` (1, T, D) entering `layer`, unmasked."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    T, d = x.shape[1], attn.head_dim
    q = attn.q_proj(x).view(1, T, -1, d).transpose(1, 2)  # (1, H, T, d)
    k = attn.k_proj(x).view(1, T, -1, d).transpose(1, 2)  # (1, Hkv, T, d)
    cos, sin = rotary_emb(x, positions)
    cos, sin = cos[:, None], sin[:, None]
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # repeat_kv
    return (q[0].float() @ k[0].float().transpose(1, 2) / math.sqrt(d)).mean(0)  # (T, T)


def _stable_top(values: Tensor, k: int) -> Tensor:
    """Indices of the k largest entries of a 1-D tensor, ties to the lowest index."""
    order = sorted(range(values.numel()), key=lambda i: (-float(values[i]), i))
    return torch.tensor(order[:k], dtype=torch.long)


def merge_span(h: Tensor, A: Tensor, start: int, n: int, r: int) -> tuple[Tensor, Tensor]:
    """One layer's Filter, Correlate and Compress on the span [start, start + n): (the shorter (1, T - r, D)
    stream, (n - r,) kept span indices)."""
    T = A.shape[0]
    V = torch.arange(start, start + n)
    X = torch.arange(start + n, T)
    a_vv, a_vx, a_xv = A[V][:, V], A[V][:, X], A[X][:, V]
    scores = GAMMA * a_vv.sum(-1) - (1 - GAMMA) * a_vx.mean(-1)  # (n,)
    merged = _stable_top(scores, r)  # (r,)
    corr = ALPHA * a_vv + (1 - ALPHA) * (a_vx @ a_xv)  # (n, n)
    corr.fill_diagonal_(float("-inf"))
    rows = corr[merged]  # (r, n)
    threshold = torch.quantile(rows, QUANTILE, dim=-1, keepdim=True)
    k = int((rows > threshold).sum(-1).max())
    rows = rows.clone()
    rows[:, merged] = float("-inf")  # clean: targets are kept tokens only
    probs = rows.softmax(-1)  # (r, n)
    x = h[0].clone()  # (T, D)
    span = x[start:start + n].clone()  # (n, D) the span before any recycling
    for i, row in zip(merged.tolist(), probs):
        targets = _stable_top(row, k)
        weights = row[targets] / row[targets].sum()
        for j, w in zip(targets.tolist(), weights):
            x[start + j] += w * span[i]
    kept = torch.tensor([i for i in range(n) if i not in set(merged.tolist())], dtype=torch.long)
    keep_idx = torch.cat([torch.arange(start), start + kept, torch.arange(start + n, T)])
    return x[keep_idx][None], kept


@torch.no_grad()
def ficoco_l_reference(model: nn.Module, adapter: Any, sample: dict[str, Tensor], *, image_token_id: int,
                       r: int, control_encoding_layer: int,
                       renumber_positions: bool = False) -> tuple[Tensor, list[Tensor]]:
    """Next-token logits (V,) and, per merging layer, the kept image tokens (n_l - r,) int64, ascending, as
    indices into the image tokens entering that layer.

    Args:
        model: the HF model (fp32); adapter: its family adapter (`language_model`, `lm_head` and
            `hf_position_ids` are used; the first layer's input is HF's own).
        sample: processor outputs for ONE unpadded sample.
        r, control_encoding_layer: tokens merged in every layer after `control_encoding_layer`.
        renumber_positions: P2 (the official prefill) instead of P1.
    """
    lm = adapter.language_model(model)
    ids = sample["input_ids"][0].tolist()
    start, n = ids.index(image_token_id), ids.count(image_token_id)
    with _eager(model):
        h = model(**sample, output_hidden_states=True, use_cache=False).hidden_states[0]  # (1, T, D)
    positions = adapter.hf_position_ids(model, sample)  # (1, T) or (R, 1, T)
    kept_all = []
    with _eager(model):
        for idx, layer in enumerate(lm.layers):
            T = h.shape[1]
            mask = torch.full((T, T), torch.finfo(h.dtype).min, dtype=h.dtype).triu(1)[None, None]
            rope = lm.rotary_emb(h, positions)
            residual = h
            a = layer.self_attn(layer.input_layernorm(h), attention_mask=mask, position_embeddings=rope)
            h = residual + (a[0] if isinstance(a, tuple) else a)
            if idx > control_encoding_layer:
                A = head_mean_logits(layer, lm.rotary_emb, residual, positions)
                h, kept = merge_span(h, A, start, n, r)
                keep_idx = torch.cat([torch.arange(start), start + kept, torch.arange(start + n, T)])
                positions = (torch.arange(T - r, dtype=positions.dtype)[None] if renumber_positions
                             else positions[..., keep_idx])
                kept_all.append(kept)
                n -= r
            h = h + layer.mlp(layer.post_attention_layernorm(h))
    logits = adapter.lm_head(model)(lm.norm(h))[0, -1]  # (V,)
    return logits.float(), kept_all
