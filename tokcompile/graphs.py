"""The graphs a compile exports, each with its example inputs and dynamic dimensions.

- vision: `VisionEncoder`: the processor's media inputs -> image embeddings after every vision-side and
  projector-side step, their source indices, and those steps' parity outputs.
- prefill: `Prefill(with_cache=True)`: the prompt's text inputs and the image embeddings -> logits, every
  decoder step's parity output, the KV cache (shaped by the schedule) and one validity mask per cache group.
- decode: `DecodeStep`: one token per sample, its position, the masks and the cache -> logits and the
  updated cache.

Names come from the plan's `GraphLayout`. The prompt length and the cache lengths are dynamic. The batch is
dynamic up to `inputs.batch_size` when that is 2 or more (an example batch of 1 would specialise), else
fixed at 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from tokcompile.devices import module_device, to_device
from tokcompile.layout import DECODE, PREFILL, VISION
from tokcompile.models.reduced import DecodeStep, ReducedVLM
from tokcompile.plan import Plan

__all__ = ["DECODE", "PREFILL", "VISION", "GraphSpec", "build_modules", "decode_feed", "eager_runners", "graph_specs"]


@dataclass
class GraphSpec:
    name: str
    module: nn.Module
    input_names: list[str]
    output_names: list[str]
    example: tuple[Tensor, ...]
    dynamic_shapes: Any
    labels: dict[str, dict[int, str]] = field(default_factory=dict)  # manifest names of dynamic axes

    def example_dict(self) -> dict[str, Tensor]:
        return dict(zip(self.input_names, self.example))


def build_modules(plan: Plan, model: nn.Module) -> tuple[ReducedVLM, DecodeStep]:
    reduced = ReducedVLM(
        model, plan.adapter, plan.geometry, plan.schedule, plan.reducers, plan.image_token_id, with_cache=True
    ).eval().on_model_device()
    return reduced, DecodeStep(model, plan.adapter, plan.geometry, reduced.layout).eval()


def eager_runners(reduced: ReducedVLM, decode: DecodeStep, forced: dict | None = None) -> tuple[Any, Any, Any]:
    """The vision, prefill and decode modules as named-input -> named-output callables (no autograd); `forced`
    (decision scores by `score_j_c` name) replays a graph's scores (`tokcompile.near_ties.compare_or_replay`)."""

    device = module_device(reduced)  # inputs and replayed scores may come from the host or another backend
    on_device = to_device(forced, device)

    def runner(module: Any) -> Any:
        def run(feed: dict[str, Tensor]) -> dict[str, Tensor]:
            with torch.no_grad():
                return module.run(to_device(feed, device), on_device)
        return run

    def run_decode(feed: dict[str, Tensor]) -> dict[str, Tensor]:
        with torch.no_grad():
            return reduced.layout.decode.named(decode(*[to_device(feed[n], device) for n in decode.input_names]))

    return runner(reduced.vision), runner(reduced.prefill), run_decode


def replay_runners(reduced: ReducedVLM, decode: DecodeStep, layout: Any) -> dict[str, Any]:
    """Per graph: `(feed, forced) -> outputs` in the graph's output order, eager ranking on the decision scores in
    `forced` (`tokcompile.near_ties.compare_or_replay`); None for the decode graph, which selects nothing."""

    def replay(graph: str, which: int) -> Any:
        def run(feed: dict[str, Tensor], forced: dict) -> tuple:
            out = eager_runners(reduced, decode, forced)[which](feed)
            return tuple(out[n] for n in layout.graph(graph).outputs)
        return run

    return {VISION: replay(VISION, 0), PREFILL: replay(PREFILL, 1), DECODE: None}


def decode_feed(layout: Any, prefill_out: dict[str, Tensor], token: Tensor, step: int) -> dict[str, Tensor]:
    """Decode inputs for generated token `step` (0-based) from the prefill's outputs: cache masks extended by
    one entry per token so far, the token's position, and (at step 0) the prefill's cache."""
    B = token.shape[0]
    next_position = torch.as_tensor(prefill_out["next_position"])  # on the device the graphs run on
    dev = next_position.device
    ones = torch.ones(B, step + 1, dtype=torch.long, device=dev)
    feed = {"input_ids": token.reshape(B, 1).long().to(dev), "position_ids": next_position.long() + step}
    for g, name in enumerate(layout.decode_masks):
        feed[name] = torch.cat([torch.as_tensor(prefill_out[f"cache_mask_{g}"]).long(), ones], dim=1)
    for g in layout.biased_groups:  # generated tokens are unmerged: size 1, bias 0
        bias = torch.as_tensor(prefill_out[f"cache_bias_{g}"]).float()
        feed[f"attention_bias_{g}"] = torch.cat([bias, torch.zeros(B, step + 1, device=dev)], dim=1)
    return feed


def decode_example(reduced: ReducedVLM, batch: dict[str, Tensor]) -> tuple[Tensor, ...]:
    """Decode inputs for the first generated token after prefilling `batch` (eager)."""
    with torch.no_grad():
        out = reduced.run(batch)
    feed = decode_feed(reduced.layout, out, out["logits"].argmax(-1), 0)
    for i in range(reduced.geometry.n_layers):
        feed[f"past_key_{i}"], feed[f"past_value_{i}"] = out[f"present_key_{i}"], out[f"present_value_{i}"]
    # Contiguous, as every runner feeds them: AOTInductor compiles for the example's strides.
    return tuple(feed[n].contiguous() for n in reduced.layout.decode.inputs)


def graph_specs(plan: Plan, reduced: ReducedVLM, decode: DecodeStep, batch: dict[str, Tensor]) -> list[GraphSpec]:
    B = batch["input_ids"].shape[0]
    dyn_batch = B >= 2
    b_dim = torch.export.Dim("batch", min=1, max=B) if dyn_batch else None
    t_dim = torch.export.Dim("prompt_len", min=plan.text_len_range[0], max=plan.text_len_range[1])
    layout = reduced.layout
    axes_of = plan.adapter.input_axes(plan.geometry)

    def processor_dims(name: str) -> tuple[dict[int, Any], dict[int, str]]:
        dims: dict[int, Any] = {}
        labels: dict[int, str] = {}
        for axis, kind in axes_of.get(name, {}).items():
            if kind == "prompt_len":
                dims[axis], labels[axis] = t_dim, "prompt_len"
            elif kind == "batch" and dyn_batch:
                dims[axis], labels[axis] = b_dim, "batch"
            elif isinstance(kind, tuple) and dyn_batch:  # ("batch", m): images flattened into m rows each
                dims[axis], labels[axis] = kind[1] * b_dim, f"batch * {kind[1]}"
        return dims, labels

    batch_label = {0: "batch"} if dyn_batch else {}
    with torch.no_grad():
        vision_out = reduced.vision.run({n: batch[n] for n in layout.vision.inputs})

    def spec(name: str, module: nn.Module, io: Any, feed: dict[str, Tensor]) -> GraphSpec:
        dyn, labels = {}, {}
        for n in io.inputs:
            if n in axes_of:
                dims, lab = processor_dims(n)
            else:  # image_embeds, image_source: (B, N', ...)
                dims, lab = ({0: b_dim}, dict(batch_label)) if dyn_batch else ({}, {})
            dyn[n], labels[n] = dims or None, lab
        example = tuple(feed[n] for n in io.inputs)
        return GraphSpec(name, module, list(io.inputs), list(io.outputs), example,
                         {"inputs": tuple(dyn[n] for n in io.inputs)}, labels)

    vision = spec(VISION, reduced.vision, layout.vision, batch)
    prefill = spec(PREFILL, reduced.prefill, layout.prefill, {**batch, **vision_out})

    def axes(**named: Any) -> dict[int, Any]:
        d = {0: b_dim} if dyn_batch else {}
        d.update({int(k[1:]): v for k, v in named.items()})
        return d

    n_groups = len(layout.groups) + len(layout.biased_groups)
    rest = [axes(a1=torch.export.Dim.DYNAMIC) for _ in range(n_groups)]
    rest += [axes(a2=torch.export.Dim.DYNAMIC) for _ in range(2 * plan.geometry.n_layers)]
    decode_dyn = {"inputs": (axes(), axes(), *rest)}
    labels: dict[str, dict[int, str]] = {"input_ids": dict(batch_label), "position_ids": dict(batch_label)}
    for g in range(len(layout.groups)):
        labels[f"attention_mask_{g}"] = {**batch_label, 1: f"past_len_{g} + 1"}
    for g in layout.biased_groups:
        labels[f"attention_bias_{g}"] = {**batch_label, 1: f"past_len_{g} + 1"}
    for i in range(plan.geometry.n_layers):
        for kind in ("key", "value"):
            labels[f"past_{kind}_{i}"] = {**batch_label, 2: f"past_len_{layout.group_of(i)}"}
    decode_spec = GraphSpec(DECODE, decode, decode.input_names, decode.output_names,
                            decode_example(reduced, batch), decode_dyn, labels)
    return [vision, prefill, decode_spec]
