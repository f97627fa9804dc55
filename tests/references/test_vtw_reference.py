"""Checks of the VTW reference that need no project implementation, on tiny LLaVA-1.5 and tiny Qwen2.5-VL."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.references.vtw import _additive_causal, _eager, vtw_equivalent_layer, vtw_reference
from tokcompile.models import ADAPTERS
from tokcompile.models.tiny import build_model, build_processor
from tokcompile.parity import process, random_images

QUESTION = "What is shown in this picture, in detail?"


def _sample(f: SimpleNamespace, seed: int) -> dict:
    images = random_images(np.random.default_rng(seed), 1, f.geom.image_size)
    batch = process(f.processor, f.adapter, f.geom, images, [QUESTION])
    return f.adapter.sample_inputs(batch, 0, f.geom)


@pytest.fixture(scope="module", params=["llava", "qwen2_5_vl"])
def fam(request) -> SimpleNamespace:
    model = build_model(request.param, seed=0).eval()
    adapter = ADAPTERS.get(request.param)()
    geom = adapter.geometry(model.config, None)
    f = SimpleNamespace(model=model, adapter=adapter, geom=geom, processor=build_processor(request.param),
                        image_id=adapter.image_token_id(model.config, geom))
    f.L = len(adapter.language_model(model).layers)
    f.sample = _sample(f, 0)
    f.other = _sample(f, 1)  # same prompt, another image
    assert torch.equal(f.sample["input_ids"], f.other["input_ids"])
    with torch.no_grad():
        f.full = model(**f.sample, use_cache=False).logits[0, -1]
    return f


def _vtw(f: SimpleNamespace, K: int, sample: dict | None = None):
    return vtw_reference(f.model, f.adapter, f.sample if sample is None else sample,
                         image_token_id=f.image_id, pruning_loc=K)


def test_withdrawal_after_last_layer_is_the_full_forward(fam):
    logits, kept = _vtw(fam, fam.L)
    assert kept.dtype == torch.long and kept.shape == (0,)
    torch.testing.assert_close(logits, fam.full, atol=1e-5, rtol=1e-5)


def test_withdrawal_before_first_layer_is_the_text_only_prompt_with_original_positions(fam):
    """K = 0: HF's own text model on the text tokens' embeddings, HF's original (gapped) position ids."""
    ids = fam.sample["input_ids"][0]
    text = torch.nonzero(ids != fam.image_id).flatten()
    lm = fam.adapter.language_model(fam.model)
    pos = fam.adapter.hf_position_ids(fam.model, fam.sample)[..., text]
    # An explicit causal mask: with gapped 1-D position ids and no 4-D mask, HF's `create_causal_mask`
    # (find_packed_sequence_indices) takes the gap for a packed-sequence boundary and masks across it.
    causal = _additive_causal(len(text), torch.float32)
    with torch.no_grad():
        h = lm(inputs_embeds=lm.embed_tokens(ids[text][None]), position_ids=pos, attention_mask=causal,
               use_cache=False).last_hidden_state
        expect = fam.adapter.lm_head(fam.model)(h)[0, -1]
    logits, kept = _vtw(fam, 0)
    assert kept.shape == (0,)
    torch.testing.assert_close(logits, expect, atol=1e-5, rtol=1e-5)
    # The image cannot matter when it is withdrawn before the LLM.
    torch.testing.assert_close(_vtw(fam, 0, fam.other)[0], logits, atol=1e-6, rtol=0)
    # Renumbering the positions (P2) would change the answer where the image left a gap.
    with torch.no_grad():
        h2 = lm(inputs_embeds=lm.embed_tokens(ids[text][None]), use_cache=False).last_hidden_state
        renumbered = fam.adapter.lm_head(fam.model)(h2)[0, -1]
    assert (renumbered - logits).abs().max() > 1e-4


@pytest.mark.parametrize("K", [1, 2, 3])
def test_withdrawal_equals_masking_image_keys_from_layer_k(fam, K):
    """Deleting the image rows before layer K == keeping them but hiding the image keys from every query in
    layers >= K (the text rows then never see them; image rows see only themselves and the text before)."""
    lm = fam.adapter.language_model(fam.model)
    is_image = fam.sample["input_ids"][0] == fam.image_id
    with torch.no_grad(), _eager(fam.model):
        out = fam.model(**fam.sample, output_hidden_states=True, use_cache=False)
        h = out.hidden_states[K]  # (1, T, D), full length
        pos = fam.adapter.hf_position_ids(fam.model, fam.sample)
        rope = lm.rotary_emb(h, pos)
        T = h.shape[1]
        mask = _additive_causal(T, h.dtype).clone()
        hide = is_image[None, :] & ~torch.eye(T, dtype=torch.bool)  # (T, T): image keys, except own diagonal
        mask[0, 0][hide] = torch.finfo(h.dtype).min
        for layer in lm.layers[K:]:
            o = layer(h, attention_mask=mask, position_embeddings=rope, position_ids=pos)
            h = o[0] if isinstance(o, tuple) else o
        expect = fam.adapter.lm_head(fam.model)(lm.norm(h))[0, -1]
    logits, kept = _vtw(fam, K)
    assert kept.shape == (0,)
    torch.testing.assert_close(logits, expect, atol=1e-5, rtol=1e-5)
    assert (logits - fam.full).abs().max() > 1e-4  # withdrawal changes the answer ...
    assert (_vtw(fam, K, fam.other)[0] - logits).abs().max() > 1e-5  # ... and the image still mattered before K


def test_bad_layer_is_refused(fam):
    with pytest.raises(ValueError, match="outside"):
        _vtw(fam, fam.L + 1)


# --- PACT's equivalent withdrawal layer ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "L,K0,p,K",
    [
        (28, 4, 0.353, 12),  # PACT's LLaVA-OneVision-7B script: 1 - 0.647*24/28 = 0.44543; *28 = 12.47
        (32, 2, 0.5, 17),  # 1 - 0.5*30/32 = 0.53125; *32 = 17 exactly
        (28, 4, 0.5, 16),  # vtw.json's p with K0 = 4: 1 - 0.5*24/28 = 0.571428; *28 = 16.0
        (4, 1, 0.5, 2),  # 1 - 0.5*3/4 = 0.625; *4 = 2.5 -> 2 (Python rounds half to even)
        (4, 3, 0.5, 4),  # 1 - 0.5*1/4 = 0.875; *4 = 3.5 -> 4 = L: nothing withdrawn
        (32, 8, 0.0, 8),  # keep nothing at K0 == withdraw at K0
        (32, 8, 1.0, 32),  # keep everything == never withdraw
        (40, 0, 0.25, 10),  # 1 - 0.75 = 0.25; *40 = 10
    ],
)
def test_equivalent_layer_hand_values(L, K0, p, K):
    assert vtw_equivalent_layer(L, K0, p) == K


def test_equivalent_layer_matches_average_token_count():
    """round(K0 + p(L-K0)): VTW's mean visual tokens per layer N*K/L is within half a layer of the single-layer
    reduction's N*(K0 + p(L-K0))/L."""
    for L in (4, 24, 28, 32, 40):
        for K0 in range(L + 1):
            for p in np.linspace(0, 1, 21):
                K = vtw_equivalent_layer(L, K0, float(p))
                assert 0 <= K <= L
                assert abs(K - (K0 + p * (L - K0))) <= 0.5 + 1e-9


@pytest.mark.parametrize("args", [(0, 0, 0.5), (32, 33, 0.5), (32, -1, 0.5), (32, 4, 1.5)])
def test_equivalent_layer_refuses_bad_values(args):
    with pytest.raises(ValueError):
        vtw_equivalent_layer(*args)
