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
        out = reduced(*[batch[n] for n in reduced.input_names])
    B = out[0].shape[0]
    token = out[0].argmax(-1, keepdim=True)  # (B, 1)
    first = 1 + n_steps + n_groups
    position = out[first]  # (B, 1) next_position
    ones = torch.ones(B, 1, dtype=torch.long)
    masks = [torch.cat([m, ones], 1) for m in out[1 + n_steps : first]]
    # Contiguous, as every runner feeds them: AOTInductor compiles for the example's strides.
    return tuple(t.contiguous() for t in (token, position, *masks, *out[first + 1 :]))


def graph_specs(plan: Plan, reduced: ReducedVLM, decode: DecodeStep, batch: dict[str, Tensor]) -> list[GraphSpec]:
    B = batch["input_ids"].shape[0]
    dyn_batch = B >= 2
    b_dim = torch.export.Dim("batch", min=1, max=B) if dyn_batch else None
    t_dim = torch.export.Dim("prompt_len", min=plan.text_len_range[0], max=plan.text_len_range[1])

    def axes(**named: Any) -> dict[int, Any]:
        d = {0: b_dim} if dyn_batch else {}
        d.update({int(k[1:]): v for k, v in named.items()})
        return d

    names = list(reduced.input_names)
    prefill_dyn: dict[str, Any] = {}
    prefill_labels: dict[str, dict[int, str]] = {}
    for name in names:
        dims: dict[int, Any] = {}
        labels_n: dict[int, str] = {}
        for axis, kind in plan.adapter.input_axes(plan.geometry).get(name, {}).items():
            if kind == "prompt_len":
                dims[axis], labels_n[axis] = t_dim, "prompt_len"
            elif kind == "batch" and dyn_batch:
                dims[axis], labels_n[axis] = b_dim, "batch"
            elif isinstance(kind, tuple) and dyn_batch:  # ("batch", m): images flattened into m rows each
                dims[axis], labels_n[axis] = kind[1] * b_dim, f"batch * {kind[1]}"
        prefill_dyn[name] = dims or None
        prefill_labels[name] = labels_n
    batch_label = {0: "batch"} if dyn_batch else {}
    prefill = GraphSpec(
        PREFILL, reduced, names, reduced.output_names, tuple(batch[n] for n in names),
        {"inputs": tuple(prefill_dyn[n] for n in names)}, labels=prefill_labels,
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
