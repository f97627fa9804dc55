"""Independent eager references on Qwen3-VL, where DeepStack adds per-image-token features to the output of the
first decoder layers: FastV and DivPrune, written with HF's own modules and HF's own DeepStack step.

HF (`modeling_qwen3_vl.py`): `get_image_features` returns the merged image features and one DeepStack feature
per listed vision block (`deepstack_features`); `Qwen3VLTextModel.forward` runs each decoder layer and, for layer
j < len(deepstack), calls `_deepstack_process(hidden, visual_pos_masks, deepstack[j])`, which adds the features
at the image positions. A reduction that drops image tokens before those layers must drop the same rows of the
DeepStack features (and of `visual_pos_masks`): the references do exactly that, by hand, batch 1.

- `divprune_reference_qwen3`: the image features through `divprune_select` (the independent DivPrune reference's
  selection), the kept rows spliced; HF's text model with the kept tokens' original M-RoPE ids, `visual_pos_masks`
  over the kept image positions and the kept rows of every DeepStack feature (HF's own DeepStack step).
FastV's reference on Qwen3-VL is `tokcompile.reference.fastv_reference` (its DeepStack path), which the compile
itself runs as its independent check.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tests.references.divprune import divprune_select, keep_count


def _prepared(model: nn.Module, sample: dict[str, Tensor], image_token_id: int) -> tuple:
    """(input embeddings (1, T, D) with the image features spliced, image mask (1, T), DeepStack features (N, D)
    each, M-RoPE ids (3, 1, T), image span start, N)."""
    mm = model.model
    ids = sample["input_ids"]
    out = mm.get_image_features(sample["pixel_values"], sample["image_grid_thw"])
    feats = torch.cat(list(out.pooler_output), dim=0)  # (N, D)
    deep = [torch.cat(list(f), dim=0) for f in out.deepstack_features]  # (N, D) each
    mask = ids == image_token_id  # (1, T)
    embeds = mm.language_model.embed_tokens(ids).clone()  # (1, T, D)
    embeds[mask] = feats.to(embeds.dtype)
    pos, _ = mm.get_rope_index(ids, sample["mm_token_type_ids"], image_grid_thw=sample["image_grid_thw"],
                               attention_mask=sample["attention_mask"])  # (3, 1, T)
    where = mask[0].nonzero().flatten().tolist()
    assert where == list(range(where[0], where[0] + len(where))), "one contiguous image span"
    return embeds, mask, deep, pos, where[0], len(where)


@torch.no_grad()
def full_reference_qwen3(model: nn.Module, sample: dict[str, Tensor], image_token_id: int) -> Tensor:
    """Next-token logits (V,) of HF's own forward."""
    return model(**sample).logits[0, -1]


@torch.no_grad()
def divprune_reference_qwen3(model: nn.Module, sample: dict[str, Tensor], *, image_token_id: int,
                             reduction_ratio: float) -> tuple[Tensor, Tensor]:
    """Next-token logits (V,) and kept image indices (k,) after DivPrune on the projected image features."""
    embeds, mask, deep, pos, start, N = _prepared(model, sample, image_token_id)
    T = embeds.shape[1]
    kept = divprune_select(embeds[0, start : start + N], keep_count(N, reduction_ratio))  # (k,)
    keep_idx = torch.cat([torch.arange(start), start + kept, torch.arange(start + N, T)])  # (T',)
    lm = model.model.language_model
    out = lm(inputs_embeds=embeds[:, keep_idx], position_ids=pos[..., keep_idx],
             attention_mask=torch.ones(1, len(keep_idx), dtype=torch.long), use_cache=False,
             visual_pos_masks=mask[:, keep_idx], deepstack_visual_embeds=[d[kept] for d in deep])
    return model.lm_head(out.last_hidden_state[:, -1])[0], kept
