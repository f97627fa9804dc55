"""Independent eager reference for FasterVLM ([CLS] attention pruning), written the way LightCompress runs it.

Read: ModelTC/LightCompress `llmc/compression/token_reduction/fastervlm.py` (registry name `FasterVLM`),
its config `configs/sparsification/methods/FasterVLM/fastervlm.yml` (`sparse: {method: TokenReduction,
special: {method: FasterVLM, rate: 0.778}}`, directly under `sparse:`, not `sparse: vision:`) and
`llmc/models/llava.py` / `llava_hf.py` (`pruning_config`).

What LightCompress does (prefill, batch 1):
* Budget: `visual_token_num = round(image_token_length * (1 - rate))` with `image_token_length` =
  `config.image_seq_length` (576 for LLaVA-1.5: rate 0.778 keeps round(127.87) = 128; Python's round, half
  to even).
* A forward pre-hook on the vision tower forces `output_attentions=True`; a forward hook takes
  `attentions[select_layer]` (`select_layer` = `vision_feature_layer`, -2 for LLaVA-1.5: the attention of
  the block whose output `hidden_states[-2]` is the selected feature, i.e. the last block that matters)
  and, for the "default"/"patch" strategy, its CLS query row over the patches `[:, :, 0, 1:]` (B, H, P),
  cast to the model dtype.
* A pre-hook on the projector averages it over heads (`mean(dim=1)`, (B, P)), takes
  `torch.topk(scores, k)` and scatters the indices into a boolean mask; a forward hook on the projector
  (Llava) keeps `features[mask]` per sample, i.e. the kept patches in their original order, so the LLM
  sees a shorter image span with contiguous positions (P0). For LlavaHf a pre-hook on the LLM instead
  gathers `inputs_embeds`, `attention_mask`, `position_ids` and `cache_position` with the keep index (the
  kept tokens keep their original position ids).
* The CLS token itself is dropped by LLaVA's feature selection as usual ("default" strategy).

This reference: HF's CLIP vision tower run with eager attention and `output_attentions=True,
output_hidden_states=True`; `attentions[vision_feature_layer][0, :, 0, 1:]` averaged over heads; the top k
by an explicit Python sort on (score descending, index ascending); the selected layer's hidden states
`hidden_states[vision_feature_layer][0, 1:]` gathered at the kept patches (original order), HF's projector,
spliced into `embed_tokens` of the prompt, HF's text model with positions 0..T'-1 and `lm_head` on the last
token.

Differences from LightCompress (all deliberate):
1. Ties: `torch.topk`'s order among equal scores is unspecified; here (score descending, index ascending).
2. Scores stay in fp32 (LightCompress casts the attention to the model dtype, fp16 in practice, before
   averaging, which can create ties that fp32 does not have). The tiny test models run in fp32 anyway.
3. Positions: P0 (LightCompress's original-LLaVA path, and the official FasterVLM code); LightCompress's
   LlavaHf path keeps the kept tokens' original position ids (P1).
4. Only the "default" strategy (CLS dropped) is supported; LightCompress's "full"/"cls_patch" branch uses
   the whole attention matrix and is not a meaningful selection.
5. One unpadded sample; the image span is found from `input_ids == image_token_id` (one contiguous run),
   not from the hard-coded start index.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from tokcompile.reference import eager_attention as _eager  # HF's own eager attention, restored on exit


def keep_count(image_token_length: int, rate: float) -> int:
    """LightCompress's budget: Python `round(image_token_length * (1 - rate))` (half to even)."""
    return round(image_token_length * (1 - rate))


def top_k_in_order(scores: list[float], k: int) -> list[int]:
    """The k best scores' indices under (score descending, index ascending), returned in ascending order."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
    return sorted(order[:k])



@torch.no_grad()
def cls_attention(model: nn.Module, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
    """One image (1, 3, H, W) -> (the [CLS] row's head-mean attention over the patches (P,) in fp32, the
    selected layer's hidden states (1+P, Dv)), both from HF's tower with eager attention."""
    cfg = model.config
    if not isinstance(cfg.vision_feature_layer, int):
        raise ValueError("the FasterVLM reference needs a single int vision_feature_layer")
    if cfg.vision_feature_select_strategy != "default":
        raise ValueError("the FasterVLM reference supports the 'default' strategy (CLS dropped) only")
    tower = model.model.vision_tower
    with _eager(model):
        out = tower(pixel_values.to(tower.dtype), output_hidden_states=True, output_attentions=True)
    attn = out.attentions[cfg.vision_feature_layer]  # (1, H, 1+P, 1+P) of the selected block
    scores = attn[0, :, 0, 1:].float().mean(dim=0)  # (P,): CLS query over the patches, mean over heads
    return scores, out.hidden_states[cfg.vision_feature_layer][0]


@torch.no_grad()
def fastervlm_reference(
    model: nn.Module,
    adapter: Any,
    sample: dict[str, Tensor],
    *,
    image_token_id: int,
    rate: float,
) -> tuple[Tensor, Tensor]:
    """Next-token logits (V,) and the kept vision-tower tokens (k+1,) (int64, ascending, CLS = 0 first, patch
    p at p+1) for ONE unpadded LLaVA sample. `adapter` gives only `language_model` and `lm_head`."""
    scores, hidden = cls_attention(model, sample["pixel_values"])  # (P,), (1+P, Dv)
    k = keep_count(int(model.config.image_seq_length), rate)
    kept_patches = top_k_in_order(scores.tolist(), k)  # (k,) ascending
    feats = hidden[1:][kept_patches]  # (k, Dv): CLS dropped, kept patches in original order
    logits = projected_logits(model, adapter, sample, feats, image_token_id)
    kept = torch.tensor([0] + [p + 1 for p in kept_patches], dtype=torch.long)
    return logits, kept


@torch.no_grad()
def projected_logits(model: nn.Module, adapter: Any, sample: dict[str, Tensor], feats: Tensor,
                     image_token_id: int) -> Tensor:
    """Next-token logits (V,) of one unpadded LLaVA sample whose image span is replaced by the tower features
    `feats` (k, Dv) through HF's projector, with contiguous positions (P0) and eager attention."""
    feats = model.model.multi_modal_projector(feats[None])[0]  # (k, D)
    ids = sample["input_ids"][0]
    pos = (ids == image_token_id).nonzero().flatten().tolist()
    start, n = pos[0], len(pos)
    if pos != list(range(start, start + n)):
        raise ValueError("image placeholders must be contiguous")
    lm = adapter.language_model(model)
    emb = lm.embed_tokens(ids)  # (T, D)
    embeds = torch.cat([emb[:start], feats.to(emb.dtype), emb[start + n :]])[None]  # (1, T', D)
    positions = torch.arange(embeds.shape[1])[None]  # P0
    with _eager(model):
        out = lm(inputs_embeds=embeds, position_ids=positions, use_cache=False)
    return adapter.lm_head(model)(out.last_hidden_state)[0, -1]  # the text model applies its final norm
