"""Independent eager reference of PyramidDrop (CVPR 2025), written the way LightCompress runs it.

Method. The LLM is cut into stages at `layer_list` (e.g. [8, 16, 24] for 32 layers). Before each listed
decoder layer l runs, the image tokens still in the sequence are scored with THAT layer's own
`input_layernorm`, `q_proj`/`k_proj` and RoPE applied to the hidden states entering layer l: the softmax
(fp32) of the last token's query against every key (the last row of a causal mask hides nothing), averaged
over heads, read at the current image tokens. Stage s keeps `int(N * image_token_ratio_list[s])` of the
ORIGINAL N image tokens (the ratios are of the original count, not of the current one), the top ones by
score, re-sorted into their original order; text tokens are all kept. Layers from l on run on the
survivors only (fresh causal mask). Positions: P2 (`renumber_positions=True`, LLaVA, as LightCompress
does): from layer l on the survivors are renumbered 0..T'-1; P1 (`False`, Qwen2.5-VL M-RoPE): survivors
keep their original ids (HF's `get_rope_index` rows, gathered).

Source read: LightCompress (ModelTC/LightCompress @ 9701d035), `llmc/compression/token_reduction/
pyramiddrop.py` (with `token_reduction_module.py`, `utils.py` `prefill_wrapper`, and
`configs/sparsification/methods/PyramidDrop/pyramidrop.yml`: layer_list [8, 16, 24], ratios
[0.5, 0.25, 0.125], model type `Llava`, bs 1). What it does:
* A forward PRE-hook on each block in `layer_list` (`pruning_hook`); blocks after the first pruning layer
  that do not prune get `read_parameter_hook`, which overwrites their attention_mask / position_ids /
  position_embeddings with the ones the last pruning hook stored. Hooks return early in decoding
  (`prefill_wrapper`: sequence length 1), so only the prefill is pruned (KV pattern C2).
* `1.0` is prepended to the ratio list; at stage s the current image count is
  `int(vision_token_length * ratio[s])` and the kept count `int(vision_token_length * ratio[s+1])`:
  FLOOR (`int`), of the ORIGINAL count (576 for LLaVA-1.5).
* Scoring: `module.input_layernorm` on a detached copy of the block input, `self_attn.q_proj/k_proj`,
  `apply_rotary_pos_emb` with `cos, sin` = the model's `position_embeddings` at the first pruning layer,
  and at later ones `self_attn.rotary_emb(value_states, position_ids)` with the position ids the PREVIOUS
  stage renumbered. So the scores at stage s use the positions entering layer l (before this stage's
  renumbering): HF's 0..T-1 at the first stage, 0..T_s-1 after; the layers after use the renumbered
  0..T'-1 (`kwargs['position_embeddings'] = None` makes the attention recompute RoPE from them).
* The query is row `prompt_len + image_tokens - 1` = (text tokens + current image tokens) - 1: the LAST
  token of the whole (unpadded) sequence, i.e. the last prompt token, not a separately found "last
  instruction" token. Logits / sqrt(head_dim) + the 4-D causal mask, `softmax(dtype=float32)` then cast back
  to the model dtype: PROBABILITIES, not logits; mean over heads (and over the single query row); columns
  [image_index, image_index + image_tokens) where image_index is the first image-token index (it does not
  move: the text before the image is never pruned).
* `topk(keep_length).indices`, `+ image_index`, `.sort()`; new sequence = prefix ++ kept ++ suffix;
  positions `arange(0, len)` (P2, the `change_position_ids` style).
The official Cooperx521/PyramidDrop inference path (`llm_use_last_text`) uses the same `prompt_total_len-1`
row; its training path can use the token before the answer instead.

Where this reference differs from LightCompress, and why:
* Tie order: LightCompress uses `torch.topk`, whose order among equal scores is unspecified. Here:
  score descending, then original index ascending (a stable sort), the project-wide convention.
* GQA: LightCompress multiplies the query (H, 1, d) by the keys (H_kv, T, d) with no `repeat_kv`, which
  only works for MHA (LLaVA-1.5's Vicuna). The tiny models (4 heads, 2 KV heads) would crash there; here
  query head h uses KV head h // (H / H_kv), exactly as HF's attention does.
* Precision: fp32 throughout. LightCompress casts the fp32 softmax back to the model dtype (fp16 in its
  runs) before the head mean, which can create ties the fp32 scores do not have.
* Qwen2.5-VL: LightCompress's PyramidDrop only supports `LlavaHf` / `Llava` (any other class fails in
  `add_sparse_config`) and has no M-RoPE handling; here M-RoPE survivors keep their ORIGINAL (t, h, w)
  ids (P1), per the project spec. `renumber_positions=True` with multi-row positions is refused.
* Masks: LightCompress builds the next stage's mask from a 2-D padding mask (it only works when the block
  kwargs carry a 2-D mask or None, i.e. SDPA/flash with an implicit causal mask; with `padding_side !=
  'right'` the hook silently prunes nothing). Here: one unpadded sample, batch 1, eager attention with an
  explicit additive causal mask over the current tokens: the same attention.
* Only the prefill's next-token logits are produced. (LightCompress's decode steps are not re-hooked, so
  they take HF's positions T + t in every layer, not "(prefill length at that layer) + t".)
* `layer_list` must be strictly increasing and counts non-increasing (LightCompress assumes both: its stage
  index is `layer_list.index(layer)` and `topk` fails if asked for more tokens than are left). Layer 0 is
  allowed (the scores then use the embeddings).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from tokcompile.reference import eager_attention as _eager  # HF's own eager attention, restored on exit


def keep_count(n_original: int, ratio: float) -> int:
    """LightCompress: `int(vision_token_length * ratio)` (floor), ratio of the ORIGINAL image count."""
    return int(n_original * ratio)


def rank_keep(scores: Tensor, k: int) -> Tensor:
    """Ascending indices (k,) int64 of the k best scores; ties: lower index first."""
    vals = scores.tolist()
    order = sorted(range(len(vals)), key=lambda j: (-vals[j], j))
    return torch.tensor(sorted(order[:k]), dtype=torch.long)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def last_token_scores(layer: nn.Module, rotary_emb: nn.Module, h: Tensor, positions: Tensor) -> Tensor:
    """Head-mean attention probabilities (T,) of the last token over all T keys, as layer `layer` would see them.

    Args:
        layer: the HF decoder layer about to run (its `input_layernorm`, `self_attn.q_proj/k_proj` are used).
        rotary_emb: the text model's rotary embedding (cos/sin from position ids; M-RoPE sections included).
        h: (1, T, D) hidden states entering `layer`.
        positions: (1, T) or (R, 1, T) position ids of those tokens.
    """
    attn = layer.self_attn
    x = layer.input_layernorm(h)  # (1, T, D)
    T, d = x.shape[1], attn.head_dim
    q = attn.q_proj(x).view(1, T, -1, d).transpose(1, 2)  # (1, H, T, d)
    k = attn.k_proj(x).view(1, T, -1, d).transpose(1, 2)  # (1, Hkv, T, d)
    cos, sin = rotary_emb(x, positions)  # (1, T, d) each
    cos, sin = cos[:, None], sin[:, None]
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    H, Hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(H // Hkv, dim=1)  # query head h reads KV head h // (H / Hkv)
    logits = (q[0, :, -1:, :] @ k[0].transpose(1, 2)) / math.sqrt(d)  # (H, 1, T); last row: causal hides nothing
    probs = torch.softmax(logits.float(), dim=-1)
    return probs.mean(dim=0)[0]  # (T,)


@torch.no_grad()
def pyramiddrop_reference(
    model: nn.Module,
    adapter: Any,
    sample: dict[str, Tensor],
    *,
    image_token_id: int,
    layer_list: Sequence[int],
    image_token_ratio_list: Sequence[float],
    renumber_positions: bool,
) -> tuple[Tensor, list[Tensor]]:
    """Next-token logits (V,) and, per stage s, the kept image tokens (k_s,) int64, ascending, as indices
    into the image tokens ENTERING stage s (0..n_s-1; n_0 = N, n_{s+1} = k_s = int(N * ratio_s)).

    Args:
        model: the HF model (run with eager attention).
        adapter: family adapter: `language_model`, `lm_head`, `hf_position_ids` are used.
        sample: processor outputs for ONE unpadded sample (batch of one).
        image_token_id: the image placeholder id in `input_ids` (one contiguous span).
        layer_list: strictly increasing decoder-layer indices; pruning happens before each runs.
        image_token_ratio_list: per stage, the fraction of the ORIGINAL image count kept.
        renumber_positions: True: P2, survivors get positions 0..T'-1 from the pruning layer on (1-D RoPE
            only); False: P1, survivors keep HF's original position ids (all rows).
    """
    layer_list = [int(x) for x in layer_list]
    ratios = [float(r) for r in image_token_ratio_list]
    if len(layer_list) != len(ratios):
        raise ValueError("layer_list and image_token_ratio_list must have the same length")
    lm = adapter.language_model(model)
    layers = lm.layers
    if any(b <= a for a, b in zip(layer_list, layer_list[1:])) or any(not 0 <= x < len(layers) for x in layer_list):
        raise ValueError(f"layer_list must be strictly increasing within [0, {len(layers)}): {layer_list}")

    with _eager(model):
        out = model(**sample, output_hidden_states=True, use_cache=False)
    if not layer_list:
        return out.logits[0, -1], []

    ids = sample["input_ids"][0].tolist()
    start, N = ids.index(image_token_id), ids.count(image_token_id)
    if ids[start : start + N] != [image_token_id] * N:
        raise ValueError("the image tokens must form one contiguous span")
    positions = adapter.hf_position_ids(model, sample)  # (1, T) or (R, 1, T)
    if renumber_positions and positions.dim() != 2:
        raise ValueError("renumber_positions (P2) is defined for 1-D RoPE only; M-RoPE keeps its ids (P1)")

    h = out.hidden_states[layer_list[0]]  # (1, T, D): the input of the first pruning layer
    n_cur, done, kept_all = N, layer_list[0], []
    with _eager(model):
        for layer_idx, ratio in zip(layer_list, ratios):
            h = _run_layers(lm, layers[done:layer_idx], h, positions)
            k = keep_count(N, ratio)
            if not 0 <= k <= n_cur:
                raise ValueError(f"stage at layer {layer_idx} keeps {k} of {n_cur} current image tokens")
            scores = last_token_scores(layers[layer_idx], lm.rotary_emb, h, positions)[start : start + n_cur]
            kept = rank_keep(scores, k)  # (k,) relative to the current image span
            T = h.shape[1]
            keep_idx = torch.cat([torch.arange(start), start + kept, torch.arange(start + n_cur, T)])  # (T',)
            h = h[:, keep_idx]
            if renumber_positions:
                positions = torch.arange(keep_idx.numel(), dtype=positions.dtype)[None]  # P2: 0..T'-1
            else:
                positions = positions[..., keep_idx]  # P1: original ids
            kept_all.append(kept)
            n_cur, done = k, layer_idx
        h = _run_layers(lm, layers[done:], h, positions)
    logits = adapter.lm_head(model)(lm.norm(h))[0, -1]  # (V,)
    return logits, kept_all


def _run_layers(lm: nn.Module, layers: Sequence[nn.Module], h: Tensor, positions: Tensor) -> Tensor:
    """Run HF decoder layers on (1, T, D) with an explicit additive causal mask and RoPE from `positions`."""
    if len(layers) == 0:
        return h
    n = h.shape[1]
    mask = torch.full((n, n), torch.finfo(h.dtype).min, dtype=h.dtype).triu(1)[None, None]  # (1, 1, T, T)
    rope = lm.rotary_emb(h, positions)
    for layer in layers:
        o = layer(h, attention_mask=mask, position_embeddings=rope)
        h = o[0] if isinstance(o, tuple) else o
    return h
