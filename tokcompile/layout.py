"""The named inputs and outputs of the vision, prefill and decode graphs, derived from the plan alone.

Graph builders, the generation loop, the runtime, parity and the manifest all read one `GraphLayout`; nobody
slices outputs by position. Modules return tuples in the layout's order (what exporters need) and runners
turn them into dicts with `named()`.

- vision:  the processor's media inputs (and `question_ids`, `question_mask` (B, S, L) where a step reads
           the question) -> image_embeds (B, N', D), image_source (B, N'; -1 marks an unused slot, which the
           decoder never attends), image_side_k (B, N', D) per side stream (Qwen3-VL's DeepStack features) and
           the parity output of every vision-graph step (`kept_j` (B, k),
           `assign_j` or `cluster_j` (B, n_in): see `reduce.schedule.Output`; j is its schedule index).
- prefill: the processor's text inputs, image_embeds, image_source -> logits (B, V), the parity output of
           every decoder step, cache_mask_g (B, T_g) per cache group g, cache_bias_g (B, T_g) float for groups
           whose tokens carry sizes (log size, proportional attention), next_position (B, 1), and
           present_key_l / present_value_l (B, Hkv, T_l, d) per decoder layer l.
- decode:  input_ids (B, 1), position_ids (B, 1), attention_mask_g (B, P_g + 1), attention_bias_g
           (B, P_g + 1) for the biased groups (new tokens 0), past_key_l / past_value_l
           -> logits, present_key_l / present_value_l.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tokcompile.question import QUESTION_INPUTS
from tokcompile.reduce.schedule import Output, Schedule, Site

VISION, PREFILL, DECODE = "vision", "prefill", "decode"
IMAGE_OUTPUTS = ("image_embeds", "image_source")
SCORE_PREFIX = "score_"  # a scored step's decision scores (B, n) fp32, compared within the near-tie margin
STEP_PREFIXES = tuple(f"{o.value}_" for o in Output)  # the steps' selections (kept_j, assign_j, ...)
# Outputs compared exactly (indices and masks), not within a tolerance.
EXACT_PREFIXES = (*STEP_PREFIXES, "cache_mask_", "image_source")


def _cut(step: Any) -> int:
    """The first decoder layer whose cache holds a step's output."""
    return step.layer + 1 if step.site is Site.DECODER_MID else step.layer


def cache_groups(n_layers: int, schedule: Schedule) -> list[tuple[int, int]]:
    """Decoder layers that share one KV-cache length: [start, end) per group, split at every decoder step.

    FastV at K gives two groups (pattern C1): layers [0, K) cache T entries, layers [K, L) cache T'. A step in
    the middle of layer K (between attention and MLP) changes what layer K+1 caches.
    """
    cuts = {s.layer for s in schedule if s.site is Site.DECODER_LAYER}
    cuts |= {s.layer + 1 for s in schedule if s.site is Site.DECODER_MID}
    bounds = [0, *sorted(cuts - {0, n_layers}), n_layers]
    return [(a, b) for a, b in zip(bounds, bounds[1:])]


class NamedOutputs(tuple):
    """Outputs in a fixed order that can also be read by name: `out[0]`, `out["logits"]`."""

    names: tuple[str, ...]

    def __new__(cls, named: dict[str, Any], order: Sequence[str]) -> NamedOutputs:
        obj = super().__new__(cls, tuple(named[n] for n in order))
        obj.names = tuple(order)
        return obj

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return tuple.__getitem__(self, self.names.index(key))
        return tuple.__getitem__(self, key)



@dataclass(frozen=True)
class GraphIO:
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    def named(self, outputs: Sequence[Any]) -> dict[str, Any]:
        """A module's or backend's outputs, in this graph's order, by name."""
        if len(outputs) != len(self.outputs):
            raise ValueError(f"expected {len(self.outputs)} outputs ({', '.join(self.outputs)}), got {len(outputs)}")
        return dict(zip(self.outputs, outputs))

    def wrap(self, runner: Callable[[dict[str, Any]], Sequence[Any]]) -> Callable[[dict[str, Any]], dict[str, Any]]:
        """A backend runner (named inputs -> outputs in graph order) as one that returns outputs by name."""
        return lambda feed: self.named(runner(feed))


@dataclass(frozen=True)
class GraphLayout:
    """Every graph's input and output names, the cache groups, and which step reports under which name."""

    vision: GraphIO
    prefill: GraphIO
    decode: GraphIO
    groups: tuple[tuple[int, int], ...]
    step_outputs: tuple[str, ...]  # per schedule step, in order: "<output kind>_j" (kept_j, assign_j, ...)
    n_layers: int
    biased_groups: tuple[int, ...] = ()  # cache groups whose keys carry a size bias (proportional attention)

    @property
    def image_outputs(self) -> tuple[str, ...]:
        """What the vision graph hands the prefill graph: image_embeds, image_source and any side streams."""
        return IMAGE_OUTPUTS + tuple(n for n in self.vision.outputs if n.startswith("image_side_"))

    @property
    def score_outputs(self) -> tuple[str, ...]:
        """Every scored step's decision scores (`score_j_c`), in schedule order, whichever graph reports them."""
        return tuple(n for n in (*self.vision.outputs, *self.prefill.outputs) if n.startswith(SCORE_PREFIX))

    def graph(self, name: str) -> GraphIO:
        return {VISION: self.vision, PREFILL: self.prefill, DECODE: self.decode}[name]

    @property
    def graphs(self) -> tuple[str, ...]:
        return (VISION, PREFILL, DECODE)

    def group_of(self, layer: int) -> int:
        return next(g for g, (s, e) in enumerate(self.groups) if s <= layer < e)

    @property
    def present(self) -> list[str]:
        return [f"present_{kind}_{i}" for i in range(self.n_layers) for kind in ("key", "value")]



    @property
    def decode_masks(self) -> list[str]:
        return [f"attention_mask_{g}" for g in range(len(self.groups))]


    def to_dict(self) -> dict:
        return {
            **{g: {"inputs": list(self.graph(g).inputs), "outputs": list(self.graph(g).outputs)} for g in self.graphs},
            "cache_groups": [list(g) for g in self.groups],
            "step_outputs": list(self.step_outputs),
            "biased_groups": list(self.biased_groups),
        }


def text_inputs(input_axes: dict[str, dict[int, Any]], names: Sequence[str]) -> tuple[str, ...]:
    """The processor outputs that carry the prompt (they have a prompt-length axis); the rest are media."""
    return tuple(n for n in names if "prompt_len" in input_axes.get(n, {}).values())


def score_names(step_output: str, count: int) -> tuple[str, ...]:
    """The graph outputs holding a scored step's `count` decision vectors (`Step.scored`): `kept_3` -> `score_3_0`,
    `score_3_1`, ..."""
    j = step_output.rsplit("_", 1)[1]
    return tuple(f"{SCORE_PREFIX}{j}_{c}" for c in range(count))


def side_names(n: int) -> tuple[str, ...]:
    """The names of `n` image-aligned side streams (`Geometry.side_streams`) between the vision and prefill graphs."""
    return tuple(f"image_side_{k}" for k in range(n))


def build_layout(adapter: Any, geometry: Any, schedule: Schedule) -> GraphLayout:
    names = tuple(adapter.input_names_for(geometry))
    axes = adapter.input_axes(geometry)
    text = text_inputs(axes, names)
    media = tuple(n for n in names if n not in text)
    if any(s.question for s in schedule):
        media += QUESTION_INPUTS
    step_outputs = tuple(f"{s.output_name}_{j}" for j, s in enumerate(schedule))
    reported = [(o, *score_names(o, s.scored or 0)) for o, s in zip(step_outputs, schedule)]
    vision_steps = tuple(n for r, s in zip(reported, schedule) if s.site.in_vision_graph for n in r)
    decoder_steps = tuple(n for r, s in zip(reported, schedule) if not s.site.in_vision_graph for n in r)
    groups = tuple(cache_groups(geometry.n_layers, schedule))
    sized = [_cut(s) for s in schedule if s.sizes and not s.site.in_vision_graph]
    biased = tuple(g for g, (start, _) in enumerate(groups) if sized and start >= min(sized))
    n = geometry.n_layers
    present = tuple(f"present_{kind}_{i}" for i in range(n) for kind in ("key", "value"))
    image = IMAGE_OUTPUTS + side_names(getattr(geometry, "side_streams", 0))
    vision = GraphIO(media, image + vision_steps)
    prefill = GraphIO(
        text + image,
        ("logits", *decoder_steps, *(f"cache_mask_{g}" for g in range(len(groups))),
         *(f"cache_bias_{g}" for g in biased), "next_position", *present),
    )
    decode = GraphIO(
        ("input_ids", "position_ids", *(f"attention_mask_{g}" for g in range(len(groups))),
         *(f"attention_bias_{g}" for g in biased),
         *(f"past_{kind}_{i}" for i in range(n) for kind in ("key", "value"))),
        ("logits", *present),
    )
    return GraphLayout(vision, prefill, decode, groups, step_outputs, n, biased)
