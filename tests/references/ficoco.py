"""Independent eager reference for FiCoCo-V, the clean algorithm of ALGORITHMS.md §3.1, written the way the
official code runs it in LLaVA's CLIP tower.

Read: kawhiiiileo/FiCoCo `llava/model/multimodal_encoder/clip_encoder.py` (`FiCoCo_Attention`,
`FiCoCo_CLIPEncoderLayer`: `r = 42`, `control_encoding_layer = 11`, merging in blocks `idx > 11` between the
attention residual and the MLP) and `FiCoCo_V.py` (`Filter`, `Correlate`, `Compress`, `merge_ficoco_v`).

What the official code does per block (batch 1):
* `att_score = mean over heads of bmm(q·scale, kᵀ)`: the scaled logits before softmax, size bias or mask.
* Filter: `cls = att[0, 1:]`, `p2p = att[1:, 1:].mean(-1)`, both `F.normalize`d; `u = 0.35·cls − 0.65·p2p`;
  in every 2x2 window of the 24x24 grid the minimum gets `u/2` (u > 0) or `2u`; the r lowest `u` are discarded.
* Correlate: per discarded row, the number of entries above `torch.quantile(row, 0.998)`, maximised over the
  discarded rows, is k; targets are the top-k of `softmax(att)` in the row, weights renormalised over the k.
* Compress: `kept.scatter_add_(targets, w·x_i)` with sizes starting at 1, then divided by the summed sizes:
  `(x_j + Σ w·x_i) / (1 + Σ w)`.

The clean algorithm (what this reference computes) differs from the official code where ALGORITHMS.md says:
the window scores are this block's (the official map persists across layers and images), the windows follow
each token's original patch (a kept token keeps its cell), targets are kept tokens only (the official code may
pick the token itself or another discarded one), and kept tokens stay in original order with CLS first (the
official code sorts them by score with CLS last). Ties go to the lower index (`torch.sort(stable=True)` and
explicit loops). Then LLaVA's feature layer, CLS dropped, HF's projector and text model on the spliced prompt.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.references.fastervlm import projected_logits


def block_logits(block: nn.Module, h: Tensor) -> Tensor:
    """(t, Dv) tokens entering the block -> (t, t) head mean of bmm(q·scale, kᵀ), as FiCoCo_Attention takes it."""
    attn = block.self_attn
    x = block.layer_norm1(h[None])[0]  # (t, Dv)
    H = attn.num_heads
    q = (attn.q_proj(x) * attn.scale).view(x.shape[0], H, -1).transpose(0, 1)  # (H, t, d)
    k = attn.k_proj(x).view(x.shape[0], H, -1).transpose(0, 1)  # (H, t, d)
    return torch.bmm(q.float(), k.float().transpose(1, 2)).mean(0)  # (t, t)


def ficoco_block(x: Tensor, att: Tensor, patch: list[int], side: int, r: int) -> tuple[Tensor, list[int], int]:
    """Filter, correlate and compress one block for one sample.

    x (t, Dv) after the attention residual, CLS first; att (t, t); patch[i] the original patch of token i + 1.
    Returns (the kept tokens (t - r, Dv) in original order, their indices into x, the fan-out k used)."""
    t = x.shape[0]
    cls = F.normalize(att[0, 1:], p=2, dim=-1)
    p2p = F.normalize(att[1:, 1:].mean(dim=-1), p=2, dim=-1)
    u = (0.35 * cls - 0.65 * p2p).tolist()  # per patch token 0..t-2
    per_row = side // 2
    for w in range(per_row * per_row):  # 2x2 windows of the original grid
        wr, wc = divmod(w, per_row)
        members = [i for i in range(t - 1) if patch[i] // side // 2 == wr and patch[i] % side // 2 == wc
                   and patch[i] // side < per_row * 2 and patch[i] % side < per_row * 2]
        if members:
            i = min(members, key=lambda j: (u[j], j))
            u[i] = u[i] / 2 if u[i] > 0 else u[i] * 2
    order = sorted(range(t - 1), key=lambda j: (u[j], j))
    discard = sorted(order[:r])
    kept = [0] + [i + 1 for i in range(t - 1) if i not in set(discard)]
    rows = att[[i + 1 for i in discard]]  # (r, t)
    quant = torch.quantile(rows, 0.998, dim=-1, keepdim=True)
    k = int((rows > quant).sum(dim=-1).max())
    out = x.clone()
    total = torch.ones(t, dtype=x.dtype)
    kept_set = set(kept)
    for n, i in enumerate(discard):
        prob = torch.softmax(rows[n], dim=-1)  # P_i over all t tokens
        ranked = [j for j in sorted(range(t), key=lambda j: (-prob[j].item(), j)) if j in kept_set][:k]
        weights = prob[ranked] / prob[ranked].sum()
        for j, wgt in zip(ranked, weights):
            out[j] = out[j] + wgt.to(x.dtype) * x[i + 1]
            total[j] = total[j] + wgt.to(x.dtype)
    out = out / total[:, None]
    return out[kept], kept, k


@torch.no_grad()
def ficoco_reference(model: nn.Module, adapter: Any, sample: dict[str, Tensor], *, image_token_id: int, r: int,
                     control_encoding_layer: int) -> tuple[Tensor, list[Tensor], list[int]]:
    """Next-token logits (V,), the kept tower tokens of every merging block (indices into that block's input,
    ascending, CLS 0 first) and the fan-out k of every merging block, for ONE unpadded LLaVA sample."""
    cfg = model.config
    tower = model.model.vision_tower
    vm = getattr(tower, "vision_model", tower)
    h = vm.embeddings(sample["pixel_values"].to(vm.embeddings.patch_embedding.weight.dtype))[0]  # (1+P, Dv)
    h = vm.pre_layrnorm(h[None])[0]
    P = h.shape[0] - 1
    side = int(round(P ** 0.5))
    patch = list(range(P))
    n_run = cfg.vision_config.num_hidden_layers + 1 + cfg.vision_feature_layer  # blocks before the feature layer
    kept_per_block, fan_outs = [], []
    for idx, block in enumerate(vm.encoder.layers[:n_run]):
        att = block_logits(block, h)
        h = h + block.self_attn(block.layer_norm1(h[None]))[0][0]  # attention residual
        if idx > control_encoding_layer:
            h, kept, k = ficoco_block(h, att, patch, side, r)
            patch = [patch[i - 1] for i in kept[1:]]
            kept_per_block.append(torch.tensor(kept))
            fan_outs.append(k)
        h = h + block.mlp(block.layer_norm2(h[None]))[0]
    feats = h[1:]  # the "default" strategy drops CLS
    return projected_logits(model, adapter, sample, feats, image_token_id), kept_per_block, fan_outs
