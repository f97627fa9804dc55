"""The static reduction schedule: every token count is a Python int fixed before weights load.

Legend used in shape comments across `reduce/` and `models/`:
B batch, T prompt length (text + image tokens), N image tokens entering a step, k image tokens kept,
D hidden size, H query heads, Hkv key/value heads, d head dim, V vocabulary.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Site(str, enum.Enum):
    """Where in the model a reduction step runs."""

    VISION_BLOCK = "vision_block"  # inside the vision tower, before vision block `layer`
    PROJECTOR_OUT = "projector_out"  # on the projected image features, before the decoder
    DECODER_LAYER = "decoder_layer"  # before decoder layer `layer` (layers < layer see every token)


@dataclass(frozen=True)
class Step:
    """One reduction step: `n_in` image tokens enter at (`site`, `layer`), `n_out` leave."""

    method: str
    site: Site
    layer: int
    n_in: int
    n_out: int

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "site": self.site.value,
            "layer": self.layer,
            "n_in": self.n_in,
            "n_out": self.n_out,
        }


Schedule = tuple[Step, ...]


def image_tokens_per_decoder_layer(n_image_tokens: int, n_layers: int, schedule: Schedule) -> list[int]:
    """Image tokens entering each decoder layer, after every step that runs before it."""
    n = n_image_tokens
    for step in schedule:
        if step.site is not Site.DECODER_LAYER:
            n = step.n_out  # pre-decoder steps shrink what the decoder sees from layer 0
    counts = []
    by_layer = {s.layer: s for s in schedule if s.site is Site.DECODER_LAYER}
    for layer in range(n_layers):
        if layer in by_layer:
            n = by_layer[layer].n_out
        counts.append(n)
    return counts


def decoder_image_tokens_in(n_image_tokens: int, schedule: Schedule) -> int:
    """Image tokens that reach decoder layer 0 (after vision-side and projector steps)."""
    n = n_image_tokens
    for step in schedule:
        if step.site is not Site.DECODER_LAYER:
            n = step.n_out
    return n
