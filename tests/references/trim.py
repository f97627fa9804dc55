"""Independent eager reference for TRIM (CLIP-metric token reduction), written the way the official code runs it.

Read: FreedomIntelligence/TRIM `llava/model/multimodal_encoder/clip_encoder.py` (`CLIPVisionTower.load_model`,
`forward`, `token_reduction`), `llava/model/llava_arch.py` (`encode_images`,
`prepare_inputs_labels_for_multimodal`) and `llava/eval/model_vqa_loader.py` (`texts=cur_prompt.replace('<image>',
' ')`).

What the official code does (prefill, `mm_vision_token_reduce_func` "TRIM:k"):
* `load_model` loads, from the CLIP checkpoint the LLaVA tower came from, `CLIPModel` (its `visual_projection`
  is attached to the tower; `post_layernorm` is the tower's own, i.e. the same checkpoint's),
  `CLIPTextModelWithProjection` and `AutoTokenizer`.
* `forward`: the tower with `output_hidden_states=True`; `feature_select` takes `hidden_states[select_layer]`
  (-2) and drops CLS (`patch`); the text goes through `text_tokenizer(text=texts, return_tensors="pt",
  truncation=True, padding=True)` (77 tokens at most) and `text_tower(**text_inputs).text_embeds` (projected
  end-of-text token, not normalised).
* `token_reduction`: features to fp32 (eval), `visual_projection(post_layernorm(features))` outside autocast;
  `similarities = proj @ text_embeds` (B, P); `similarities = softmax(-similarities)` (the sign is flipped in
  the code: the paper's prose uses +similarity).
  - `k == -1` (IQR): `outlier_detection` = numpy percentiles 25/75 of the float32 scores flattened over the
    batch (linear interpolation), `upper = Q3 + 1.5 * IQR`, `ratio = count(p > upper) / len(p)`.
  - `num_tokens_to_keep = int(tokens_number * k)` (so in IQR mode `int(P * (count / len))`, which float
    rounding can make `count - 1`, e.g. P = 196, count = 1 -> 0).
  - `torch.topk(..., sorted=False)` -> a boolean token mask; `image_features[token_mask]` keeps the selected
    tokens in ascending index order in slots 0..n-1; slot n gets the mean of the unselected features
    (`(features * mask).sum / mask.sum`; zeros if none are unselected); `actual_dims = [n + 1] * B`.
* `encode_images` runs the projector over the padded (B, P, D) buffer; `prepare_inputs_labels_for_multimodal`
  splices `image_features[:actual_dims]`, i.e. exactly n + 1 tokens, between the text embeddings and gives
  the LLM contiguous positions 0..T'-1 (P0).

This reference: HF's LLaVA tower (`output_hidden_states=True`), `hidden_states[vision_feature_layer][0, 1:]`
(P, Dv); `CLIPModel.from_pretrained(clip_dir)`'s `vision_model.post_layernorm` and `visual_projection` in fp32;
`CLIPTextModelWithProjection` + `AutoTokenizer` from the same directory; scores, count and selection as above
(`trim_scores`, `trim_iqr_count`, `trim_select`, `trim_features`); HF's `multi_modal_projector` over the n + 1
features, spliced into `embed_tokens` of the prompt; HF's text model with positions 0..T'-1; `lm_head` on
the last token.

Differences from the official code (all deliberate):
1. Ties: `torch.topk`'s choice among equal scores is unspecified; here an explicit sort on (score descending,
   index ascending).
2. One unpadded sample (batch 1): the quartiles are per sample (the code pools a batch, and runs batch 1).
3. `sign="paper"` (softmax(+sim)) is an option; the default "code" is the official softmax(-sim).
4. `max_tokens` (IQR only, off by default): when the IQR count exceeds it, only the top `max_tokens` are kept
   and the excess joins the aggregated token -- the static implementation's bound, not the official code.
5. Edge counts the official code cannot run: n = 0 (`image_features[mask].view(B, 0, -1)` raises) gives the
   aggregated token alone (mean of all P); n = P (`selected[:, P] = ...` is out of bounds) gives the P
   features plus a zero token (the code's "nothing unselected" branch).
6. The tokenizer is `AutoTokenizer` as in the code; the head is loaded from `clip_dir` (in the official setup
   the tower and the head come from the same checkpoint; the tiny test LLaVA's tower is separate).
7. The LLM runs the model's configured attention (no padding, so every implementation agrees).
"""

from __future__ import annotations

from functools import lru_cache
from types import SimpleNamespace

import numpy as np
import torch
from torch import Tensor, nn


@lru_cache(maxsize=4)
def load_clip(clip_dir: str) -> SimpleNamespace:
    """The official `load_model` (TRIM branch, eval path): CLIPModel's head, CLIPTextModelWithProjection and
    AutoTokenizer, all from the CLIP checkpoint directory, fp32, eval."""
    from transformers import AutoTokenizer, CLIPModel, CLIPTextModelWithProjection

    clip = CLIPModel.from_pretrained(clip_dir, dtype=torch.float32).eval()
    text = CLIPTextModelWithProjection.from_pretrained(clip_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(clip_dir)
    return SimpleNamespace(post_layernorm=clip.vision_model.post_layernorm,
                           visual_projection=clip.visual_projection, text=text, tokenizer=tok)


@torch.no_grad()
def patch_features(model: nn.Module, pixel_values: Tensor) -> Tensor:
    """One image (1, 3, H, W) -> LLaVA's selected-layer patch features (P, Dv), CLS dropped ("default")."""
    cfg = model.config
    if not isinstance(cfg.vision_feature_layer, int) or cfg.vision_feature_select_strategy != "default":
        raise ValueError("the TRIM reference needs an int vision_feature_layer and the 'default' strategy")
    tower = model.model.vision_tower
    out = tower(pixel_values.to(tower.dtype), output_hidden_states=True)
    return out.hidden_states[cfg.vision_feature_layer][0, 1:]  # (P, Dv)


@torch.no_grad()
def text_embeds(clip_dir: str, question: str) -> Tensor:
    """The official text path: tokenizer(truncation=True, padding=True) -> text_embeds (1, C), not normalised."""
    c = load_clip(clip_dir)
    inputs = c.tokenizer(text=question, return_tensors="pt", truncation=True, padding=True)
    return c.text(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).text_embeds  # (1, C)


@torch.no_grad()
def trim_scores(model: nn.Module, clip_dir: str, pixel_values: Tensor, question: str,
                sign: str = "code") -> tuple[Tensor, Tensor]:
    """-> (softmax scores p (P,) fp32, the patch features (P, Dv) fp32)."""
    if sign not in ("code", "paper"):
        raise ValueError(f"sign must be 'code' or 'paper', not {sign!r}")
    c = load_clip(clip_dir)
    feats = patch_features(model, pixel_values).float()  # (P, Dv): fp32 as in the eval path
    proj = c.visual_projection(c.post_layernorm(feats))  # (P, C)
    tau = text_embeds(clip_dir, question).float()  # (1, C)
    sim = torch.matmul(proj[None], tau.unsqueeze(2)).squeeze(2)[0]  # (P,)
    if sign == "code":
        sim = -sim
    return torch.softmax(sim, dim=-1), feats


def trim_iqr_count(scores: np.ndarray | Tensor) -> int:
    """The official `outlier_detection` ratio turned into a count the official way: `int(P * ratio)`."""
    if isinstance(scores, Tensor):
        sim_np = scores.to(dtype=torch.float32).cpu().numpy().flatten()
    else:
        sim_np = np.asarray(scores, dtype=np.float32).flatten()
    q1 = np.percentile(sim_np, 25)
    q3 = np.percentile(sim_np, 75)
    iqr = q3 - q1
    upper_bound = q3 + 1.5 * iqr
    outlier_indices = np.where(sim_np > upper_bound)[0]
    ratio = len(outlier_indices) / len(sim_np)
    return int(len(sim_np) * ratio)


def trim_count(scores: Tensor, keep_ratio: float, max_tokens: int | None = None) -> int:
    """How many patches are selected: IQR (`keep_ratio == -1`, optionally clamped to `max_tokens`) or
    `int(P * keep_ratio)`."""
    P = scores.numel()
    if keep_ratio == -1:
        n = trim_iqr_count(scores)
        return n if max_tokens is None else min(n, max_tokens)
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be -1 or in (0, 1], not {keep_ratio}")
    return int(P * keep_ratio)


def trim_select(scores: list[float], n: int) -> list[int]:
    """The top n under (score descending, index ascending), returned ascending (the boolean-mask order)."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
    return sorted(order[:n])


def trim_features(feats: Tensor, scores: Tensor, keep_ratio: float,
                  max_tokens: int | None = None) -> tuple[Tensor, list[int], int]:
    """Patch features (P, Dv) and scores (P,) -> (the n selected features then the aggregated one (n+1, Dv)
    in fp32, the selected indices ascending, n)."""
    P = feats.shape[0]
    n = trim_count(scores, keep_ratio, max_tokens)
    selected = trim_select(scores.tolist(), n)  # (n,) ascending
    feats = feats.float()
    token_mask = torch.zeros(P, dtype=torch.bool)
    token_mask[selected] = True
    remaining_mask = ~token_mask  # (P,)
    if remaining_mask.sum().item() > 0:
        mean = (feats * remaining_mask.unsqueeze(-1)).sum(dim=0) / remaining_mask.sum()  # (Dv,)
    else:
        mean = torch.zeros(feats.shape[1])
    out = torch.cat([feats[token_mask], mean[None]])  # (n+1, Dv)
    return out, selected, n


@torch.no_grad()
def spliced_logits(model: nn.Module, sample: dict[str, Tensor], image_embeds: Tensor,
                   image_token_id: int) -> Tensor:
    """Next-token logits (V,) of one unpadded LLaVA sample whose image placeholders (one contiguous run) are
    replaced by `image_embeds` (k, D) (already projected), positions 0..T'-1."""
    if not bool(sample["attention_mask"].all()):
        raise ValueError("the reference takes one unpadded sample")
    ids = sample["input_ids"][0]  # (T,)
    pos = (ids == image_token_id).nonzero().flatten().tolist()
    start, n = pos[0], len(pos)
    if pos != list(range(start, start + n)):
        raise ValueError("image placeholders must be contiguous")
    lm = model.model.language_model
    emb = lm.embed_tokens(ids)  # (T, D)
    embeds = torch.cat([emb[:start], image_embeds.to(emb.dtype), emb[start + n:]])[None]  # (1, T', D)
    positions = torch.arange(embeds.shape[1])[None]  # (1, T'): P0
    out = lm(inputs_embeds=embeds, position_ids=positions, use_cache=False)
    return model.lm_head(out.last_hidden_state)[0, -1]  # (V,)


@torch.no_grad()
def trim_reference(model: nn.Module, clip_dir: str, sample: dict, question: str, image_token_id: int,
                   keep_ratio: float, sign: str = "code", max_tokens: int | None = None
                   ) -> tuple[Tensor, list[int], int]:
    """-> (logits of the last prompt token (V,), the selected patch indices (0-based among the P patches, CLS
    excluded, ascending), n = how many were selected). keep_ratio -1 = the IQR rule, else int(P*keep_ratio).
    sign "code" = softmax(-sim) as the official code; "paper" = softmax(+sim). max_tokens (IQR only): when the
    IQR count exceeds it, keep only the top max_tokens (the excess joins the aggregated token) -- a documented
    deviation the static version makes; None = no clamp (official)."""
    scores, feats = trim_scores(model, clip_dir, sample["pixel_values"], question, sign)  # (P,), (P, Dv)
    reduced, selected, n = trim_features(feats, scores, keep_ratio, max_tokens)  # (n+1, Dv)
    proj = model.model.multi_modal_projector
    dtype = next(proj.parameters()).dtype
    image_embeds = proj(reduced.to(dtype)[None])[0]  # (n+1, D)
    return spliced_logits(model, sample, image_embeds, image_token_id), selected, n
