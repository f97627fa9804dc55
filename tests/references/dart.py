"""Independent eager reference of DART as LightCompress runs it (`llmc/compression/token_reduction/dart.py`,
registered as 'DART'; config `configs/sparsification/methods/DART/dart.yml`: `pruning_loc: 5`,
`reduction_ratio: 0.7778`, `pivot_image_token: 4`, `pivot_text_token: 4`, directly under `sparse.special`).

What LightCompress does (prefill, batch 1):
* A forward hook on block K-1 keeps `past_key_value.key_cache[K-1]` (B, Hkv, T, d): the keys after RoPE.
* A pre-hook on block K takes the hidden states entering it and `last_layer_state = model.norm(hidden)`.
  `TOKEN_TOPK = int(N·(1 - reduction_ratio) / (pivot_image_token + pivot_text_token))`. The keys are permuted
  and flattened to (T, Hkv·d); the image pivots are `topk(pivot_image_token)` of the L1 norms over the image
  span, the text pivots `topk(pivot_text_token)` over every token after the image. The pivot set (a Python
  set of sequence indices) is visited once; for each pivot the `TOKEN_TOPK` candidates with the largest
  `-cosine_similarity(last_layer_state[pivot], last_layer_state[candidates])` are added to the kept set and
  removed from the candidates (initially every image token but the image pivots). The text pivots are then
  removed from the set; text tokens are all kept. `position_ids = cache_position = keep`: original positions
  (P1), the RoPE cos/sin sliced the same way.

This reference: HF's forward with `use_cache=True, output_hidden_states=True` for the cache and the hidden
states, the loop above in Python with the pivots visited in ascending index (the static version's fixed order;
a Python set's order is an accident of hashing) and ties going to the lower index (`torch.sort(stable=True)`),
then HF's decoder layers K.. on the survivors with their original position ids, eager attention, one
unpadded sample, fp32.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from tests.references.randomprune import causal_additive
from tokcompile.reference import eager_attention


def _top(values: Tensor, k: int) -> list[int]:
    """Indices of the k largest values, ties to the lower index."""
    return torch.sort(values, descending=True, stable=True).indices[:k].tolist()


@torch.no_grad()
def dart_reference(model: nn.Module, adapter: Any, sample: dict[str, Tensor], *, image_token_id: int,
                   pruning_loc: int, reduction_ratio: float, pivot_image_token: int = 4,
                   pivot_text_token: int = 4) -> tuple[Tensor, Tensor]:
    """DART's next-token logits (V,) and kept image tokens (k,) (relative to the span, ascending) for ONE
    unpadded sample."""
    lm = adapter.language_model(model)
    ids = sample["input_ids"][0]
    T = ids.shape[0]
    image_pos = torch.nonzero(ids == image_token_id).flatten()
    start, N = int(image_pos[0]), image_pos.shape[0]
    with eager_attention(model):
        out = model(**sample, output_hidden_states=True, use_cache=True)
    keys = out.past_key_values.layers[pruning_loc - 1].keys[0]  # (Hkv, T, d) after RoPE
    states = keys.permute(1, 0, 2).reshape(T, -1).float()  # (T, Hkv·d)
    hidden = out.hidden_states[pruning_loc]  # (1, T, D) entering block K
    last_layer_state = lm.norm(hidden)[0].float()  # (T, D)
    per_pivot = int(N * (1 - reduction_ratio) / (pivot_image_token + pivot_text_token))
    l1 = states.abs().sum(-1)  # (T,)
    image_pivots = [start + i for i in _top(l1[start:start + N], pivot_image_token)]
    text_pivots = [start + N + i for i in _top(l1[start + N:], pivot_text_token)]
    kept = set(image_pivots)
    candidates = sorted(set(range(start, start + N)) - set(image_pivots))
    for pivot in sorted(image_pivots + text_pivots):
        sim = torch.nn.functional.cosine_similarity(last_layer_state[pivot][None], last_layer_state[candidates],
                                                    dim=-1)
        picks = [candidates[i] for i in _top(-sim, per_pivot)]
        kept.update(picks)
        candidates = [c for c in candidates if c not in set(picks)]
    image_kept = sorted(kept)
    keep = torch.tensor(list(range(start)) + image_kept + list(range(start + N, T)))
    with eager_attention(model):
        h = hidden[:, keep]
        position_ids = adapter.hf_position_ids(model, sample)[..., keep]  # P1
        rope = lm.rotary_emb(h, position_ids)
        mask = causal_additive(h.shape[1], h.dtype)
        for layer in lm.layers[pruning_loc:]:
            o = layer(h, attention_mask=mask, position_embeddings=rope, position_ids=position_ids)
            h = o[0] if isinstance(o, tuple) else o
    logits = adapter.lm_head(model)(lm.norm(h))[0, -1]
    return logits.float(), torch.tensor([i - start for i in image_kept])
