"""Independent eager reference of VisionZip on Qwen2.5-VL, written the way LightCompress runs it
(`llmc/compression/token_reduction/visionzip.py`: `Qwen2_5_VLVisionAttention_forward`, `merger_hook`,
`prune_qwenv25vl_hook`), on the HF model itself. What LightCompress does, in my words:
* The tower's last block runs a replacement attention: q, k, v from `qkv`, vision RoPE, an additive mask that
  lets each `cu_seqlens` segment attend to itself (the window segments where that block is windowed), softmax
  in fp32; it stores the probabilities (H, S, S) and the RoPE'd keys (H, S, d), in the tower's window order.
* After the tower: the probabilities averaged over heads and summed over the queries give each tower token the
  attention it receives; the mean over each group of 4 consecutive tower tokens (one merged token), reordered by
  the inverse window permutation, scores the image tokens. The keys get the same group mean and reorder, then
  the mean over heads: the metric.
* Before the language model, on its input embeddings: int(dominant·N) tokens with the highest score are kept
  (`torch.topk`), the rest are compressed: the metric of the rest L2-normalised, targets every max(1, R // C)-th
  of them (the first C, C = max(int(contextual·N), 1)), every other token of the rest joins its most similar
  target (argmax), each target becomes itself plus the mean of its joiners; the sequence, its position ids and
  attention mask are cut to the kept tokens and the targets, in their original order.
Where this reference differs: one sample at a time (LightCompress takes the span from sample 0); HF's own
language model then runs on the cut inputs. Qwen2-VL, which LightCompress does not cover, takes the same steps
without the window order.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn


def _replacement_attention(attn: nn.Module, seen: dict) -> Any:
    import sys

    apply_rotary_pos_emb_vision = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision  # the family's own

    def forward(hidden_states: Tensor, cu_seqlens: Tensor, position_embeddings: Any = None, **_: Any) -> Tensor:
        S = hidden_states.shape[0]
        q, k, v = attn.qkv(hidden_states).reshape(S, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        mask = torch.full((1, S, S), torch.finfo(q.dtype).min, dtype=q.dtype)
        for i in range(1, len(cu_seqlens)):
            a, b = int(cu_seqlens[i - 1]), int(cu_seqlens[i])
            mask[..., a:b, a:b] = 0
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # (H, S, d)
        w = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]) + mask, dim=-1, dtype=torch.float32)
        seen["attn"], seen["key"] = w.to(q.dtype), k
        return attn.proj((w.to(q.dtype) @ v).transpose(0, 1).reshape(S, -1))

    return forward


def tower_scores(visual: nn.Module, seen: dict, grid_thw: Tensor) -> tuple[Tensor, Tensor]:
    """LightCompress's `merger_hook`: (N,) attention received per image token, (N, d) the head-mean group keys,
    in the processor's order."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import get_vision_window_index

    if hasattr(visual, "window_size"):  # Qwen2.5-VL: the tower runs in window order
        window_index, _ = get_vision_window_index(grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                                  window_size=visual.window_size, patch_size=visual.patch_size)
        reverse = torch.argsort(window_index)
    else:  # Qwen2-VL (no LightCompress path; the same steps without windows)
        reverse = torch.arange(seen["attn"].shape[-1] // 4)
    score = seen["attn"].mean(0).sum(0)  # (S,) attention each tower token receives
    score = score.view(score.shape[0] // 4, -1).mean(-1)[reverse]  # (N,)
    key = seen["key"]  # (H, S, d)
    key = key.view(key.shape[0], key.shape[1] // 4, 4, key.shape[-1]).mean(2)[:, reverse].mean(0)  # (N, d)
    return score, key


def run_with_tower_hooks(model: nn.Module, sample: dict[str, Tensor], prune: Any) -> Tensor:
    """Next-token logits (V,) of the HF model with the last tower block's replacement attention and
    `prune(embeds, position_ids, seen) -> rows` (a bool over the sequence) cutting the language model's input."""
    visual = model.model.visual
    last = visual.blocks[-1].attn
    seen: dict[str, Tensor] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        emb = kwargs["inputs_embeds"]  # (1, T, D)
        if emb.shape[1] == 1:
            return args, kwargs
        emb, rows = prune(emb, seen)
        kwargs = {**kwargs, "inputs_embeds": emb[:, rows], "position_ids": kwargs["position_ids"][..., rows]}
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = kwargs["attention_mask"][:, rows]
        if kwargs.get("cache_position") is not None:
            kwargs["cache_position"] = torch.arange(int(rows.sum()))
        return args, kwargs

    last.forward = _replacement_attention(last, seen)  # an instance attribute over the class's method
    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        return model(**sample, use_cache=False).logits[0, -1].float()
    finally:
        handle.remove()
        del last.forward


@torch.no_grad()
def visionzip_qwen_reference(model: nn.Module, sample: dict[str, Tensor], *, image_token_id: int, dominant: float,
                             contextual: float) -> tuple[Tensor, Tensor]:
    """Next-token logits (V,) and the output slot of every image token ((N,) int64: its own slot when kept, its
    target's when it joined one), for one unpadded sample."""
    visual = model.model.visual
    result: dict[str, Tensor] = {}
    ids = sample["input_ids"][0]

    def prune(emb: Tensor, seen: dict) -> tuple[Tensor, Tensor]:
        score, key = tower_scores(visual, seen, sample["image_grid_thw"])
        n = score.shape[0]
        # LightCompress's Qwen path reads fractions; integers of at least 1 are the counts a LLaVA recipe writes
        D = dominant if isinstance(dominant, int) and dominant >= 1 else int(dominant * n)
        C = contextual if isinstance(contextual, int) and contextual >= 1 else max(int(contextual * n), 1)
        dom = torch.zeros(n, dtype=torch.bool)
        dom[torch.topk(score, D).indices] = True
        rest = torch.nonzero(~dom).flatten()  # (R,) in order
        metric = key[rest] / key[rest].norm(dim=-1, keepdim=True)
        step = max(1, len(rest) // C)
        targets = torch.arange(0, len(rest), step)[:C]  # positions within the rest
        others = torch.tensor([i for i in range(len(rest)) if i not in set(targets.tolist())], dtype=torch.long)
        best = (metric[others] @ metric[targets].t()).argmax(-1)  # (R - C,) a target per joiner
        start = int(torch.nonzero(ids == image_token_id)[0])
        span = emb[0, start:start + n]  # (N, D)
        joined = torch.zeros(C, span.shape[-1], dtype=span.dtype).index_add_(0, best, span[rest[others]])
        count = torch.bincount(best, minlength=C).clamp(min=1)
        keep = dom.clone()
        keep[rest[targets]] = True
        emb = emb.clone()
        emb[0, start + rest[targets]] = span[rest[targets]] + joined / count[:, None].to(span.dtype)
        rows = torch.ones(emb.shape[1], dtype=torch.bool)
        rows[start:start + n] = keep
        slot = torch.cumsum(keep.long(), 0) - 1  # (N,) slot of every kept token
        assign = slot.clone()
        assign[rest[others]] = slot[rest[targets]][best]
        result["assign"] = assign
        return emb, rows

    logits = run_with_tower_hooks(model, sample, prune)
    return logits, result["assign"]
