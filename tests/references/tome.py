"""Independent eager reference of ToMe (Token Merging) in LLaVA's CLIP vision tower, LightCompress-style.

Read: ModelTC/LightCompress `llmc/compression/token_reduction/tome.py` (with `token_reduction_module.py`,
`base_blockwise_token_reduction.py`, `llmc/models/llava_hf.py::find_blocks`) and the official
facebookresearch/ToMe `tome/merge.py`, `tome/utils.py::parse_r`, `tome/patch/timm.py`.

What LightCompress does
-----------------------
* `blocks` = every CLIP encoder layer of the vision tower (`vision_model.encoder.layers`, all of them, the
  last one included even though LLaVA's `vision_feature_layer=-2` discards its output).
* `r`: an int -> the same r in every block; a list/tuple of length 2 -> `(start, step)`,
  `r_l = max(int(start + l*step), 0)` (NOT ToMe's `(r, inflect)`); any other list -> one entry per block
  (missing entries 0, extra entries ignored), each `max(int(v), 0)`. Blocks with r = 0 are left unpatched.
* Patched `CLIPEncoderLayer.forward`: `x = x + attn(ln1(x))` with plain SDPA attention (no proportional
  attention); the patched attention also returns `key_states.mean(1)`: the keys (`k_proj(ln1(x))`, bias
  included) averaged over heads, shape (B, t, head_dim). Then ToMe's own `bipartite_soft_matching(metric, r,
  class_token=True)`: L2-normalise, A = even positions, B = odd positions, `S = A @ B^T`, CLS row of S set to
  -inf, `r = min(r, (t-1)//2)`, `node_max, node_idx = S.max(-1)`, `edge_idx = node_max.argsort(descending)`
  (unstable), first r sources merge into `node_idx`, unmerged A re-sorted by index (CLS first), output
  `[unmerged A] ++ [all B]`. `merge_wavg(merge, x)` is called WITHOUT sizes: sizes are 1 in every block
  (reset per block, the returned size is discarded), so each B token becomes the plain mean of itself and
  its sources (`scatter_reduce(..., 'sum')` of x*1, divided by the summed ones). Then `x = x + mlp(ln2(x))`.
* LLaVA then takes hidden_states[-2], drops index 0 (CLS, still first), projects, and the LLM sees the
  shorter image span with contiguous positions (P0).

Official ToMe differences (available here with `prop_attn=True`): sizes are carried across blocks
(`merge_wavg` sums them) and `log(size)` is added to every query's logit for each key (proportional
attention, ToMe's off-the-shelf default). `parse_r` treats a pair as `(r, inflect)`:
`min = int(r*(1-inflect))`, `max = 2r - min`, `r_l = int(min + (max-min)/(L-1)*l)`, a list shorter than L
is padded with zeros, L = number of blocks of the ViT.

Where this reference differs from LightCompress, and why
--------------------------------------------------------
* Tie order: LightCompress's `argsort(descending=True)` is not stable, so the order among equal `node_max`
  is unspecified; here A tokens are ordered by (node_max descending, A index ascending). Ties inside a row
  of S (several B with the same max) go to the lowest B index (torch.max's documented first index; made
  explicit here).
* The weighted average is computed with an explicit per-destination loop instead of `scatter_reduce`:
  same value, float summation order may differ at the ~1e-7 level.
* Batch 1, one unpadded sample, fp32, eager attention; the HF LLaVA (not the original repo) is used, and
  the merged image span is spliced into `inputs_embeds` directly (HF's placeholder-count check would
  otherwise reject the shorter span; LightCompress relies on the original LLaVA repo's variable-length
  splice, which gives the same P0 sequence).
* The block that never runs (after the feature layer) is not run; in LightCompress it runs and merges, but
  its output is discarded, so the features are the same.
* `tome_schedule` reads a pair as ToMe's `(r, inflect)` by default (its `parse_r`); pass
  `pair="start_step"` for LightCompress's `(start, step)` reading of the same YAML list.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from tokcompile.reference import eager_attention as _eager  # HF's own eager attention, restored on exit


# --------------------------------------------------------------------------------------------------------
# schedule
# --------------------------------------------------------------------------------------------------------
def tome_schedule(r: int | float | Sequence[int | float], n_blocks: int, *, pair: str = "inflect") -> list[int]:
    """Per-block r for `n_blocks` blocks.

    * int: `[r] * n_blocks`.
    * a pair `[r, inflect]` (pair="inflect", ToMe's `parse_r`): `min = int(r*(1-inflect))`, `max = 2r - min`,
      `r_l = int(min + (max-min)/(n_blocks-1)*l)`. With pair="start_step" (LightCompress's reading):
      `r_l = int(start + l*step)`.
    * any other list: one entry per block, padded with zeros, extra entries dropped.
    Negative values become 0 (LightCompress clamps; for ToMe r <= 0 means no merge anyway).
    """
    if isinstance(r, bool):
        raise TypeError("r must be an int, a pair or a list")
    if isinstance(r, (int, float)):
        out = [int(r)] * n_blocks
    elif isinstance(r, (list, tuple)) and len(r) == 2:
        if pair == "inflect":
            r0, inflect = r
            lo = int(r0 * (1.0 - inflect))
            hi = 2 * r0 - lo
            step = (hi - lo) / (n_blocks - 1) if n_blocks > 1 else 0.0
            out = [int(lo + step * i) for i in range(n_blocks)]
        elif pair == "start_step":
            start, step = r
            out = [int(start + i * step) for i in range(n_blocks)]
        else:
            raise ValueError(f"pair must be 'inflect' or 'start_step', got {pair!r}")
    elif isinstance(r, (list, tuple)):
        out = [int(v) for v in list(r)[:n_blocks]] + [0] * max(0, n_blocks - len(r))
    else:
        raise TypeError(f"r must be an int, a pair or a list, got {type(r).__name__}")
    return [max(v, 0) for v in out]


# --------------------------------------------------------------------------------------------------------
# one bipartite merge
# --------------------------------------------------------------------------------------------------------
def bipartite_merge(
    x: Tensor, metric: Tensor, r: int, size: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """ToMe's bipartite soft matching + size-weighted merge on ONE sequence, CLS (position 0) protected.

    Args:
        x: (t, C) tokens to merge.
        metric: (t, c) similarity features (not yet normalised).
        r: tokens to remove (clamped to (t-1)//2).
        size: (t,) token sizes, or None for all ones.

    Returns:
        x_out (t', C), size_out (t',), assign (t,) int64: output index of every input token.
    """
    t = x.shape[0]
    size = torch.ones(t, dtype=x.dtype) if size is None else size.to(x.dtype)
    r_eff = min(r, (t - 1) // 2)
    if r_eff <= 0:
        return x, size, torch.arange(t)
    a_pos = list(range(0, t, 2))
    b_pos = list(range(1, t, 2))
    m = metric / metric.norm(dim=-1, keepdim=True)
    S = m[a_pos] @ m[b_pos].T  # (nA, nB)
    S[0, :] = -math.inf  # CLS never a source
    node_max = S.max(dim=-1).values  # (nA,)
    cols = torch.arange(len(b_pos)).expand_as(S)
    # lowest B index among the row's maxima
    node_idx = torch.where(S == node_max[:, None], cols, len(b_pos)).min(dim=-1).values
    node_idx[0] = 0  # CLS row is all -inf; its destination is never used
    # (node_max descending, A index ascending): Python's sort is stable
    order = sorted(range(len(a_pos)), key=lambda i: -node_max[i].item())
    sources = order[:r_eff]
    unmerged = sorted(order[r_eff:])
    assert unmerged[0] == 0, "CLS must stay first"
    n_unm = len(unmerged)

    assign = torch.empty(t, dtype=torch.long)
    for k, i in enumerate(unmerged):
        assign[a_pos[i]] = k
    for j, p in enumerate(b_pos):
        assign[p] = n_unm + j
    for i in sources:
        assign[a_pos[i]] = n_unm + int(node_idx[i])

    rows = []
    sizes = []
    for i in unmerged:
        rows.append(x[a_pos[i]])
        sizes.append(size[a_pos[i]])
    for j, p in enumerate(b_pos):
        num = size[p] * x[p]
        den = size[p]
        for i in sources:
            if int(node_idx[i]) == j:
                num = num + size[a_pos[i]] * x[a_pos[i]]
                den = den + size[a_pos[i]]
        rows.append(num / den)
        sizes.append(den)
    return torch.stack(rows), torch.stack(sizes), assign


# --------------------------------------------------------------------------------------------------------
# the CLIP block with ToMe
# --------------------------------------------------------------------------------------------------------
def tome_clip_block(
    block: nn.Module, x: Tensor, r: int, size: Tensor | None, prop_attn: bool
) -> tuple[Tensor, Tensor | None, Tensor]:
    """One CLIPEncoderLayer on x (t, D) with ToMe between the attention residual and the MLP.

    Returns x_out (t', D), the sizes to carry (None when sizes are reset: LightCompress), assign (t,)."""
    attn = block.self_attn
    t, D = x.shape
    H = attn.num_heads
    hd = D // H
    h = block.layer_norm1(x)
    q = attn.q_proj(h).view(t, H, hd).transpose(0, 1)  # (H, t, hd)
    k = attn.k_proj(h).view(t, H, hd).transpose(0, 1)
    v = attn.v_proj(h).view(t, H, hd).transpose(0, 1)
    logits = (q @ k.transpose(-1, -2)) * attn.scale  # (H, t, t)
    if prop_attn and size is not None:
        logits = logits + size.log()[None, None, :]
    probs = torch.softmax(logits, dim=-1)
    o = (probs @ v).transpose(0, 1).reshape(t, D)
    x = x + attn.out_proj(o)

    metric = k.mean(dim=0)  # (t, hd): keys averaged over heads
    if r > 0:
        x, new_size, assign = bipartite_merge(x, metric, r, size if prop_attn else None)
    else:
        new_size, assign = size, torch.arange(t)
    x = x + block.mlp(block.layer_norm2(x))
    return x, (new_size if prop_attn else None), assign



@torch.no_grad()
def tome_reference(
    model: nn.Module,
    adapter: Any,
    sample: dict[str, Tensor],
    *,
    image_token_id: int,
    r_per_block: list[int],
    prop_attn: bool,
) -> tuple[Tensor, list[Tensor]]:
    """Next-token logits (V,) and per-block assignments for ONE unpadded LLaVA sample with ToMe in CLIP.

    Args:
        model: HF `LlavaForConditionalGeneration` (int `vision_feature_layer`, "default" strategy).
        adapter: the family adapter; only `language_model(model)` and `lm_head(model)` are used.
        sample: `input_ids` (1, T) with N contiguous image placeholders, `pixel_values` (1, 3, H, W).
        image_token_id: the placeholder id.
        r_per_block: r for each block that runs (length = blocks up to the feature layer) or for every
            block of the tower (the entries of blocks that do not run are ignored).
        prop_attn: False = LightCompress (sizes reset to 1 per block, plain attention); True = official ToMe
            (sizes carried, log(size) added to the attention logits).

    Returns:
        logits (V,) of the last prompt token; assigns[l] (t_in,) int64: for each token entering block l's
        merge (CLS at 0), its index in that block's output (identity when the block removes nothing).
    """
    cfg = model.config
    tower = model.model.vision_tower
    vm = getattr(tower, "vision_model", tower)
    layers = vm.encoder.layers
    n_total = len(layers)
    f = cfg.vision_feature_layer
    if not isinstance(f, int):
        raise ValueError("ToMe reference supports a single int vision_feature_layer")
    n_run = n_total + 1 + f if f < 0 else f
    if len(r_per_block) not in (n_run, n_total):
        raise ValueError(f"r_per_block needs {n_run} (or {n_total}) entries, got {len(r_per_block)}")
    if cfg.vision_feature_select_strategy != "default":
        raise ValueError("ToMe reference expects the 'default' strategy (CLS dropped)")

    pv = sample["pixel_values"].to(vm.embeddings.patch_embedding.weight.dtype)
    x = vm.embeddings(pv)[0]  # (t0, Dv)
    if getattr(vm, "pre_layrnorm", None) is not None:
        x = vm.pre_layrnorm(x)
    size: Tensor | None = None
    assigns: list[Tensor] = []
    for block, r in zip(layers[:n_run], r_per_block[:n_run]):
        x, size, assign = tome_clip_block(block, x, int(r), size, prop_attn)
        assigns.append(assign)
    feats = model.model.multi_modal_projector(x[1:][None])[0]  # (N', D): CLS dropped

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
    h = out.last_hidden_state  # HF's text model already applies the final norm
    logits = adapter.lm_head(model)(h)[0, -1]
    return logits, assigns
