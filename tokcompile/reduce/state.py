"""The tokens between two reduction steps, as frozen values. Reducers return new ones; nothing mutates.

`ImageTokens` flows through the vision graph (inside the vision tower, and over the projected image
features); `TokenState` is the decoder's whole prompt between layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor


@dataclass(frozen=True)
class ImageTokens:
    """Image-side tokens of every sample.

    Args:
        hidden: (B, t, Dv) inside the vision tower, (B, N, D) after the projector.
        source: (B, t) index of the original token each one stands for (a merged token: its destination's), or
            -1 for an unused slot (a step whose kept count depends on the data pads to a static count): the
            decoder never attends it, and the tokens after it take contiguous positions as if it were absent.
            Inside the tower it counts the tower's tokens (CLS 0); after the projector, the image span.
        sizes: (B, t) float, how many original tokens each one holds, or None when nothing has merged.
        n_protected: leading tokens no step may drop or merge (the CLS token inside a CLIP tower).
        tower: after the projector of a family with `tower_at_projector`, (the tower's last block as a
            `VisionContext`, (S,) the image token each tower token became), for the first projector step's
            `ImageContext`; None otherwise.
        features: after the projector of a family with `features_at_projector`, (B, N, Dv) the features the
            projector received, token for token, for the first projector step's `ImageContext`; None otherwise.
        side: after the projector, the family's image-aligned side streams ((B, N, D) each, `Geometry.side_streams`:
            Qwen3-VL's DeepStack features), token for token with `hidden`; a step that keeps tokens keeps them.
    """

    hidden: Tensor
    source: Tensor
    sizes: Tensor | None = None
    n_protected: int = 0
    tower: tuple[Any, Tensor] | None = None
    features: Tensor | None = None
    side: tuple[Tensor, ...] = ()

    @property
    def n(self) -> int:
        return self.hidden.shape[1]


@dataclass(frozen=True)
class TokenState:
    """The decoder's token sequence between layers.

    Args:
        hidden: (B, T, D) residual stream.
        positions: (B, T) RoPE position ids, or (B, T, R) for R-row RoPE such as M-RoPE (R=3). Reducers gather
            along the token axis only, so every row follows its token.
        valid: (B, T) bool, False for padding; padded keys are never attended.
        image_start: (B,) index of the first image token in the current sequence.
        n_image: image tokens in the current sequence (a Python int: static).
        last: (B,) index of each sample's last real token (the token FastV-style methods score from).
        sizes: (B, T) float, how many original tokens each one holds (merges), or None. When set, every layer
            from then on adds log(size) to each query's logit for that key (proportional attention), in prefill
            and, through the cache's key bias, in decode.
        n_appended: trailing tokens that are not part of the prompt but generated tokens re-run without a cache
            (the no-cache reference of generation; 0 in every exported graph). Renumbering (P2) leaves them at
            their original positions, as cached decode places generated token t at T + t.
        side: the family's side streams while decoder layers still add them (`Geometry.side_streams`: Qwen3-VL's
            DeepStack), (B, T, D) each, zero outside the image span; the output of decoder layer j gets stream j
            added. Steps that keep tokens gather them (`prune.keep_image_tokens`); the plan refuses merges
            before the last such layer. Empty once the last stream is added.
    """

    hidden: Tensor
    positions: Tensor
    valid: Tensor
    image_start: Tensor
    n_image: int
    last: Tensor
    sizes: Tensor | None = None
    n_appended: int = 0
    side: tuple[Tensor, ...] = ()
