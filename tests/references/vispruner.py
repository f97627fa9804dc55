"""Independent eager reference for VisPruner (important tokens by [CLS] attention, then diverse tokens by
iterative de-duplication), written the way LightCompress runs it on LLaVA.

Read: ModelTC/LightCompress `llmc/compression/token_reduction/vispruner.py` (registry name `VisPruner`) and its
config `configs/sparsification/methods/VisPruner/vispruner.yml` (`sparse: {vision: {method: TokenReduction,
special: {method: VisPruner, prune_ratio: 0.7778, important_ratio: 0.5}}}`).

What LightCompress does (prefill, LLaVA path):
* A forward hook on the vision tower keeps `attentions[select_layer]` (the selected feature layer, -2 for
  LLaVA-1.5) and, for the "patch" feature, its CLS query row over the patches `[:, :, 0, 1:]` (B, H, P).
* A pre-hook on the projector takes the projector's input `image_features` (B, P, C) (the selected layer's patch
  features) and computes:
  - `T = round(P · (1 - prune_ratio))`, `T_imp = int(T · important_ratio)`, `T_div = T - T_imp`;
  - the head-mean of the CLS row, `argsort(descending)`: the first T_imp are the important tokens, the rest the
    residual candidates in that order;
  - `image_normalized = features / norm`; while `T_div > 0`: `R` candidates, `r = min(8, R - T_div)`, stop
    when `r <= 0`; `a, b` = candidates at even and odd positions of the residual order; `scores = max_j a·b_j`;
    `distinct = argsort(scores, descending)[r:]`; the residual becomes `a[distinct]` (in that order) followed
    by all of `b`;
  - the selected tokens (important + residual) become a boolean mask over the P patches.
* A forward hook on the projector keeps `projected[mask]`: the kept tokens in their original order (P0 in the
  LLM, as the original LLaVA path splices them).

This reference: HF's CLIP tower with eager attention and `output_attentions=True` (through the FasterVLM
reference's `cls_attention`), the loop above with Python-int counts and `torch.sort(stable=True)` (so equal
scores go to the lower index, the tie rule of the static version; LightCompress's `argsort` leaves their order
unspecified), one unpadded sample, scores in fp32 (LightCompress casts the attention to the model dtype), then
HF's projector, `embed_tokens`, text model and `lm_head` on the spliced prompt.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from tests.references.fastervlm import cls_attention, projected_logits


def vispruner_patches(scores: Tensor, features: Tensor, prune_ratio: float, important_ratio: float) -> list[int]:
    """LightCompress's selection for one sample: (P,) CLS scores and (P, C) patch features -> kept patch indices,
    ascending."""
    P = scores.shape[0]
    visual_token_num = round(P * (1 - prune_ratio))
    important_token_num = int(visual_token_num * important_ratio)
    diverse_token_num = visual_token_num - important_token_num
    token_indices = torch.sort(scores, descending=True, stable=True).indices  # (P,)
    important_indices = token_indices[:important_token_num]
    residual_indices = token_indices[important_token_num:]
    normalized = features.float() / features.float().norm(dim=-1, keepdim=True)  # (P, C)
    while diverse_token_num > 0:
        R = residual_indices.shape[0]
        r = min(8, R - diverse_token_num)
        if r <= 0:
            break
        tokens = normalized[residual_indices]  # (R, C)
        a, b = tokens[::2], tokens[1::2]
        if a.shape[0] != b.shape[0] or r > a.shape[0]:
            raise ValueError("LightCompress's pairing fails for this budget (odd candidates or r > R/2)")
        sim = (a @ b.T).max(dim=-1).values  # (R/2,)
        distinct = torch.sort(sim, descending=True, stable=True).indices[r:]
        residual_indices = torch.cat([residual_indices[::2][distinct], residual_indices[1::2]])
    selected = torch.cat([important_indices, residual_indices]) if diverse_token_num > 0 else important_indices
    mask = torch.zeros(P, dtype=torch.bool)
    mask[selected] = True
    return mask.nonzero().flatten().tolist()


@torch.no_grad()
def vispruner_reference(model: nn.Module, adapter: Any, sample: dict[str, Tensor], *, image_token_id: int,
                        prune_ratio: float, important_ratio: float) -> tuple[Tensor, Tensor]:
    """Next-token logits (V,) and the kept vision-tower tokens (T+1,) (int64, ascending, CLS = 0 first, patch p
    at p+1) for ONE unpadded LLaVA sample."""
    scores, hidden = cls_attention(model, sample["pixel_values"])  # (P,), (1+P, Dv)
    kept = vispruner_patches(scores, hidden[1:], prune_ratio, important_ratio)
    logits = projected_logits(model, adapter, sample, hidden[1:][kept], image_token_id)
    return logits, torch.tensor([0] + [p + 1 for p in kept], dtype=torch.long)
