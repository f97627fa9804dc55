"""Independent eager reference of LightCompress's RandomPrune (`metric: random`), the random-selection baseline.

What LightCompress does (ModelTC/LightCompress, `llmc/compression/token_reduction/random.py`, class
`RandomPrune`, registered as 'RandomPrune'; read at the mirror's HEAD):
* Keys under `sparse.special`: `pruning_loc` (K), `prune_ratio` (R) and `metric` (`random` or
  `holitom_merge`); all three are read without defaults. No config file for it ships in
  `configs/sparsification/methods/`.
* With `metric: random` a forward PRE-hook on decoder block K (`self.blocks[pruning_loc]`, so K = 0 prunes
  before the first decoder layer, still inside the LLM) runs at prefill only (`prefill_wrapper` skips inputs of
  length 1). It takes the image span [s, s+N) (s from the model's pruning config, N counted from the image
  placeholders), `num_keep = round(N * (1 - R))` (Python round, half to even), draws
  `rand_idx = torch.randperm(N)[:num_keep]` from the global torch RNG on a prompt's first turn (stored in a
  buffer and reused on later turns), keeps `[0, s) ++ (s + rand_idx) ++ [s+N, T)` sorted, gathers the hidden
  states, sets `position_ids = cache_position = keep` and slices the precomputed `(cos, sin)` with the same
  indices: survivors keep their original RoPE positions (P1). The causal mask is cut to T' x T'.
  Layers < K never see the change. The one kept set is applied to every row of the batch.
* With `metric: holitom_merge` it instead re-runs block K-1 with `output_attentions`, keeps the top
  `num_keep` image tokens by the head-mean last-token attention row (FastV's score), adds every other image
  token into its most cosine-similar kept token (Python loops over tokens, in place) and averages; that is not
  a random choice and is not covered here.

Differences here, and why.
* The draw: LightCompress's `torch.randperm` on the global generator gives a new set per prompt. Here the set
  comes from `seed` through numpy's PCG64 (`Generator(PCG64(seed)).permutation(N)`, first `num_keep`), the
  generator the static method bakes into its graph, so both sides can be compared index for index.
* The image span is found from `image_token_id` (all placeholder positions), not a configured start index.
* One unpadded sample, batch 1, fp32, eager attention with an explicit additive causal mask over the survivors
  (LightCompress slices the model's causal mask to T' x T': the same mask for one unpadded sample).
* Qwen2.5-VL: the original M-RoPE ids of the survivors (HF's `get_rope_index` rows) are gathered and RoPE is
  recomputed from them. LightCompress slices `position_embeddings[0][:, keep, :]`, which equals this with the
  recomposed (B, T, d) cos/sin of recent transformers; with older versions' (3, B, T, d) cos/sin that slice
  would land on the batch axis (its holitom_merge and FastV pick axis 2 for 4-D tensors).
* Only the prefill's next-token logits are produced (no KV cache, no later turns).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from tokcompile.reference import eager_attention  # HF's own eager attention, restored on exit


def causal_additive(n: int, dtype: torch.dtype) -> Tensor:
    """(1, 1, n, n) additive mask: 0 at and below the diagonal, the dtype's minimum above it."""
    upper = torch.ones(n, n, dtype=torch.bool).triu(1)
    return torch.zeros(n, n, dtype=dtype).masked_fill(upper, torch.finfo(dtype).min)[None, None]


def num_keep(n: int, prune_ratio: float) -> int:
    """LightCompress's `round(image_token_length * (1 - rate))`."""
    return round(n * (1 - prune_ratio))


def draw_rand_idx(n: int, prune_ratio: float, seed: int) -> Tensor:
    """`randperm(N)[:num_keep]` with a seeded PCG64 in place of the global torch RNG: (num_keep,) int64,
    in draw order (not sorted), as LightCompress's `rand_idx`."""
    perm = np.random.Generator(np.random.PCG64(seed)).permutation(n)
    return torch.from_numpy(perm[: num_keep(n, prune_ratio)].astype(np.int64))


@torch.no_grad()
def randomprune_reference(
    model: nn.Module,
    adapter: Any,
    sample: dict[str, Tensor],
    *,
    image_token_id: int,
    pruning_loc: int,
    prune_ratio: float,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """RandomPrune's next-token logits for ONE unpadded sample (batch of one).

    Args:
        model: the HF vision-language model (fp32).
        adapter: its family adapter; used only for `language_model`, `lm_head` and `hf_position_ids`.
        sample: the processor's outputs for one sample, no padding.
        image_token_id: the image placeholder id; its positions form the image span.
        pruning_loc: K in 0..L-1; the pre-hook of decoder block K prunes.
        prune_ratio: R, the fraction of image tokens pruned.
        seed: seeds the draw of the kept set.

    Returns:
        logits: (V,) fp32 next-token logits of the last prompt token.
        kept: (num_keep,) int64 kept image tokens, as indices into the image span, ascending.
    """
    lm = adapter.language_model(model)
    L = len(lm.layers)
    if not 0 <= pruning_loc < L:
        raise ValueError(f"pruning_loc={pruning_loc} outside 0..{L - 1}")
    ids = sample["input_ids"][0]  # (T,)
    T = ids.shape[0]
    image_pos = torch.nonzero(ids == image_token_id).flatten()  # (N,)
    N = image_pos.shape[0]
    if N == 0:
        raise ValueError("the sample holds no image token")
    start = int(image_pos[0])
    assert torch.equal(image_pos, torch.arange(start, start + N)), "the image span must be contiguous"

    rand_idx = draw_rand_idx(N, prune_ratio, seed)
    vision_indexes = torch.arange(start, start + N)[rand_idx]
    keep = torch.cat([torch.arange(start), vision_indexes, torch.arange(start + N, T)]).sort().values  # (T',)

    with eager_attention(model):
        out = model(**sample, output_hidden_states=True, use_cache=False)
        h = out.hidden_states[pruning_loc][:, keep]  # (1, T', D): what block K receives, pruned
        position_ids = adapter.hf_position_ids(model, sample)[..., keep]  # P1: original ids
        rope = lm.rotary_emb(h, position_ids)
        mask = causal_additive(h.shape[1], h.dtype)
        for layer in lm.layers[pruning_loc:]:
            o = layer(h, attention_mask=mask, position_embeddings=rope, position_ids=position_ids)
            h = o[0] if isinstance(o, tuple) else o
    logits = adapter.lm_head(model)(lm.norm(h))[0, -1]  # (V,)
    return logits.float(), rand_idx.sort().values
