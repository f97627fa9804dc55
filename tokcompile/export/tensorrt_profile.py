"""TensorRT optimization profiles: [min, opt, max] for every dynamic input dimension of a graph.

The manifest names each dynamic axis (`graphs.<name>.inputs[i].shape`): `batch`, `prompt_len`, `past_len_g`
(decode's cache length of cache group g), and expressions of them (`past_len_0 + 1`, `batch * 4`). Ranges per
name come from the plan, written in the manifest:
- batch: 1 .. generation.batch_max (opt: the max);
- prompt_len: plan.text_len_range (image placeholders included; opt: the middle);
- past_len_g: the prefill's cache of group g, `T - N + image tokens entering the group's first layer`, from the
  shortest prompt to the longest plus `max_new_tokens - 1` generated tokens.
`export.tensorrt.{batch, prompt_len, cache_len}` replace them (`cache_len` for every group). Pure functions: no
TensorRT needed, so they are tested everywhere.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

Range = tuple[int, int, int]  # (min, opt, max)
_LABEL = re.compile(r"^\s*([A-Za-z_]\w*)\s*(?:([+*])\s*(\d+))?\s*$")


def default_ranges(m: Mapping[str, Any]) -> dict[str, Range]:
    """Ranges per dimension name from a manifest-like dict: `plan.text_len_range`, `plan.image_tokens_per_layer`,
    `plan.geometry.n_image_tokens`, `cache_groups`, `generation.{batch_max, max_new_tokens}`, and the overrides
    in `recipe.export.tensorrt`."""
    plan, gen = m["plan"], m["generation"]
    t_lo, t_hi = plan["text_len_range"]
    t_opt = (t_lo + t_hi) // 2
    b_max = int(gen["batch_max"])
    over = (m.get("recipe", {}).get("export", {}) or {}).get("tensorrt") or {}
    ranges: dict[str, Range] = {
        "batch": tuple(over["batch"]) if over.get("batch") else (1, b_max, b_max),
        "prompt_len": tuple(over["prompt_len"]) if over.get("prompt_len") else (t_lo, t_opt, t_hi),
    }
    n_image = int(plan["geometry"]["n_image_tokens"])
    per_layer = plan["image_tokens_per_layer"]
    new = max(int(gen["max_new_tokens"]), 1)
    for g, (start, _end) in enumerate(m["cache_groups"]):
        removed = n_image - int(per_layer[start])  # placeholders minus the image tokens this group caches
        cache = tuple(t - removed for t in ranges["prompt_len"])
        ranges[f"cache_len_{g}"] = cache  # prefill outputs (T_g)
        ranges[f"past_len_{g}"] = (tuple(over["cache_len"]) if over.get("cache_len")
                                   else (cache[0], cache[1] + new // 2, cache[2] + new - 1))
    return ranges


def plan_ranges(plan: Any) -> dict[str, Range]:
    """`default_ranges` from a resolved `Plan` (what the manifest will record), before the manifest exists."""
    return default_ranges({
        "plan": plan.to_dict(),
        "cache_groups": [list(g) for g in plan.layout.groups],
        "generation": {"batch_max": plan.batch_size, "max_new_tokens": plan.recipe.inputs.max_new_tokens},
        "recipe": {"export": plan.recipe.to_dict()["export"]},
    })


def dim_range(label: Any, ranges: Mapping[str, Range]) -> Range:
    """The range of one axis: a static int, a name, `name + k` or `name * k`."""
    if isinstance(label, int):
        return (label, label, label)
    match = _LABEL.match(str(label))
    if match is None or match.group(1) not in ranges:
        known = ", ".join(sorted(ranges))
        raise ValueError(f"dimension '{label}' has no range (known: {known}); set it under export.tensorrt")
    name, op, k = match.groups()
    base = ranges[name]
    if op == "+":
        return tuple(v + int(k) for v in base)  # type: ignore[return-value]
    if op == "*":
        return tuple(v * int(k) for v in base)  # type: ignore[return-value]
    return base


def input_profiles(inputs: Sequence[Mapping[str, Any]], ranges: Mapping[str, Range]) -> dict[str, tuple]:
    """{input name: (min shape, opt shape, max shape)} for every input with a dynamic axis; `inputs` as the
    manifest writes them: [{"name", "shape": [int | label, ...]}, ...]."""
    out: dict[str, tuple] = {}
    for spec in inputs:
        shape = list(spec["shape"])
        if all(isinstance(d, int) for d in shape):
            continue
        per_axis = [dim_range(d, ranges) for d in shape]
        out[spec["name"]] = tuple(tuple(r[i] for r in per_axis) for i in range(3))
    return out


def check_ranges(over: Any, batch_max: int, text_len_range: tuple[int, int]) -> tuple[str, str] | None:
    """(recipe key, why) when the `export.tensorrt` overrides do not fit the graphs, else None."""
    if over.batch is not None and over.batch[2] > batch_max:
        return ("export.tensorrt.batch", f"max {over.batch[2]} exceeds inputs.batch_size ({batch_max}), the largest "
                                         "batch the graphs take; lower it or raise inputs.batch_size")
    lo, hi = text_len_range
    if over.prompt_len is not None and not (lo <= over.prompt_len[0] and over.prompt_len[2] <= hi):
        return ("export.tensorrt.prompt_len", f"{list(over.prompt_len)} leaves the graphs' prompt lengths {lo}..{hi} "
                                              "(image placeholders included); keep min and max inside them")
    return None
