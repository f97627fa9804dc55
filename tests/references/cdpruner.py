"""Independent eager reference for CDPruner (conditional DPP over visual tokens), written the way the official
code runs it.

Read: Theia-4869/CDPruner `llava/model/multimodal_encoder/clip_encoder.py` (`load_text_tower`, `forward` with
`texts`), `llava/model/llava_arch.py` (`encode_images`, the single-image / `flat` path of
`prepare_inputs_labels_for_multimodal`) and `llava/eval/model_vqa_loader.py` (`texts=question`, the question
text without the "Answer the question using a single word or phrase." suffix).

What the official code does (prefill, `visual_token_num` T kept):
* `load_text_tower`: `CLIPVisionModelWithProjection.from_pretrained(tower)`'s `visual_projection` is attached
  to the tower (whose own `vision_model.post_layernorm` is the same checkpoint's); `CLIPTokenizerFast` and
  `CLIPTextModelWithProjection` from the same checkpoint; `max_position_embeddings` (77).
* `forward(images, texts)`: the tower with `output_hidden_states=True`, `hidden_states[select_layer]` (-2),
  CLS dropped (`patch`) -> image features (B, N, Dv). The text is tokenized WITHOUT truncation; the ids and the
  attention mask are padded with zeros to a multiple of 77 and reshaped to (M, 77) segments; `text_embeds` of
  the text tower, one per segment (M, C). `image_embeds = visual_projection(post_layernorm(features).float())`
  (B, N, C).
* `encode_images`: `image_features = mm_projector(features)` (B, N, D); cosine similarity of the projected
  features (`x / x.norm`, then `.float()`, then `x @ x^T`) (B, N, N); relevance = the mean over segments of
  minus the cosine of normalised `image_embeds` with normalised `text_embeds` (B, N), min-max normalised as
  `(r - r.min() + 1e-6) / (r.max() - r.min())` (min and max over the whole batch); kernel
  `L = r_i * S_ij * r_j`; the fast greedy MAP inference of the DPP (Chen et al. 2018) for T steps:
  `j = argmax(di2s)`, `eis = (L[j] - cis[:i, j] . cis[:i]) / sqrt(di2s[j])`, `cis[i] = eis`,
  `di2s -= eis^2`, `di2s[j] = -inf`; the selected indices sorted, scattered into a boolean mask.
* `prepare_inputs_labels_for_multimodal` (single image): `image_features[index_masks]` -> the T kept projected
  features in ascending index order, spliced in place of the image placeholder; the LLM gets contiguous
  positions 0..T'-1 (P0).

This reference: HF's LLaVA tower and `multi_modal_projector`; the CLIP head (`CLIPVisionModelWithProjection`'s
`vision_model.post_layernorm` and `visual_projection`), `CLIPTextModelWithProjection` and the tokenizer loaded
from `clip_dir`; every step above written out for batch 1 (`text_segments`, `relevance`, `similarity`,
`dpp_map`); the kept features spliced into `embed_tokens`; HF's text model with positions 0..T'-1; `lm_head`
on the last token.

Differences from the official code (all deliberate):
1. One unpadded sample (batch 1); the min-max of the relevance is then per sample, as the code runs it.
2. The tokenizer is `AutoTokenizer` (for OpenAI's CLIP checkpoints it resolves to the code's
   `CLIPTokenizerFast`; forcing that class on the tiny test tokenizer would re-tokenise it differently).
3. The head is loaded from `clip_dir`, in fp32 (the official tower and head come from one checkpoint; the tiny
   test LLaVA's tower is separate), and `post_layernorm` runs in fp32 (the code runs it in the tower's dtype,
   fp16 in practice, then `.float()`). The test models run in fp32, so the casts are no-ops there.
4. `torch.argmax` picks the first maximum among exact ties (the code uses the same call).
5. The LLM runs the model's configured attention (no padding, so every implementation agrees).
"""

from __future__ import annotations

from functools import lru_cache
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from tests.references.trim import spliced_logits  # the same LLaVA splice, P0 positions


@lru_cache(maxsize=4)
def load_clip(clip_dir: str) -> SimpleNamespace:
    """The official `load_text_tower`: CLIPVisionModelWithProjection's head, the text tower with projection and
    the tokenizer from the CLIP checkpoint directory, fp32, eval."""
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    vision = CLIPVisionModelWithProjection.from_pretrained(clip_dir, dtype=torch.float32).eval()
    text = CLIPTextModelWithProjection.from_pretrained(clip_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(clip_dir)
    return SimpleNamespace(post_layernorm=vision.vision_model.post_layernorm,
                           visual_projection=vision.visual_projection, text=text, tokenizer=tok,
                           max_position_embeddings=text.config.max_position_embeddings)


def text_segments(tokenizer, question: str, max_position_embeddings: int) -> dict[str, Tensor]:
    """The official text split: tokenize without truncation, pad ids and mask with zeros to a multiple of
    `max_position_embeddings`, reshape -> {"input_ids", "attention_mask"} each (M, 77)."""
    text_inputs = tokenizer(text=question, return_tensors="pt")
    L = text_inputs["input_ids"].shape[1]
    text_segment = (L - 1) // max_position_embeddings + 1
    text_padding = max_position_embeddings * text_segment - L
    return {k: torch.cat([v, v.new_zeros((v.shape[0], text_padding))], dim=1).reshape(-1, max_position_embeddings)
            for k, v in text_inputs.items() if k in ("input_ids", "attention_mask")}


@torch.no_grad()
def text_embeds(clip_dir: str, question: str) -> Tensor:
    """One projected end-of-text embedding per 77-token segment (M, C), not normalised."""
    c = load_clip(clip_dir)
    return c.text(**text_segments(c.tokenizer, question, c.max_position_embeddings)).text_embeds  # (M, C)


@torch.no_grad()
def patch_features(model: nn.Module, pixel_values: Tensor) -> Tensor:
    """One image (1, 3, H, W) -> the selected layer's patch features (1, N, Dv), CLS dropped ("default")."""
    cfg = model.config
    if not isinstance(cfg.vision_feature_layer, int) or cfg.vision_feature_select_strategy != "default":
        raise ValueError("the CDPruner reference needs an int vision_feature_layer and the 'default' strategy")
    tower = model.model.vision_tower
    out = tower(pixel_values.to(tower.dtype), output_hidden_states=True)
    return out.hidden_states[cfg.vision_feature_layer][:, 1:]  # (1, N, Dv)


def similarity(image_features: Tensor) -> Tensor:
    """Projected features (B, N, D) -> cosine similarity (B, N, N) fp32, as `encode_images` computes it."""
    image_normalized = image_features / image_features.norm(dim=-1, keepdim=True)  # (B, N, D)
    image_normalized = image_normalized.float()  # (B, N, D)
    return torch.matmul(image_normalized, image_normalized.transpose(1, 2))  # (B, N, N)


def relevance(image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
    """CLIP-space patch embeddings (B, N, C) and segment embeddings (M, C) -> min-max normalised relevance
    (B, N), the code's sign and +1e-6 included."""
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)  # (B, N, C)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)  # (M, C)
    rel = torch.matmul(image_embeds, text_embeds.t())  # (B, N, M)
    rel = (-rel).mean(dim=-1)  # (B, N)
    return (rel - rel.min() + 1e-6) / (rel.max() - rel.min())  # (B, N)


def dpp_map(kernel: Tensor, visual_token_num: int) -> Tensor:
    """The official fast greedy MAP inference, line for line: kernel (B, N, N) -> selected indices (B, T)
    sorted ascending. `cis` is created in the default dtype, as in the code."""
    B, N, _ = kernel.shape
    device = kernel.device
    cis = torch.zeros((visual_token_num, B, N), device=device)  # (T, B, N)
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()  # (B, N)
    select_idx = torch.empty((visual_token_num, B), dtype=torch.long, device=device)  # (T, B)
    for i in range(visual_token_num):
        j = torch.argmax(di2s, dim=-1)  # (B,)
        select_idx[i] = j
        eis = (kernel[torch.arange(B), j] - torch.einsum('tb,tbn->bn', cis[:i, torch.arange(B), j], cis[:i])) \
            / torch.sqrt(di2s[torch.arange(B), j]).unsqueeze(-1)  # (B, N)
        cis[i, :, :] = eis
        di2s -= torch.square(eis)
        di2s[torch.arange(B), j] = -float('inf')
    return torch.sort(select_idx.t()).values  # (B, T)


@torch.no_grad()
def cdpruner_select(model: nn.Module, clip_dir: str, pixel_values: Tensor, question: str,
                    visual_token_num: int) -> tuple[Tensor, list[int], Tensor]:
    """-> (projected features (N, D), the kept indices ascending (T,), the kernel (N, N))."""
    c = load_clip(clip_dir)
    feats = patch_features(model, pixel_values)  # (1, N, Dv)
    N = feats.shape[1]
    if not 1 <= visual_token_num <= N:
        raise ValueError(f"visual_token_num must be in [1, {N}], not {visual_token_num}")
    image_embeds = c.visual_projection(c.post_layernorm(feats.float()).float())  # (1, N, C)
    tau = text_embeds(clip_dir, question)  # (M, C)
    image_features = model.model.multi_modal_projector(feats)  # (1, N, D)
    sim = similarity(image_features)  # (1, N, N)
    rel = relevance(image_embeds, tau)  # (1, N)
    kernel = rel.unsqueeze(2) * sim * rel.unsqueeze(1)  # (1, N, N)
    select_idx = dpp_map(kernel, visual_token_num)  # (1, T)
    return image_features[0], select_idx[0].tolist(), kernel[0]


@torch.no_grad()
def cdpruner_reference(model: nn.Module, clip_dir: str, sample: dict, question: str, image_token_id: int,
                       visual_token_num: int) -> tuple[Tensor, list[int]]:
    """-> (logits of the last prompt token (V,), kept image-token indices ascending)."""
    image_features, kept, _ = cdpruner_select(model, clip_dir, sample["pixel_values"], question, visual_token_num)
    index_mask = torch.zeros(image_features.shape[0], dtype=torch.bool)
    index_mask[kept] = True
    logits = spliced_logits(model, sample, image_features[index_mask], image_token_id)  # kept (T, D) in order
    return logits, kept
