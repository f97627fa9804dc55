"""The graphs a compile exports, each with its example inputs and dynamic dimensions.

- prefill: `ReducedVLM(with_cache=True)`: the processor's outputs -> logits, kept indices, the KV cache
  (shaped by the schedule) and one validity mask per cache group.
- decode: `DecodeStep`: one token per sample, its position, the masks and the cache -> logits and the
  updated cache.

The prompt length and the cache lengths are dynamic. The batch is dynamic up to `inputs.batch_size` when
that is 2 or more (an example batch of 1 would specialise), else fixed at 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from tokcompile.models.base import DecodeStep, ReducedVLM
from tokcompile.plan import Plan

PREFILL, DECODE = "prefill", "decode"


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
    ).eval()
    return reduced, DecodeStep(model, plan.adapter, plan.geometry, reduced.groups).eval()


def decode_example(reduced: ReducedVLM, batch: dict[str, Tensor]) -> tuple[Tensor, ...]:
    """Decode inputs for the first generated token after prefilling `batch` (eager)."""
    n_steps, n_groups = len(reduced.schedule), len(reduced.groups)
    with torch.no_grad():
        out = reduced(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    B = out[0].shape[0]
    token = out[0].argmax(-1, keepdim=True)  # (B, 1)
    position = batch["attention_mask"].long().sum(1, keepdim=True)  # (B, 1)
    ones = torch.ones(B, 1, dtype=torch.long)
    masks = [torch.cat([m, ones], 1) for m in out[1 + n_steps : 1 + n_steps + n_groups]]
    # Contiguous, as every runner feeds them: AOTInductor compiles for the example's strides.
    return tuple(t.contiguous() for t in (token, position, *masks, *out[1 + n_steps + n_groups :]))


def graph_specs(plan: Plan, reduced: ReducedVLM, decode: DecodeStep, batch: dict[str, Tensor]) -> list[GraphSpec]:
    B = batch["input_ids"].shape[0]
    dyn_batch = B >= 2
    b_dim = torch.export.Dim("batch", min=1, max=B) if dyn_batch else None
    t_dim = torch.export.Dim("prompt_len", min=plan.text_len_range[0], max=plan.text_len_range[1])

    def axes(**named: Any) -> dict[int, Any]:
        d = {0: b_dim} if dyn_batch else {}
        d.update({int(k[1:]): v for k, v in named.items()})
        return d

    names = list(plan.adapter.input_names)
    prefill_dyn = {"input_ids": axes(a1=t_dim), "attention_mask": axes(a1=t_dim), "pixel_values": axes() or None}
    batch_label = {0: "batch"} if dyn_batch else {}
    prefill = GraphSpec(
        PREFILL, reduced, names, reduced.output_names, tuple(batch[n] for n in names), prefill_dyn,
        labels={"input_ids": {**batch_label, 1: "prompt_len"}, "attention_mask": {**batch_label, 1: "prompt_len"},
                "pixel_values": dict(batch_label)},
    )
    n_groups = len(decode.groups)
    group_of = [g for g, (s, e) in enumerate(decode.groups) for _ in range(s, e)]
    rest = [axes(a1=torch.export.Dim.DYNAMIC) for _ in range(n_groups)]
    rest += [axes(a2=torch.export.Dim.DYNAMIC) for _ in range(2 * plan.geometry.n_layers)]
    decode_dyn = {"input_ids": axes(), "position_ids": axes(), "rest": tuple(rest)}
    labels: dict[str, dict[int, str]] = {"input_ids": dict(batch_label), "position_ids": dict(batch_label)}
    for g in range(n_groups):
        labels[f"attention_mask_{g}"] = {**batch_label, 1: f"past_len_{g} + 1"}
    for i, g in enumerate(group_of):
        for kind in ("key", "value"):
            labels[f"past_{kind}_{i}"] = {**batch_label, 2: f"past_len_{g}"}
    decode_spec = GraphSpec(
        DECODE, decode, decode.input_names, decode.output_names, decode_example(reduced, batch), decode_dyn, labels
    )
    return [prefill, decode_spec]
