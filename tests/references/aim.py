"""Independent eager reference of AIM's in-decoder pruning (ICCV 2025), written the way the official code runs it:
by masking.

Source read: LaVi-Lab/AIM, `other_packages/transformers/src/transformers/models/qwen2/modeling_qwen2.py`:
`get_importance` and the decoder loop of `Qwen2Model.forward`. What it does, in my words:
* In every layer's attention (eager), `attn_weights = q·kᵀ/√d + causal_mask` in fp32, where the mask also holds
  the keys pruned so far; `get_importance` takes M = softmax(attn_weights / 0.1) per head, starts from the
  uniform π = 1/N over all N positions, applies π ← π·M five times (damping 0), and returns the square root of
  the head mean of π².
* After the layer, every token's importance is overwritten with -1 where it is already masked and with 1.0 for
  the protected tokens (the system prefix and everything after the image span); `keep_num = (N - P)·ρ_l + P`
  with N the full length and P the protected count; the top `int(keep_num)` by importance (a descending sort)
  stay, `attention_mask &= keep`, and the next layer masks the rest as keys. Nothing is removed: the masked
  tokens still run as queries, and positions never change.
* The scheduler: ρ_l = 1 for l < 14, else max(0, 1 - (l - 14 + 1)·0.125) (28 layers); here any per-layer ρ.

* Stage 1 (`llava/model/token_merge.py`, `bipartite_soft_matching_merge`): r = min(r, t // 2); metric = the
  features over their norm; a = even tokens (sources), b = odd ones (destinations); scores = a·bᵀ; each source's
  max and argmax; sources sorted by that max, descending; the first r merge (`scatter_reduce(mean,
  include_self=True)` into their destination), the rest stay; output = unmerged sources in that order, then
  the destinations. Called with r_i = N₀ // 2^i for each iteration i.

Where this reference differs from the official code, and why:
* `walk_masked_rows=False` drops the masked tokens' rows from the PageRank walk (and from its uniform start),
  which is what removing them from the sequence does. The default (True) walks them as the official code does;
  the tests measure how far the two are apart.
* Stage 1 on the image span of the first layer's input (the projected features as HF splices them in), each
  video frame on its own with N₀ its own count (the official code merges the pooled frames as a batch), the
  tokens after the frames (OneVision's newline) unchanged;
  after it, 1-D RoPE positions run contiguously over the shorter prompt and M-RoPE tokens keep the ids of
  their destination (or of themselves), the project's P0 policy; the official code has no M-RoPE.
* Ties in the ranking go to the lower index (stable descending sort); one unpadded sample, batch 1, fp32,
  eager attention with an explicit additive mask; only the prefill's next-token logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from tests.references.pyramiddrop import _rotate_half
from tokcompile.reference import eager_attention as _eager


def _logits(layer: nn.Module, rotary_emb: nn.Module, h: Tensor, positions: Tensor) -> Tensor:
    """(H, T, T) q·kᵀ/√d of `layer` for the hidden states (1, T, D) entering it, fp32, unmasked."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    T, d = x.shape[1], attn.head_dim
    q = attn.q_proj(x).view(1, T, -1, d).transpose(1, 2)
    k = attn.k_proj(x).view(1, T, -1, d).transpose(1, 2)
    cos, sin = rotary_emb(x, positions)
    cos, sin = cos[:, None], sin[:, None]
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return q[0].float() @ k[0].float().transpose(1, 2) / d ** 0.5


def importance(logits: Tensor, key_ok: Tensor, rows: Tensor, tau: float = 0.1, iters: int = 5) -> Tensor:
    """(T,) PageRank importance, official `get_importance` on (H, T, T) logits with the keys `key_ok` (T, T)
    allowed; only the rows `rows` (T,) bool take part in the walk."""
    H, T, _ = logits.shape
    z = logits.masked_fill(~key_ok[None], float("-inf")) / tau
    M = torch.softmax(z, dim=-1).nan_to_num(0.0) * rows[None, :, None]  # (H, T, T)
    pi = rows.float()[None, None, :].expand(H, 1, T) / rows.sum()
    for _ in range(iters):
        pi = pi @ M
    return pi[:, 0].pow(2).mean(0).sqrt()


def official_merge(x: Tensor, r: int, index: Tensor) -> tuple[Tensor, Tensor]:
    """`bipartite_soft_matching_merge` on (t, D) features; also carries each output token's representative
    original index (the destination's, or the unmerged source's own) from `index` (t,)."""
    t = x.shape[0]
    r = min(r, t // 2)
    m = x / x.norm(dim=-1, keepdim=True)
    a, b = m[0::2], m[1::2]
    scores = a.float() @ b.float().T  # (na, nb)
    node_max = scores.max(-1).values
    node_idx = torch.tensor([min(j for j in range(scores.shape[1]) if scores[i, j] == node_max[i])
                             for i in range(scores.shape[0])])
    edge = sorted(range(a.shape[0]), key=lambda i: (-float(node_max[i]), i))
    unm, src = edge[r:], edge[:r]
    xa, xb = x[0::2], x[1::2].clone()
    sums, counts = xb.clone(), torch.ones(xb.shape[0])
    for i in src:
        sums[node_idx[i]] += xa[i]
        counts[node_idx[i]] += 1
    dst = sums / counts[:, None]
    out = torch.cat([xa[unm], dst])
    rep = torch.cat([index[0::2][unm], index[1::2]])
    return out, rep


@torch.no_grad()
def aim_reference(model: nn.Module, adapter: Any, sample: dict[str, Tensor], *, image_token_id: int,
                  retain: Sequence[float], walk_masked_rows: bool = True, merge_iterations: int = 0,
                  frames: tuple[int, int] | None = None) -> tuple[Tensor, list[Tensor], Tensor]:
    """Next-token logits (V,), the image tokens (indices into the image span after stage 1, ascending) still
    unmasked after each layer whose count drops, and stage 1's representative of each merged token (indices into
    the original span). `retain[l]` is ρ_l, applied after layer l, of the image tokens after stage 1."""
    lm = adapter.language_model(model)
    ids = sample["input_ids"][0].tolist()
    start, n = ids.index(image_token_id), ids.count(image_token_id)
    with _eager(model):
        h = model(**sample, output_hidden_states=True, use_cache=False).hidden_states[0]  # (1, T, D)
    positions = adapter.hf_position_ids(model, sample)
    rep = torch.arange(n)
    if merge_iterations:  # per frame (the official code merges a video's frames as a batch), then the rest
        count, trailing = frames or (1, 0)
        n0 = (n - trailing) // count
        parts = []
        for f in range(count):
            feats, idx = h[0, start + f * n0:start + (f + 1) * n0], rep[f * n0:(f + 1) * n0]
            for i in range(1, merge_iterations + 1):
                feats, idx = official_merge(feats, n0 // 2 ** i, idx)
            parts.append((feats, idx))
        feats = torch.cat([p[0] for p in parts] + [h[0, start + count * n0:start + n]])
        rep = torch.cat([p[1] for p in parts] + [rep[count * n0:]])
        keep = torch.cat([torch.arange(start), start + rep, torch.arange(start + n, h.shape[1])])
        h = torch.cat([h[:, :start], feats[None], h[:, start + n:]], dim=1)
        positions = (torch.arange(h.shape[1])[None] if positions.dim() == 2 else positions[..., keep])
        n = feats.shape[0]
    T = h.shape[1]
    alive = torch.ones(T, dtype=torch.bool)  # keys not pruned
    image = torch.zeros(T, dtype=torch.bool)
    image[start:start + n] = True
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    rope = lm.rotary_emb(h, positions)
    kept_after: list[Tensor] = []
    count = n
    with _eager(model):
        for idx, layer in enumerate(lm.layers):
            key_ok = causal & alive[None, :]
            mask = torch.zeros(T, T).masked_fill(~key_ok, torch.finfo(torch.float32).min)[None, None]
            logits = _logits(layer, lm.rotary_emb, h, positions)
            o = layer(h, attention_mask=mask, position_embeddings=rope)
            h = o[0] if isinstance(o, tuple) else o
            if idx == len(lm.layers) - 1:
                break
            keep_num = int(n * retain[idx])
            if keep_num >= count:
                continue
            rows = torch.ones(T, dtype=torch.bool) if walk_masked_rows else alive
            score = importance(logits, key_ok, rows)
            score = torch.where(image & alive, score, torch.full_like(score, -1.0))  # only live image tokens rank
            order = sorted(range(T), key=lambda i: (-float(score[i]), i))
            keep = set(order[:keep_num]) if keep_num else set()
            alive = alive & (~image | torch.tensor([i in keep for i in range(T)]))
            count = keep_num
            live = torch.nonzero(alive[start:start + n]).flatten()  # span indices still alive
            kept_after.append(live)
    logits = adapter.lm_head(model)(lm.norm(h))[0, -1]
    return logits.float(), kept_after, rep
