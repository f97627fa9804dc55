"""Independent eager reference of SparseVLM as LightCompress runs it (`llmc/compression/token_reduction/
sparsevlm.py`, registered as 'SparseVLM'; config `configs/sparsification/methods/SparseVLM/sparsevlm.yml`:
`pruning_loc: [2, 6, 15]`, `reduction_ratio: 0.6667`, `merge_flag: True` under `sparse.special`).

What LightCompress does (prefill, batch 1, no padding):
* A pre-hook on the language model takes `inputs_embeds`: v = the image rows, t = every token after the image;
  `m_v_t = (v @ tᵀ).softmax(2).mean(1)`; the raters are `torch.where(m_v_t > m_v_t.mean())`.
* `retained_tokens = round(N·(1 − reduction_ratio))`; `update_list` fills the tables: with pruning_loc
  [2, 6, 15], 192 -> [300, 200, 110], 128 -> [303, 110, 36], 64 -> [66, 30, 17]; with other layers and both
  flags, one stage: 192 -> [180], 128 -> [114], 64 -> [48], and fractions 960 -> [0.3125], 640 -> [0.1979],
  320 -> [0.0833], 160 -> [0.0261] keyed by round((1 − ratio)·2880).
* A forward hook on each pruning layer's attention recomputes its probabilities: q, k with RoPE, q·kᵀ/√d plus
  a causal bias, softmax; `attn_postprocess_topk` averages over heads, takes rows = raters (offset to the
  current text start) and columns = the current image tokens, averages over the rows, and keeps the top
  `min(count, v_token_num − 1)` (a count below 1 times v_token_num).
* The layer's forward hook then, with `merge_flag`: the pruned image tokens' scores, top ⌊0.3·pruned⌋ + 1 of
  them (`topk`, best first) taken from the layer's OUTPUT; `cluster_and_merge` with ⌊m/10⌋ + 1 clusters:
  distances ‖x_i − x_j‖/√C, density exp(−mean of the k = clusters smallest squared distances) + 1e-6·rand,
  δ = the distance to the nearest denser token (else the largest distance), centres = topk(δ·density),
  members to their nearest centre (argmin), centres to themselves, each cluster Σ x / (count + 1e-6).
  New sequence: prefix, kept image tokens (ascending), the clusters (centre order), the text. RoPE cos/sin
  are `index_select`ed with the kept indices and the centres' indices (P1: a cluster sits at its centre's
  position); layers after read them through `read_parameter_hook`.

This reference: HF's forward for the input embeddings, then HF's decoder layers one by one with eager
attention (the attention module's own probabilities, captured by a hook), the hooks' arithmetic in plain
Python/torch on one unpadded sample, fp32. Differences from LightCompress, each the project-wide convention:
ties go to the lower index (stable sorts; `torch.topk` leaves them open); the density noise is off and the
recycled tokens are clustered in image order (LightCompress: best score first), so DPC-kNN's ties (every
density ties when one cluster is formed) go to the lower image index instead of to the noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from tests.references.randomprune import causal_additive
from tokcompile.reference import eager_attention

TABLES_THREE = {192: [300, 200, 110], 128: [303, 110, 36], 64: [66, 30, 17]}
TABLES_ONE = {192: [180], 128: [114], 64: [48], 960: [0.3125], 640: [0.1979], 320: [0.0833], 160: [0.0261]}
TABLES_ONE_PRUNE = {192: [192], 128: [128], 64: [64], 960: [0.3333], 640: [0.2222], 320: [0.1111], 160: [0.0555]}


def _best(values: Tensor, k: int) -> list[int]:
    """Indices of the k largest values, best first, ties to the lower index."""
    return torch.sort(values, descending=True, stable=True).indices[:k].tolist()


def table_row(n: int, locs: Sequence[int], reduction_ratio: float, merge_flag: bool) -> list[float]:
    """`update_list` and `attn_postprocess_topk`'s lookup."""
    retained = round(n * (1 - reduction_ratio))
    if list(locs) == [2, 6, 15]:
        tables = TABLES_THREE
    else:
        tables = TABLES_ONE if merge_flag else TABLES_ONE_PRUNE
    return tables[retained] if retained in (192, 128, 64) else tables[round((1 - reduction_ratio) * 2880)]


def cluster_and_merge(x: Tensor, cluster_num: int) -> tuple[Tensor, list[int], list[int]]:
    """x (M, C) -> (merged (c, C), centres (c,) best first, each token's cluster (M,)), noise off."""
    M, C = x.shape
    dist = (x[:, None, :] - x[None, :, :]).norm(dim=-1, p=2) / C**0.5  # (M, M)
    nearest = torch.sort(dist, dim=-1).values[:, :cluster_num]
    density = (-(nearest**2).mean(dim=-1)).exp()  # (M,)
    mask = (density[None, :] > density[:, None]).to(x.dtype)  # [i, j]: j denser
    dist_max = dist.max()
    delta = (dist * mask + dist_max * (1 - mask)).min(dim=-1).values
    centres = _best(delta * density, cluster_num)
    cluster = dist[centres].argmin(dim=0).tolist()  # (M,) nearest centre, first on ties
    for c, i in enumerate(centres):
        cluster[i] = c
    counts = [cluster.count(c) for c in range(cluster_num)]
    merged = torch.zeros(cluster_num, C, dtype=x.dtype)
    for i in range(M):
        merged[cluster[i]] += x[i] * (1.0 / torch.tensor(counts[cluster[i]] + 1e-6, dtype=x.dtype))
    return merged, centres, cluster


@torch.no_grad()
def sparsevlm_reference(model: nn.Module, adapter: Any, sample: dict[str, Tensor], *, image_token_id: int,
                        pruning_loc: Sequence[int], reduction_ratio: float | None = None, merge_flag: bool = True,
                        stage_tokens: Sequence[float] | None = None) -> tuple[Tensor, list[Tensor]]:
    """SparseVLM's next-token logits (V,) and, per stage, every entering image token's output slot (kept tokens
    0..k-1 ascending, recycled tokens k + their cluster, others -1) for ONE unpadded sample."""
    lm = adapter.language_model(model)
    ids = sample["input_ids"][0]
    image_pos = torch.nonzero(ids == image_token_id).flatten()
    v_start, n = int(image_pos[0]), image_pos.shape[0]
    with eager_attention(model):
        h = model(**sample, output_hidden_states=True).hidden_states[0]  # (1, T, D) the input embeddings
    emb = h[0]
    m_v_t = (emb[v_start:v_start + n] @ emb[v_start + n:].T).softmax(1).mean(0)  # (T_text,)
    raters = torch.where(m_v_t > m_v_t.mean())[0]
    row = list(stage_tokens) if stage_tokens is not None else table_row(n, pruning_loc, reduction_ratio, merge_flag)
    positions = adapter.hf_position_ids(model, sample)  # (1, T) or (R, 1, T)
    captured: list[Tensor] = []
    slots: list[Tensor] = []
    v_num = n
    with eager_attention(model):
        for i, layer in enumerate(lm.layers):
            rope = lm.rotary_emb(h, positions)
            hook = layer.self_attn.register_forward_hook(lambda mod, args, out: captured.append(out[1]))
            try:
                o = layer(h, attention_mask=causal_additive(h.shape[1], h.dtype), position_embeddings=rope,
                          position_ids=positions)
            finally:
                hook.remove()
            h = o[0] if isinstance(o, tuple) else o
            attn = captured.pop()
            if i not in pruning_loc:
                continue
            stage = list(pruning_loc).index(i)
            text_start = v_start + v_num
            score = attn[0].mean(0)[text_start + raters][:, v_start:text_start].float().mean(0)  # (v_num,)
            count = row[stage]
            k = min(round(count * v_num) if count < 1 else int(count), v_num - 1)
            kept = sorted(_best(score, k))
            slot = torch.full((v_num,), -1, dtype=torch.long)
            slot[kept] = torch.arange(k)
            pruned = [j for j in range(v_num) if j not in set(kept)]
            pieces = [h[:, :v_start], h[:, [v_start + j for j in kept]]]
            index = list(range(v_start)) + [v_start + j for j in kept]
            if merge_flag and pruned:
                m = int(len(pruned) * 0.3) + 1
                recycled = sorted(pruned[j] for j in _best(score[pruned], m))  # image order: ties to the lower
                c = int(m / 10) + 1
                merged, centres, cluster = cluster_and_merge(h[0, [v_start + j for j in recycled]], c)
                pieces.append(merged[None])
                index += [v_start + recycled[j] for j in centres]
                slot[recycled] = k + torch.tensor(cluster)
                v_num = k + c
            else:
                v_num = k
            pieces.append(h[:, text_start:])
            index += list(range(text_start, h.shape[1]))
            h = torch.cat(pieces, dim=1)
            positions = positions[..., index]  # P1: kept tokens and centres keep their ids
            slots.append(slot)
    logits = adapter.lm_head(model)(lm.norm(h))[0, -1]
    return logits.float(), slots
