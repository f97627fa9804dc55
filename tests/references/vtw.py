"""Independent eager reference of VTW (Visual Tokens Withdrawal, AAAI 2025), and PACT's rule for its layer.

Method. Before decoder layer K runs, every image token is deleted from the sequence: layers K..L-1 see only
the text tokens (prefix and suffix), neither as queries nor as keys/values (nor in their KV cache). Layers
0..K-1 run the unreduced prompt. The surviving tokens keep their ORIGINAL position ids (P1, official
`pe_type="keep"`), so the text after the image keeps the gap the image left (1-D RoPE) or its M-RoPE ids
(Qwen2.5-VL: HF's own `get_rope_index` rows, gathered). Nothing is scored or ranked: there is no tie order.

Sources read.
* LightCompress (ModelTC/LightCompress @ 9701d035, `llmc/compression/token_reduction/`): it has NO VTW.
  The directory holds dart, divprune, dycoke, fastervlm, fastv, fastvid, holitom, mustdrop, prunevid,
  pyramiddrop, random, sparsevlm, tome, visionzip, vispruner (+ base/utils/visualizer); no file or
  config mentions VTW or withdrawal. So this reference follows the official code instead.
* Official lzhxmu/VTW @ a3d8cfc3, `llava/model/language_model/VTW.py` (`VTWLlamaModel.forward`): in the
  decoder loop, when `layer_idx == temp_cache.k` and the step is a prefill (`seq_length > 1`), in mode
  "vtw" with `pe_type == "keep"` it cuts `hidden_states` and `position_ids` to
  `[:, :system_token_nums] ++ [:, system_token_nums + image_token_nums:]` (hard-coded 35 and 576 for
  LLaVA-1.5) and runs the remaining layers on that; the causal mask is whatever the attention kernel
  builds for the shorter sequence (flash-attention: none, causal). Decode steps are not cut; their
  positions continue from the full prompt. `k` defaults to 15; `--findk` picks it by a KL threshold.
  The other `pe_type` renumbers positions contiguously (P2); mode "random" drops N random tokens.
* PACT (orailix/PACT @ cf9a0c9f): `transformers/models/qwen2/modeling_qwen2.py` (and the same lines in
  `qwen2_vl/modeling_qwen2_vl.py`), `configs/vtw.json`, `scripts/test_different_methods_llava-onevision7b.sh`.
  With `withdraw_visual_tokens`, the first-stage mask keeps no image token at `index == layer_for_reduction`
  (before that decoder layer runs); `layer_for_reduction` is recomputed once from
  `VTW_equivalant_layer_for_reduction` (K0) and `equivalent_reduc_percentage_vtw` (p); see
  `vtw_equivalent_layer`.

Differences from the official code, and why.
* The image span is found from `image_token_id` (every placeholder position), not hard-coded [35, 611):
  the tiny models have other prompt layouts and sizes. For LLaVA-1.5-7B with its prompt it is the same span.
* One unpadded sample, batch 1, fp32, eager attention with an explicit additive causal mask over the
  survivors (the official code relies on flash-attention's implicit causal mask; same result).
* Only the prefill's next-token logits are produced (no KV cache, no decoding).
* K may be 0 (withdraw before the first layer: the LLM sees only the text, with original positions) up to
  L. With K == L no decoder layer runs after the withdrawal (the official loop never meets `layer_idx == L`),
  so the logits are the full forward's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from tokcompile.reference import eager_attention as _eager  # HF's own eager attention, restored on exit


def _additive_causal(n: int, dtype: torch.dtype) -> Tensor:
    """(1, 1, n, n): 0 on and below the diagonal, dtype-min above."""
    return torch.full((n, n), torch.finfo(dtype).min, dtype=dtype).triu(1)[None, None]


@torch.no_grad()
def vtw_reference(
    model: nn.Module,
    adapter: Any,
    sample: dict[str, Tensor],
    *,
    image_token_id: int,
    pruning_loc: int,
) -> tuple[Tensor, Tensor]:
    """VTW's next-token logits for ONE unpadded sample (batch of one).

    Args:
        model: the HF vision-language model (fp32).
        adapter: its family adapter; used only for `language_model`, `lm_head` and `hf_position_ids`
            (HF's own ids: (1, T), or (3, 1, T) for M-RoPE).
        sample: the processor's outputs for one sample, no padding.
        image_token_id: the image placeholder id; every position holding it is withdrawn.
        pruning_loc: K, 0 <= K <= L. Layers < K see the whole prompt; layers >= K only the text tokens.

    Returns:
        logits: (V,) fp32, the last prompt token's next-token logits.
        kept: (0,) int64, the image tokens (indices into the image span) that layers >= K still see: none.
    """
    lm = adapter.language_model(model)
    L = len(lm.layers)
    K = int(pruning_loc)
    if not 0 <= K <= L:
        raise ValueError(f"pruning_loc={K} outside 0..{L}")
    ids = sample["input_ids"][0]  # (T,)
    is_image = ids == image_token_id  # (T,)
    if not bool(is_image.any()):
        raise ValueError("the sample holds no image token")
    kept = torch.zeros(0, dtype=torch.long)

    with _eager(model):
        out = model(**sample, output_hidden_states=True, use_cache=False)
    if K == L:  # withdrawn after the last decoder layer: the last text token's logits are unchanged
        return out.logits[0, -1].float(), kept

    text_idx = torch.nonzero(~is_image).flatten()  # (T',) ascending original indices
    h = out.hidden_states[K][:, text_idx]  # (1, T', D): the input of layer K, image rows withdrawn
    position_ids = adapter.hf_position_ids(model, sample)[..., text_idx]  # P1: original ids, gathered
    rope = lm.rotary_emb(h, position_ids)
    mask = _additive_causal(h.shape[1], h.dtype)
    with _eager(model):
        for layer in lm.layers[K:]:
            o = layer(h, attention_mask=mask, position_embeddings=rope, position_ids=position_ids)
            h = o[0] if isinstance(o, tuple) else o
    logits = adapter.lm_head(model)(lm.norm(h))[0, -1]  # (V,)
    return logits.float(), kept


def vtw_equivalent_layer(n_layers: int, equivalent_layer: int, keep_fraction: float) -> int:
    """PACT's withdrawal layer K for VTW, matching a single-layer reduction's average visual-token count.

    Read in orailix/PACT @ cf9a0c9f, `transformers/models/qwen2/modeling_qwen2.py` (the same two lines are
    in `transformers/models/qwen2_vl/modeling_qwen2_vl.py`), run once when the text model first runs and
    `VTW_equivalant_layer_for_reduction != -1`. In my words: the total reduction fraction is one minus
    (one minus the percentage) times the share of layers after the equivalent layer,
    `frac = 1 - (1 - p) * ((L - K0) / L)`, and the withdrawal layer is Python's `round(frac * L)`
    (round half to even), which becomes `layer_for_reduction`.

    Here L = `n_layers`, K0 = `equivalent_layer` (`VTW_equivalant_layer_for_reduction`) and
    p = `keep_fraction` (`equivalent_reduc_percentage_vtw`). Despite its name, p is the fraction of visual
    tokens KEPT at K0 by the single-layer method being matched: PACT's scripts set it to 0.353 next to
    `pruning_tokeep_percentage_value=0.353` (FastV) and `perc_tokeep_tome_total=0.353` (ToMe), and p = 1
    gives K = L (nothing withdrawn), p = 0 gives K = K0. Why it matches: the single-layer method has
    N visual tokens in layers < K0 and p·N after, so N̄ = (1/L)·Σ_l N_l = N·(K0 + p·(L-K0))/L; VTW at K has
    N̄ = N·K/L; equal when K = K0 + p·(L - K0) = L·frac, rounded to a layer index.

    The float expression is evaluated in PACT's order, so a .5 case rounds as PACT does (to even).
    """
    L, K0, p = int(n_layers), int(equivalent_layer), float(keep_fraction)
    if L < 1:
        raise ValueError(f"n_layers={L} must be at least 1")
    if not 0 <= K0 <= L:
        raise ValueError(f"equivalent_layer={K0} outside 0..{L}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"keep_fraction={p} outside [0, 1]")
    reduction_perc_total = 1 - (1 - p) * ((L - K0) / L)
    return round(reduction_perc_total * L)
