"""Independent eager reference for DivPrune (CVPR 2025), written the way LightCompress runs it.

Read: ModelTC/LightCompress `llmc/compression/token_reduction/divprune.py` (last changed in #441,
"prune for qwen2.5vl", 2025-10-30) and, for comparison, the official vbdi/divprune
`LLaVA/llava/model/llava_arch.py` (`DivPrune`, `prepare_inputs_labels_for_multimodal`).

What LightCompress does (prefill only, batch element 0):
* Takes the image span `inputs_embeds[0][S : S + N]` of the decoder's input embeddings (the projector
  output spliced in), with `S = vision_token_start_index` from the config (hard-coded 35 for LLaVA-1.5,
  15 for Qwen2.5-VL) and `N` from the config (LLaVA) or counted from `input_ids == vision_token_index`
  (Qwen2.5-VL, a pre-hook on `embed_tokens`).
* `divprune()`: `k = round((1 - reduction_ratio) * N)` (Python `round`, i.e. half to even; the official
  repo writes `int(round(...))`, the same thing). Cosine matrix `x / x.norm(dim=1, keepdim=True)`, then
  `mm(xn, xn.T)`, distance `D = 1 - cos`, all in the model dtype. Pick 0:
  `argmax(topk(D, 2, dim=0, largest=False).values[1])`, i.e. the column whose second-smallest entry
  (nearest neighbour, the smallest being the token itself) is largest. Pick i > 0:
  `argmax(min(D[selected rows], dim=0))`. `torch.argmax` returns the first maximal index.
* Keep index = [0, S) ++ (S + picks) ++ [S + N, T), sorted; gathers `inputs_embeds`, `attention_mask`
  and `position_ids` with it.
  - LLaVA (`Llava` class = the original LLaVA repo; the hook wraps `prepare_inputs_labels_for_multimodal`):
    `position_ids` is None there for unpadded input, so the decoder numbers the shorter prompt 0..T'-1 (P0).
  - Qwen2.5-VL: a forward pre-hook on `model.language_model` gathers the (3, B, T) M-RoPE ids along the
    last axis (original ids kept) and sets `cache_position = keep_idx`.

This reference: HF's `get_image_features` (LLaVA: config's vision_feature_layer / select strategy; Qwen:
pixel_values + image_grid_thw), `embed_tokens` + splice at the image-token positions, the greedy selection
below on the spliced span in fp32, the gather, then HF's text model called with `inputs_embeds`,
`position_ids` (LLaVA: arange(T'); Qwen: `adapter.hf_position_ids` = HF `get_rope_index` on the full
prompt, gathered with the keep index), an all-ones attention mask and no cache; its output is already
final-normed, `lm_head` is applied to the last token.

Differences from LightCompress (all deliberate):
1. The image span is found from `input_ids == image_token_id` (must be one contiguous run), not from the
   hard-coded start index / configured length; any prompt template works.
2. Pick 0 uses the minimum over the column with the diagonal excluded, where LightCompress takes the
   second-smallest entry of the column. They differ only when a token's own numerical distance
   `D[j, j]` (~ +/-1e-7) is not its column's minimum, i.e. for (near-)duplicate tokens.
3. Already picked tokens are excluded explicitly. LightCompress relies on their min-distance being
   `D[s, s]` ~ 0; if every remaining candidate is a (near-)duplicate of a picked token, LightCompress may
   pick an index twice (and the kept set then has fewer distinct tokens); here it never does.
4. Ties (argmax): lowest index wins, exactly like `torch.argmax`; written as a strict `>` scan.
5. Orientation: the score of candidate j uses column j (`D[s, j]`, min over picked rows s), as
   LightCompress does. `D` is computed in fp32 with LightCompress's formula (no eps in the norm).
6. One unpadded sample only (LightCompress also only prunes batch element 0's span for the whole batch).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn


def keep_count(n: int, reduction_ratio: float) -> int:
    """LightCompress's budget: Python `round((1 - ratio) * n)` (half to even)."""
    return round((1 - reduction_ratio) * n)


def cosine_distance(features: Tensor) -> Tensor:
    """(N, D) -> (N, N) `1 - cos`, the way LightCompress computes it (normalise rows, then one matmul)."""
    x = features.float()
    xn = x / x.norm(dim=1, keepdim=True)
    return 1.0 - xn @ xn.t()


def _argmax_first(scores: list[float]) -> int:
    """Index of the largest score; ties go to the lowest index."""
    best = 0
    for j in range(1, len(scores)):
        if scores[j] > scores[best]:
            best = j
    return best


def divprune_select(features: Tensor, k: int) -> Tensor:
    """Greedy max-min diversity: (N, D) features -> (k,) int64 kept indices in ascending order."""
    dist = cosine_distance(features)  # (N, N)
    n = dist.shape[0]
    if k <= 0:
        return torch.empty(0, dtype=torch.long)
    d = dist.tolist()  # d[i][j]: row i (a picked token), column j (a candidate)
    # Pick 0: each column's nearest-neighbour distance, the token itself excluded.
    nn_dist = [min((d[i][j] for i in range(n) if i != j), default=math.inf) for j in range(n)]
    picks = [_argmax_first(nn_dist)]
    # min distance of every candidate to the picked set, updated one pick at a time
    min_dist = [d[picks[0]][j] for j in range(n)]
    while len(picks) < k:
        scores = [(-math.inf if j in picks else min_dist[j]) for j in range(n)]
        j_new = _argmax_first(scores)
        picks.append(j_new)
        min_dist = [min(min_dist[j], d[j_new][j]) for j in range(n)]
    return torch.tensor(sorted(picks), dtype=torch.long)


def _image_features(model: nn.Module, sample: dict[str, Tensor]) -> Tensor:
    """HF's own vision path: the projected image features of the one image, (N, D)."""
    inner = model.model
    if "image_grid_thw" in sample:  # Qwen2-VL / Qwen2.5-VL
        out = inner.get_image_features(sample["pixel_values"], sample["image_grid_thw"], return_dict=True)
    else:  # LLaVA: vision_feature_layer / select strategy default to the config's
        out = inner.get_image_features(pixel_values=sample["pixel_values"], return_dict=True)
    feats = out.pooler_output
    if isinstance(feats, (list, tuple)):
        feats = torch.cat(list(feats), dim=0)
    return feats.reshape(-1, feats.shape[-1])


@torch.no_grad()
def divprune_reference(
    model: nn.Module,
    adapter: Any,
    sample: dict[str, Tensor],
    *,
    image_token_id: int,
    reduction_ratio: float,
) -> tuple[Tensor, Tensor]:
    """Next-token logits (V,) and kept image indices (k,) (int64, ascending, within the image span).

    `sample` is one unpadded sample as a batch of one (the processor's outputs). `adapter` is used only for
    `language_model`, `lm_head` and, for multi-row RoPE, `hf_position_ids` (HF's `get_rope_index`).
    """
    ids = sample["input_ids"][0]
    T = ids.shape[0]
    where = (ids == image_token_id).nonzero().flatten().tolist()
    start, N = where[0], len(where)
    assert where == list(range(start, start + N)), "the image span must be one contiguous run"

    lm = adapter.language_model(model)
    feats = _image_features(model, sample)  # (N, D)
    assert feats.shape[0] == N, (feats.shape, N)
    embeds = lm.embed_tokens(sample["input_ids"]).clone()  # (1, T, D)
    embeds[0, start : start + N] = feats.to(embeds.dtype)

    k = keep_count(N, reduction_ratio)
    kept = divprune_select(embeds[0, start : start + N], k)  # (k,)
    keep_idx = torch.cat([torch.arange(start), start + kept, torch.arange(start + N, T)])  # (T',)
    h = embeds[:, keep_idx]  # (1, T', D)
    n = h.shape[1]

    if getattr(adapter, "rope", "1d") == "1d":
        position_ids = torch.arange(n)[None]  # P0: the shorter prompt is numbered 0..T'-1
    else:
        position_ids = adapter.hf_position_ids(model, sample)[..., keep_idx]  # (3, 1, T'): original M-RoPE ids

    out = lm(
        inputs_embeds=h,
        position_ids=position_ids,
        attention_mask=torch.ones(1, n, dtype=torch.long),
        use_cache=False,
    )
    logits = adapter.lm_head(model)(out.last_hidden_state[:, -1])[0]  # (V,): the text model applies its norm
    return logits, kept
