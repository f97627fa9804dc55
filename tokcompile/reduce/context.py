"""What a reducer may read at its site. Contexts give, reducers ask.

A context offers the tensors a method may score with (keys, queries, attention rows computed on demand from
them), so the main attention keeps its fused kernel and no layer runs twice. Model-side computations go
through `LayerOps`, which the family adapter implements: reducers never see the model class.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from tokcompile.question import QuestionTokens
from tokcompile.reduce.ops import attention_row, gather_tokens
from tokcompile.reduce.state import TokenState


class LayerOps(Protocol):
    """Projections of one decoder layer, exactly as its attention computes them."""

    def query(self, layer: int, hidden: Tensor, positions: Tensor, rope: bool = True) -> Tensor:
        """hidden (B, T, D) entering `layer` -> queries (B, H, T, d) after the input norm, q projection (and q
        norm) and RoPE (`rope=False`: before RoPE, as methods that score unrotated vectors need)."""
        ...

    def keys(self, layer: int, hidden: Tensor, positions: Tensor, rope: bool = True) -> Tensor:
        """hidden (B, T, D) entering `layer` -> keys (B, Hkv, T, d) after the input norm, k projection (and k
        norm) and RoPE (`rope=False`: before RoPE)."""
        ...

    def final_norm(self, hidden: Tensor) -> Tensor:
        """hidden (B, T, D) -> the decoder's final norm of it (B, T, D), as it runs before `lm_head`."""
        ...


# What a helper that decides on scores takes: (B, ...) scores -> the scores to decide on (`Decides.decision`)
Decide = Callable[[Tensor], Tensor]


class Decides:
    """What every context offers a scored step (`Step.scored`): `decision(scores)` hands the driver one score
    vector or matrix the step decides on, which the graph reports (`score_j_c`, in call order, flattened to
    (B, n)), and returns the scores to decide on. Graphs decide on their own; an eager replay of a graph's result
    hands back the graph's, so that a graph that differs from eager's only where scores nearly tie is checked
    downstream instead of refused."""

    decide: Callable[[Tensor], Tensor] | None

    def decision(self, scores: Tensor) -> Tensor:
        """(B, ...) scores the step decides on -> the scores to decide on, fp32, the same shape (the same values,
        outside replays)."""
        scores = scores.float()
        if self.decide is None:
            return scores
        return self.decide(scores.reshape(scores.shape[0], -1)).reshape(scores.shape)  # reported as (B, n)


@dataclass(frozen=True)
class VisionContext(Decides):
    """A vision block's attention, recorded as it ran (VISION_BLOCK: this block; VISION_OUT: the selected
    layer's block).

    Args:
        layer: the vision block.
        queries: (B, Hv, t, dv) the block's queries.
        keys: (B, Hv, t, dv) the block's keys.
        key_bias: (B, t) additive logit bias per key the block used (proportional attention), or None.
        patch_grid: (rows, cols) of the tower's original patch grid, for methods that work in image space: a
            token whose source is s (>= the state's `n_protected`) came from patch s - n_protected, at row
            (s - n_protected) // cols. None where the family does not give it.
        key_mask: (t, t) bool, True where the block let a query attend a key (Qwen2.5-VL's window blocks), or
            None: every key.
        question: the question's tokens (`tokcompile.question`), for a step whose `Step.question` is set; else None.
        module: the weights the step's reducer owns (`Reducer.load_module`), e.g. CLIP's text tower; else None.
        decide: set by the driver for a scored step (see `Decides`); reducers call `decision`, never this.
    """

    layer: int
    queries: Tensor
    keys: Tensor
    key_bias: Tensor | None = None
    patch_grid: tuple[int, int] | None = None
    key_mask: Tensor | None = None
    question: QuestionTokens | None = None
    module: nn.Module | None = None
    decide: Callable[[Tensor], Tensor] | None = None

    def mean_keys(self) -> Tensor:
        """Keys averaged over heads: (B, t, dv)."""
        return self.keys.float().mean(1)  # fp32 before the mean: half-precision keys rank in fp32

    def attention(self, rows: Tensor | None = None) -> Tensor:
        """Softmax attention probabilities in fp32 of the query rows `rows` ((r,) token indices; None: every
        row) against every key: (B, Hv, r, t), as the block's attention computed them."""
        q = self.queries.float() if rows is None else self.queries.float()[:, :, rows]
        logits = q @ self.keys.float().transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, Hv, r, t)
        if self.key_bias is not None:
            logits = logits + self.key_bias.float()[:, None, None, :]
        if self.key_mask is not None:
            allowed = self.key_mask if rows is None else self.key_mask[rows]  # (r, t)
            logits = logits.masked_fill(~allowed, float("-inf"))
        return logits.softmax(-1)


@dataclass(frozen=True)
class ImageContext(Decides):
    """Projector-output site: the projected features are the state itself.

    Args:
        layer: always 0.
        frames: (frames, trailing tokens) where the span is video frames laid one after another, each frame's
            tokens together and the same count per frame, then `trailing` tokens (LLaVA-OneVision's newline);
            None for images. Methods that work within a frame split the span with it.
        tower: at the first step of the vision graph, for families whose projector merges groups of tower
            tokens (`VLMAdapter.tower_at_projector`: Qwen), the tower's last block as it ran (queries and keys
            (B, Hv, S, dv) over its S tokens in the tower's own order, its mask); None otherwise.
        tower_groups: (S,) int64 with `tower`: the image token (index in the span) each tower token became.
        features: at the first projector-output step, (B, N, Dv) the features the projector received, token for
            token with the state (LLaVA-1.5: the selected vision layer's patches, CLS dropped), on families whose
            adapter gives them (`VLMAdapter.features_at_projector`); None otherwise.
        question, module, decide: as in `VisionContext`.
    """

    layer: int = 0
    frames: tuple[int, int] | None = None
    tower: VisionContext | None = None
    tower_groups: Tensor | None = None
    features: Tensor | None = None
    question: QuestionTokens | None = None
    module: nn.Module | None = None
    decide: Callable[[Tensor], Tensor] | None = None

    def _per_image_token(self, n: int) -> tuple[Tensor, Tensor]:
        """(S, N) one-hot of every tower token's image token and (N,) how many tower tokens each one has."""
        onehot = (self.tower_groups[:, None] == torch.arange(n, device=self.tower_groups.device)).float()
        return onehot, onehot.sum(0)

    def received_attention(self, n: int) -> Tensor:
        """(B, N) the attention each of the N image tokens receives in the tower's last block: probabilities
        averaged over heads, summed over the queries, averaged over the image token's tower tokens (fp32)."""
        onehot, per = self._per_image_token(n)
        return self.tower.attention().mean(1).sum(1) @ onehot / per  # (B, S) @ (S, N)

    def grouped_keys(self, n: int) -> Tensor:
        """(B, N, dv) the tower's last-block keys averaged over heads and over each image token's tower tokens."""
        onehot, per = self._per_image_token(n)
        return (onehot.t() @ self.tower.mean_keys()) / per[:, None]  # (N, S) @ (B, S, dv)


@dataclass(frozen=True)
class DecoderContext(Decides):
    """Before decoder layer `layer` runs (DECODER_LAYER), or between its attention and MLP (DECODER_MID).

    Args:
        layer: the decoder layer.
        ops: the layer projections (the adapter).
        state: the tokens entering this layer (DECODER_LAYER) or its MLP (DECODER_MID).
        prev_state: the tokens that entered the previous layer's attention (None at layer 0).
        prev_keys: (B, Hkv, T_prev, d) the keys the previous layer's attention used, after RoPE (None at 0).
        keys_here: (B, Hkv, T, d) this layer's own keys, at DECODER_MID only (as its attention used them).
        state_in: the tokens that entered this layer's attention, at DECODER_MID only (the same tokens as
            `state`, before the attention residual), for methods that score with the layer's queries.
        embedded: the sequence entering decoder layer 0 (the input embeddings, after any reduction before the
            decoder), for methods that choose text tokens from them (SparseVLM's raters). Text tokens are never
            reduced, so text token j after the image is text token j after the image in every later state.
        decide: as in `VisionContext`.
    """

    layer: int
    ops: LayerOps
    state: TokenState
    prev_state: TokenState | None
    prev_keys: Tensor | None
    keys_here: Tensor | None = None
    state_in: TokenState | None = None
    embedded: TokenState | None = None
    decide: Callable[[Tensor], Tensor] | None = None

    def _last_row(self, layer: int, st: TokenState, keys: Tensor) -> Tensor:
        h_last = gather_tokens(st.hidden, st.last[:, None])  # (B, 1, D)
        pos_last = gather_tokens(st.positions, st.last[:, None])  # (B, 1) or (B, 1, R)
        q = self.ops.query(layer, h_last, pos_last)  # (B, H, 1, d)
        return attention_row(q, keys, st.valid)  # (B, H, T)

    def last_token_attention(self, which: str = "previous") -> Tensor:
        """Head-mean attention probabilities (fp32) of each sample's last real token over every key: (B, T).

        which="previous": layer `layer`-1 as it ran (its input, its query, the keys its attention used), over
        the tokens that entered it (FastV). which="current": this layer's own input norm, q/k projections and
        RoPE over the tokens entering it now (PyramidDrop); at DECODER_MID, over the keys its attention used.
        """
        return self.last_token_attention_heads(which).mean(1)

    def last_token_attention_heads(self, which: str = "previous") -> Tensor:
        """As `last_token_attention`, per head: (B, H, T)."""
        if which == "previous":
            if self.prev_state is None or self.prev_keys is None:
                raise ValueError("a step at decoder layer 0 has no previous layer to score with")
            return self._last_row(self.layer - 1, self.prev_state, self.prev_keys)
        if which == "current":
            st = self.state
            return self._last_row(self.layer, st, self.current_keys())
        raise ValueError(f"which must be 'previous' or 'current', not {which!r}")

    def current_keys(self) -> Tensor:
        """This layer's keys over the tokens entering it: (B, Hkv, T, d) after RoPE."""
        if self.keys_here is not None:
            return self.keys_here
        return self.ops.keys(self.layer, self.state.hidden, self.state.positions)

    def current_queries(self) -> Tensor:
        """This layer's queries over the tokens entering its attention: (B, H, T, d) after the input norm, q
        projection and RoPE (at DECODER_MID: as its attention computed them, from `state_in`)."""
        st = self.state_in if self.state_in is not None else self.state
        return self.ops.query(self.layer, st.hidden, st.positions)

    def attention_logits(self, which: str = "current") -> Tensor:
        """Raw attention logits q·kᵀ/√d per head, every query row against every key, no mask applied (causal or
        padding): (B, H, T, T) fp32. which="current": this layer (at DECODER_MID, as its attention ran);
        "previous": layer `layer`-1 as it ran, over the tokens that entered it. GQA query head h reads KV head
        h // (H / Hkv), as the attention does."""
        if which == "current":
            q, k = self.current_queries(), self.current_keys()  # (B, H, T, d), (B, Hkv, T, d)
        elif which == "previous":
            if self.prev_state is None or self.prev_keys is None:
                raise ValueError("a step at decoder layer 0 has no previous layer to score with")
            st = self.prev_state
            q, k = self.ops.query(self.layer - 1, st.hidden, st.positions), self.prev_keys
        else:
            raise ValueError(f"which must be 'previous' or 'current', not {which!r}")
        q, k = q.float(), k.float()
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (B, H, T, d)
        return q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, T, T)

    def head_mean_logits(self) -> Tensor:
        """This layer's raw attention logits averaged over heads, unmasked: (B, T, T) fp32."""
        return self.attention_logits("current").mean(1)

    def image_span(self, n: int) -> Tensor:
        """(B, n) indices of the current image tokens in the sequence."""
        st = self.state
        return st.image_start[:, None] + torch.arange(n, device=st.hidden.device)[None, :]
