"""An independent eager FastV reference, written the way the official FastV code works.

It shares nothing with `ReducedVLM` but the HF modules: the HF model runs one sample (batch element 0,
no padding) with eager attention and `output_attentions=True`; the last token's attention row of layer
K-1, averaged over heads, ranks the image tokens; the hidden states entering layer K are pruned; the
remaining decoder layers run with the kept tokens' original position ids and a fresh causal mask.
Agreement with the static graph checks the graph's own score computation (q/k from layer K-1), its splice,
masks and gathers.

Qwen3-VL adds DeepStack features to the output of its first decoder layers at the image positions, after the
layer (HF records `hidden_states` before that addition). There the reference runs HF's decoder layers one by
one, HF's own `_deepstack_process` after each of those layers, captures layer K-1's attention probabilities
from its attention module, and keeps the same rows of the image mask and of the remaining DeepStack features.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Switch every sub-config of `model` to eager attention, and restore what was there on exit."""
    configs = [m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")]
    seen: dict[int, Any] = {}
    for c in configs:
        seen.setdefault(id(c), (c, c._attn_implementation))
    try:
        for c, _ in seen.values():
            c._attn_implementation = "eager"
        yield
    finally:
        for c, old in seen.values():
            c._attn_implementation = old


@torch.no_grad()
def fastv_reference(
    model: nn.Module,
    adapter: Any,
    sample: dict[str, Tensor],
    *,
    image_token_id: int,
    pruning_loc: int | None,
    keep: int | None,
    forced: Tensor | None = None,
    scores_out: list | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Next-token logits (V,) and kept image indices (k,) for ONE unpadded sample.

    Args:
        model: the HF model.
        adapter: its family adapter, used only to find the HF text model (`language_model`) and HF's own
            position ids (`hf_position_ids`: 1-D, or M-RoPE's 3 rows from HF's `get_rope_index`).
        sample: the processor's outputs for one sample without padding (batch of one).
        image_token_id: the image (or video) placeholder id.
        pruning_loc: K; None runs the unreduced model.
        keep: image tokens kept at K.
        forced: kept image indices (k,) to use instead of the reference's own selection (a near-tie replayed with
            the other side's selection, so the logits after it still compare).
        scores_out: a list that receives the reference's fp32 scores (N,), for the near-tie rule.
    """
    if getattr(getattr(model.config, "vision_config", None), "deepstack_visual_indexes", None) and pruning_loc:
        return _fastv_deepstack(model, adapter, sample, image_token_id, pruning_loc, keep, forced, scores_out)
    with eager_attention(model):
        out = model(**sample, output_attentions=True, output_hidden_states=True, use_cache=False)
    if pruning_loc is None:
        return out.logits[0, -1], None
    K = pruning_loc
    ids = sample["input_ids"][0].tolist()
    start = ids.index(image_token_id)
    n_image = ids.count(image_token_id)
    T = len(ids)
    # Official FastV: mean over heads of layer K-1's attention, last query row, image columns.
    attn = out.attentions[K - 1]  # (1, H, T, T)
    scores = attn.float().mean(dim=1)[0, -1, start : start + n_image]  # (N,)
    # Rank by (score descending, index ascending); Python's sort is stable.
    order = sorted(range(n_image), key=lambda j: -scores[j].item())
    dev = sample["input_ids"].device  # everything built here lives with the model's inputs
    kept = torch.tensor(sorted(order[:keep]), dtype=torch.long, device=dev) if forced is None else forced.long()
    if scores_out is not None:
        scores_out.append(scores)
    keep_idx = torch.cat([torch.arange(start, device=dev), start + kept.to(dev),
                          torch.arange(start + n_image, T, device=dev)])  # (T',)

    lm = adapter.language_model(model)
    h = out.hidden_states[K][:, keep_idx]  # (1, T', D): the input of layer K
    position_ids = adapter.hf_position_ids(model, sample)[..., keep_idx]  # (1, T') or (R, 1, T'): original
    rope = lm.rotary_emb(h, position_ids)
    n = h.shape[1]
    mask = torch.full((n, n), torch.finfo(h.dtype).min, device=dev).triu(1)[None, None]  # (1, 1, T', T') causal
    with eager_attention(model):
        for layer in lm.layers[K:]:
            o = layer(h, attention_mask=mask, position_embeddings=rope, position_ids=position_ids)
            h = o[0] if isinstance(o, tuple) else o
    logits = adapter.lm_head(model)(lm.norm(h))[0, -1]  # (V,)
    return logits, kept


def _rank(scores: Tensor, keep: int) -> Tensor:
    """The `keep` best of (N,) scores under (score descending, index ascending), in ascending order."""
    order = sorted(range(len(scores)), key=lambda j: -scores[j].item())  # Python's sort is stable
    return torch.tensor(sorted(order[:keep]), dtype=torch.long, device=scores.device)


def _fastv_deepstack(model: nn.Module, adapter: Any, sample: dict[str, Tensor], image_token_id: int, K: int,
                     keep: int | None, forced: Tensor | None, scores_out: list | None) -> tuple[Tensor, Tensor]:
    """FastV on a model with DeepStack (Qwen3-VL), one unpadded sample, HF's modules layer by layer."""
    mm = model.model
    ids = sample["input_ids"]
    feats = mm.get_image_features(sample["pixel_values"], sample["image_grid_thw"])
    visual = ids == image_token_id  # (1, T)
    h = mm.language_model.embed_tokens(ids).clone()  # (1, T, D)
    h[visual] = torch.cat(list(feats.pooler_output), dim=0).to(h.dtype)
    deep = [torch.cat(list(f), dim=0) for f in feats.deepstack_features]  # (N, D) each
    pos = adapter.hf_position_ids(model, sample)  # (3, 1, T): HF's get_rope_index
    where = visual[0].nonzero().flatten().tolist()
    start, N = where[0], len(where)
    lm = adapter.language_model(model)
    captured: dict[str, Tensor] = {}
    kept = None

    def capture(_module: nn.Module, _args: Any, output: Any) -> None:
        captured["probs"] = output[1]  # (1, H, T, T): eager attention's probabilities

    with eager_attention(model):
        for j, layer in enumerate(lm.layers):
            if j == K:  # official FastV: layer K-1's last query row, head mean, image columns
                scores = captured["probs"].float().mean(1)[0, -1, start : start + N]  # (N,)
                if scores_out is not None:
                    scores_out.append(scores)
                kept = _rank(scores, keep) if forced is None else forced.long().to(h.device)
                idx = torch.cat([torch.arange(start, device=h.device), start + kept,
                                 torch.arange(start + N, h.shape[1], device=h.device)])  # (T',)
                h, pos, visual = h[:, idx], pos[..., idx], visual[:, idx]
                deep = [d[kept] for d in deep]
            n = h.shape[1]
            causal = torch.full((n, n), torch.finfo(h.dtype).min, device=h.device).triu(1)[None, None]  # (1, 1, n, n)
            hook = layer.self_attn.register_forward_hook(capture) if j == K - 1 else None
            try:
                o = layer(h, attention_mask=causal, position_embeddings=lm.rotary_emb(h, pos), position_ids=pos)
            finally:
                if hook is not None:
                    hook.remove()
            h = o[0] if isinstance(o, tuple) else o
            if j < len(deep):
                h = lm._deepstack_process(h, visual, deep[j])  # HF's own DeepStack step
    return adapter.lm_head(model)(lm.norm(h)[:, -1])[0], kept

