"""Independent eager reference of VisionZip in LLaVA's CLIP vision tower, written the way LightCompress runs it.

Read: ModelTC/LightCompress `llmc/compression/token_reduction/visionzip.py` (`VisionZip`, `visionzip_hook`,
`store_key_hook`, `visionzip_forward`) and `configs/sparsification/methods/VisionZip/visionzip.yml`.

What LightCompress does (LLaVA / LlavaHf)
-----------------------------------------
* A forward pre-hook on the vision tower forces `output_attentions=True` (eager attention); a forward hook on
  every CLIP block's `k_proj` stores its output (bias included) reshaped to heads and averaged over them,
  `metric (B, t, head_dim)`; the one read is block -2's.
* A forward hook on the tower reads `attentions[-2]` (probabilities of block -2) and `hidden_states[-2]` (the
  output of block -2, i.e. LLaVA-1.5's `vision_feature_layer=-2`; both hard-coded to -2):
  - dominant: `attn[:, :, 0, 1:]` summed over heads, `topk(dominant).indices + 1`; a mask marks CLS and those
    (`prune_only`/normal) or CLS alone (`merge_only`, where `dominant_num` becomes 0);
    `dominant_tokens = hidden.masked_select(~mask)`: CLS first, then the dominant patches in original order.
  - the remaining `R` tokens (original order) and their metric, L2-normalised (`x / x.norm()`, no eps);
    `step = max(1, R // contextual)`, targets = remaining positions `arange(0, R, step)[:contextual]`; every
    other remaining token goes to `argmax` of its dot products with the targets (first index on ties);
    `counts = onehot.sum(1).clamp(min=1)`; `contextual = x_target + (onehot^T @ x_others) / counts`: the target
    PLUS the mean of the tokens assigned to it (the target is not in the mean; a target with no assigned token
    gets `x_target + 0`).
  - output `cat(dominant_tokens, contextual_tokens)` (`1 + D + C` tokens; contextual in target order), or
    `dominant_tokens` alone with `prune_only` (the contextual merge is still computed, then discarded). It
    replaces `hidden_states[-2]`; LLaVA drops index 0 (CLS), projects, and the LLM sees the shorter span (P0).
* Multi-turn: the mask of the first turn is stored in a buffer and reused for later questions (not modelled).

This reference: the HF tower with `output_attentions=True, output_hidden_states=True` under eager attention, a
forward hook on block -2's `k_proj`, the reduction below on one sequence (boolean masks and Python lists), HF's
projector, the shorter span spliced into `inputs_embeds`, HF's text model, `lm_head` on the last token.

Differences from LightCompress (deliberate)
-------------------------------------------
1. Top-k ties: `torch.topk` leaves their order unspecified; here (score descending, index ascending).
2. `prune_only` skips the discarded contextual merge, so `contextual: 0` works there (LightCompress divides by
   it: ZeroDivisionError) and `contextual` need not fit the remaining tokens.
3. Scores and the metric are used in fp32 (the tiny model is fp32: identical); one unpadded sample; the merged
   span is spliced directly (HF LLaVA's placeholder check would reject the shorter span; LightCompress's own
   `visionzip_forward` trims the placeholder run, which gives the same sequence).
4. The parity output: `assign (t,)` (the output slot of every tower token) or, with `prune_only`, `kept (1+D,)`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from tokcompile.reference import eager_attention as _eager  # HF's own eager attention, restored on exit


def visionzip_tokens(
    hidden: Tensor, cls_attn: Tensor, metric: Tensor, dominant: int, contextual: int,
    prune_only: bool = False, merge_only: bool = False,
) -> tuple[Tensor, Tensor]:
    """VisionZip on ONE sequence, CLS at 0.

    Args:
        hidden: (t, C) the layer's output.
        cls_attn: (t,) the CLS row of the layer's attention probabilities, summed over heads.
        metric: (t, c) the layer's keys averaged over heads (not normalised).

    Returns:
        out (t', C) and, for `prune_only`, kept (1+D,) ascending tower indices; otherwise assign (t,) int64,
        the output slot of every input token.
    """
    if prune_only and merge_only:
        raise ValueError("prune_only and merge_only cannot both be True")
    t = hidden.shape[0]
    scores = cls_attn[1:].tolist()
    ranked = sorted(range(t - 1), key=lambda j: (-scores[j], j))
    dom = [] if merge_only else sorted(1 + j for j in ranked[:dominant])
    keep = torch.zeros(t, dtype=torch.bool)
    keep[0] = True
    keep[dom] = True
    kept = keep.nonzero().flatten()  # CLS then dominant, original order
    dominant_tokens = hidden[keep]
    if prune_only:
        return dominant_tokens, kept
    rest = (~keep).nonzero().flatten()  # (R,) remaining tower indices, ascending
    R = rest.numel()
    m = metric[rest].float()
    m = m / m.norm(dim=-1, keepdim=True)
    step = max(1, R // contextual)
    targets = list(range(0, R, step))[:contextual]
    if len(targets) != contextual:
        raise ValueError(f"contextual={contextual} does not fit the {R} remaining tokens")
    others = [p for p in range(R) if p not in targets]
    sim = m[others] @ m[targets].T  # (M, C)
    best = sim.argmax(dim=1).tolist() if others else []  # first maximal index
    x_rest = hidden[rest]
    n_dom = kept.numel()
    assign = torch.empty(t, dtype=torch.long)
    assign[kept] = torch.arange(n_dom)
    ctx_tokens = []
    for c, p in enumerate(targets):
        members = [others[i] for i, b in enumerate(best) if b == c]
        total = torch.zeros_like(x_rest[p])
        for q in members:
            total = total + x_rest[q]
        ctx_tokens.append(x_rest[p] + total / max(len(members), 1))
        assign[rest[p]] = n_dom + c
        for q in members:
            assign[rest[q]] = n_dom + c
    return torch.cat([dominant_tokens, torch.stack(ctx_tokens)]), assign



def tower_layer(model: nn.Module, pixel_values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Block -2 of the CLIP tower as LightCompress reads it, for ONE image: hidden_states[-2] (t, Dv), the CLS
    row of attentions[-2] summed over heads (t,), and block -2's k_proj output averaged over heads (t, dv)."""
    tower = model.model.vision_tower
    vm = getattr(tower, "vision_model", tower)
    block = vm.encoder.layers[-2]
    heads = block.self_attn.num_heads
    stored: dict[str, Tensor] = {}

    def store_key(mod: nn.Module, args: Any, out: Tensor) -> None:
        stored["metric"] = out.view(out.shape[0], -1, heads, out.shape[-1] // heads).transpose(1, 2).mean(1)

    handle = block.self_attn.k_proj.register_forward_hook(store_key)
    try:
        with _eager(model):
            out = tower(pixel_values.to(vm.embeddings.patch_embedding.weight.dtype), output_attentions=True,
                        output_hidden_states=True)
    finally:
        handle.remove()
    attn = out.attentions[-2]  # (1, H, t, t)
    return out.hidden_states[-2][0], attn[0, :, 0, :].sum(0), stored["metric"][0]


@torch.no_grad()
def visionzip_reference(
    model: nn.Module, adapter: Any, sample: dict[str, Tensor], *, image_token_id: int, dominant: int,
    contextual: int, prune_only: bool = False, merge_only: bool = False,
) -> tuple[Tensor, Tensor]:
    """Next-token logits (V,) and the parity output (assign (t,) or, with prune_only, kept (1+D,)) for ONE
    unpadded LLaVA sample (`input_ids` (1, T) with one contiguous placeholder run, `pixel_values` (1, 3, H, W))."""
    cfg = model.config
    if cfg.vision_feature_layer != -2 or cfg.vision_feature_select_strategy != "default":
        raise ValueError("LightCompress's VisionZip hard-codes layer -2 and LLaVA's 'default' strategy")
    hidden, cls_attn, metric = tower_layer(model, sample["pixel_values"])
    out, index = visionzip_tokens(hidden, cls_attn, metric, dominant, contextual, prune_only, merge_only)
    feats = model.model.multi_modal_projector(out[1:][None])[0]  # (N', D): CLS dropped

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
        h = lm(inputs_embeds=embeds, position_ids=positions, use_cache=False).last_hidden_state
    return adapter.lm_head(model)(h)[0, -1], index
