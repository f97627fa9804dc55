"""SparseVLM's scores (`sparsevlm.py`): the text raters, chosen from the input embeddings, and the attention the
image tokens receive from them in a decoder layer. Both are fp32 and keep padding out of every softmax."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tokcompile.reduce.ops import gather_tokens

if TYPE_CHECKING:
    from torch import Tensor

    from tokcompile.reduce.context import DecoderContext
    from tokcompile.reduce.state import TokenState


def text_after_image(state: TokenState) -> Tensor:
    """(B, T) bool: the real tokens after each sample's image span."""
    T = state.hidden.shape[1]
    pos = torch.arange(T, device=state.hidden.device)[None]  # (1, T)
    return (pos >= (state.image_start + state.n_image)[:, None]) & state.valid


def rater_mask(embedded: TokenState) -> Tensor:
    """(B, T0) bool over the sequence entering decoder layer 0: the text raters.

    m = the mean over the image rows of softmax over the text after the image of (image · textᵀ), on the input
    embeddings; a text token rates when its m is above the mean of m over the sample's text (LightCompress:
    `torch.where(m_v_t > m_v_t.mean())`)."""
    st = embedded
    h = st.hidden.float()  # (B, T0, D)
    span = st.image_start[:, None] + torch.arange(st.n_image, device=h.device)[None]  # (B, N0)
    text = text_after_image(st)  # (B, T0)
    logits = gather_tokens(h, span) @ h.transpose(1, 2)  # (B, N0, T0)
    m = logits.masked_fill(~text[:, None, :], float("-inf")).softmax(-1).mean(1)  # (B, T0): 0 off the text
    mean = m.sum(-1, keepdim=True) / text.sum(-1, keepdim=True).clamp(min=1)  # (B, 1)
    return text & (m > mean)


def image_scores(ctx: DecoderContext, raters: Tensor, n: int) -> Tensor:
    """(B, n) the head-mean attention probabilities of the previous layer (as it ran: causal, padding masked),
    rows = the raters, averaged over them, at the n current image tokens.

    raters: (B, T0) `rater_mask` over the sequence entering layer 0; text tokens are never reduced, so text
    token j after the image there is text token j after the image now."""
    st, prev = ctx.state, ctx.prev_state
    if prev is None or prev.hidden.shape[1] != st.hidden.shape[1]:  # Python ints
        raise ValueError("SparseVLM scores the tokens entering a layer with the previous layer's attention over them")
    logits = ctx.attention_logits("previous")  # (B, H, T, T) fp32, unmasked
    T = logits.shape[-1]
    pos = torch.arange(T, device=logits.device)
    allowed = (pos[:, None] >= pos[None, :])[None] & prev.valid[:, None, :]  # (B, T, T): causal, real keys
    probs = logits.masked_fill(~allowed[:, None], float("-inf")).softmax(-1).mean(1)  # (B, T, T); NaN pad rows
    shift = raters.shape[1] - T  # the image tokens reduced since layer 0
    rater_now = gather_tokens(raters, (pos[None] + shift).clamp(0, raters.shape[1] - 1).expand(st.hidden.shape[0], T))
    rater_now = rater_now & text_after_image(st)  # (B, T)
    rows = torch.where(rater_now[..., None], probs, 0.0).sum(1)  # (B, T): padded rows never selected
    mean = rows / rater_now.sum(-1, keepdim=True).clamp(min=1)  # (B, T)
    span = st.image_start[:, None] + torch.arange(n, device=logits.device)[None]  # (B, n)
    return gather_tokens(mean, span)  # (B, n)
