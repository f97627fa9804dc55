"""The static reduction schedule: every token count is a Python int fixed before weights load.

Legend used in shape comments across `reduce/` and `models/`:
B batch, T prompt length (text + image tokens), N image tokens entering a step, k image tokens kept,
t tokens inside the vision tower (patches plus CLS), D hidden size, Dv vision hidden size, H query heads,
Hkv key/value heads, d head dim, V vocabulary.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Site(str, enum.Enum):
    """Where in the model a reduction step runs, in data order.

    The first three run in the vision graph (pixels -> image embeddings), the last two in the prefill graph.
    """

    VISION_BLOCK = "vision_block"  # inside vision block `layer`, between the attention residual and the MLP
    VISION_OUT = "vision_out"  # on the selected vision layer's output, before the projector
    PROJECTOR_OUT = "projector_out"  # on the projected image features (the decoder's image span)
    DECODER_LAYER = "decoder_layer"  # before decoder layer `layer` (layers < layer see every token)
    DECODER_MID = "decoder_mid"  # inside decoder layer `layer`, between its attention and its MLP

    @property
    def rank(self) -> int:
        return list(Site).index(self)

    @property
    def in_vision_graph(self) -> bool:
        return self in (Site.VISION_BLOCK, Site.VISION_OUT, Site.PROJECTOR_OUT)

    @property
    def in_vision_tower(self) -> bool:
        """Counts of steps at this site are vision-tower tokens (CLS included), not image tokens."""
        return self in (Site.VISION_BLOCK, Site.VISION_OUT)


class Output(str, enum.Enum):
    """What a step reports for parity, besides its new tokens."""

    KEPT = "kept"  # (B, n_out) indices of the surviving tokens among the n_in entering, ascending
    ASSIGN = "assign"  # (B, n_in) slot of the output sequence that every entering token went to (merges)
    # (B, n_in) for clusterings whose cluster count depends on the data: the entering index of the token whose
    # slot holds each entering token's cluster (its centre; a centre gives its own index), -1 when dropped
    CLUSTER = "cluster"


class Positions(str, enum.Enum):
    """RoPE position policy of a decoder-side step (ALGORITHMS.md §0.3). Steps before the decoder always
    give the decoder P0: contiguous 1-D positions, or the kept tokens' original ids for multi-row RoPE."""

    KEEP = "keep"  # P1: survivors keep their original position ids
    RENUMBER = "renumber"  # P2: survivors are renumbered contiguously from this step on (1-D RoPE only)


@dataclass(frozen=True)
class Step:
    """One reduction step: `n_in` tokens enter at (`site`, `layer`), `n_out` leave.

    Counts are image tokens, except at vision-tower sites, where they count the tower's tokens (CLS included).
    """

    method: str
    site: Site
    layer: int
    n_in: int
    n_out: int
    output: Output = Output.KEPT
    positions: Positions = Positions.KEEP
    sizes: bool = False  # decoder steps: the new tokens carry sizes that bias attention (log size per key)
    # Further static counts the method's own `apply` needs (SparseVLM: kept, recycled and cluster counts); the
    # graphs, layout and FLOPs never read them
    detail: tuple[int, ...] = ()
    # Vision-graph steps: the step reads the question (`ctx.question`); the vision graph then takes
    # `question_ids` and `question_mask` (tokcompile.question), which the reducer's `question(key)` describes
    question: bool = False
    # How many score vectors or matrices the reducer decides on, each handed to `ctx.decision` (B, ...) in a
    # fixed order; the graph running the step reports them (`score_j_c`, fp32, flattened to (B, n)) beside its
    # output, so that parity can tell a decision that differs at a near-tie from an error. 0: the step decides
    # nothing from the data (a constant selection); None: it decides on the data without reporting its scores,
    # so its result must equal eager's
    scored: int | None = None

    @property
    def output_name(self) -> str:
        """Prefix of the graph output that reports this step (`kept` or `assign`)."""
        return self.output.value

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "site": self.site.value,
            "layer": self.layer,
            "n_in": self.n_in,
            "n_out": self.n_out,
            "output": self.output.value,
            "positions": self.positions.value,
            "sizes": self.sizes,
            **({"detail": list(self.detail)} if self.detail else {}),
            **({"question": True} if self.question else {}),
            **({"scored": self.scored} if self.scored is not None else {}),
        }


Schedule = tuple[Step, ...]


def image_tokens_after_vision(n_image_tokens: int, vision_tokens: int, schedule: Schedule) -> int:
    """Image tokens that reach decoder layer 0, after every vision-graph step.

    A vision-tower step's output count maps to image tokens by removing what the feature selection drops
    (`vision_tokens - n_image_tokens`: LLaVA's CLS under the "default" strategy).
    """
    n = n_image_tokens
    for step in schedule:
        if step.site.in_vision_tower:
            n = step.n_out - (vision_tokens - n_image_tokens)
        elif step.site is Site.PROJECTOR_OUT:
            n = step.n_out
    return n


def image_tokens_per_decoder_layer(n_image_tokens: int, n_layers: int, schedule: Schedule,
                                   vision_tokens: int | None = None) -> list[int]:
    """Image tokens entering each decoder layer (its attention), after every step that runs before it."""
    n = image_tokens_after_vision(n_image_tokens, vision_tokens or n_image_tokens, schedule)
    before = {s.layer: s for s in schedule if s.site is Site.DECODER_LAYER}
    mid = {s.layer: s for s in schedule if s.site is Site.DECODER_MID}
    counts = []
    for layer in range(n_layers):
        if layer in before:
            n = before[layer].n_out
        counts.append(n)
        if layer in mid:
            n = mid[layer].n_out
    return counts


def decoder_image_tokens_in(n_image_tokens: int, schedule: Schedule, vision_tokens: int | None = None) -> int:
    """Image tokens that reach decoder layer 0 (after vision-side and projector steps)."""
    return image_tokens_after_vision(n_image_tokens, vision_tokens or n_image_tokens, schedule)


def vision_tokens_per_block(vision_tokens: int, vision_layers: int, schedule: Schedule) -> list[tuple[int, int]]:
    """(tokens in the attention, tokens in the MLP) of each vision block that runs."""
    n = vision_tokens
    merges = {s.layer: s for s in schedule if s.site is Site.VISION_BLOCK}
    out = []
    for layer in range(vision_layers):
        attn = n
        if layer in merges:
            n = merges[layer].n_out
        out.append((attn, n))
    return out
