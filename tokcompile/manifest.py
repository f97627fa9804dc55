"""manifest.json: what an export holds, how to run it and what it was built from."""

from __future__ import annotations

import hashlib
import platform
import time
from pathlib import Path
from typing import Any

from tokcompile import __version__

FORMAT_VERSION = 2  # 2: a separate vision graph; graph I/O named by the layout


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "tokcompile": __version__}
    for pkg in ("torch", "transformers", "onnx", "onnxruntime", "onnxscript", "safetensors", "tokenizers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def io_spec(names: list[str], tensors: list[Any], labels: dict[str, dict[int, str]]) -> list[dict]:
    spec = []
    for name, t in zip(names, tensors):
        shape: list[Any] = list(t.shape)
        for axis, label in labels.get(name, {}).items():
            shape[axis] = label
        spec.append({"name": name, "dtype": str(t.dtype).replace("torch.", ""), "shape": shape})
    return spec


def build_manifest(
    plan: Any, specs: list, artifacts: list, layout: Any, outputs: dict[str, tuple], quantization: dict | None,
    timings: dict, root: Path,
) -> dict:
    recipe = plan.recipe
    prefill = next(s for s in specs if s.name == "prefill")
    dyn_b = {0: "batch"} if "batch" in prefill.labels.get("input_ids", {}).values() else {}

    def label(name: str, graph: str) -> dict[int, str]:
        if name.startswith("present_"):  # (B, Hkv, length, d): the cache grows by one entry per decode step
            g = layout.group_of(int(name.rsplit("_", 1)[1]))
            return {**dyn_b, 2: f"cache_len_{g}" if graph == "prefill" else f"past_len_{g} + 1"}
        if name.startswith(("cache_mask_", "cache_bias_")):
            return {**dyn_b, 1: f"cache_len_{name.rsplit('_', 1)[1]}"}
        return dict(dyn_b)

    graphs: dict[str, Any] = {}
    for spec in specs:
        graphs[spec.name] = {
            "inputs": io_spec(spec.input_names, list(spec.example), spec.labels),
            "outputs": io_spec(spec.output_names, list(outputs[spec.name]),
                               {n: label(n, spec.name) for n in spec.output_names}),
            "artifacts": {a.target: {"files": a.files, "backend": a.backend, **a.meta} for a in artifacts
                          if a.graph == spec.name},
        }
    graphs["prefill"]["prompt_len"] = {"min": plan.text_len_range[0], "max": plan.text_len_range[1]}
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": recipe.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "recipe": {"name": recipe.name, **recipe.to_dict()},
        "warnings": list(recipe.warnings),
        "plan": plan.to_dict(),
        "schedule": [s.to_dict() for s in plan.schedule],
        "cache_groups": [list(g) for g in layout.groups],
        "layout": layout.to_dict(),
        "position_policy": "before the decoder: contiguous 1-D positions over the shorter prompt, or the kept "
                           "tokens' original multi-row ids; decoder steps keep original ids (P1) or renumber "
                           "(P2) as each step records; generated token t sits at the prefill's next_position + t",
        "media": _media(plan, next(s for s in specs if s.name == "vision")),
        "generation": {
            "eos_token_id": eos_token_id(plan),
            "max_new_tokens": recipe.inputs.max_new_tokens,
            "batch_max": plan.batch_size,
        },
        "graphs": graphs,
        "backends": sorted({a.backend for a in artifacts}),
        "quantization": quantization,
        "processor": "processor",
        "fake_quant_checkpoint": "fake_quant" if recipe.save.save_fake else None,
        "parity": {"passed": True, "file": "parity.json"},
        "flops": {"file": "flops.json", "exact_ratio": plan.flops["conventions"]["exact"]["ratio"]},
        "timings_s": timings,
        "versions": library_versions(),
    }
    manifest["files"] = {
        str(p.relative_to(root)): {"sha256": sha256(p), "bytes": p.stat().st_size}
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }
    return manifest


def _media(plan: Any, prefill: Any) -> dict:
    """What one prompt carries and how inputs reach the compiled resolution, for the runtime."""
    g, a = plan.geometry, plan.adapter
    example = prefill.example_dict()
    return {
        "kind": g.media,
        "size": list(g.image_size),
        "resize": ("the runtime resizes every image to the compiled size before the processor"
                   if a.resize_to_compiled else "the processor resizes and crops to the compiled size"),
        "resize_to_compiled": bool(a.resize_to_compiled),
        # Per-sample values of inputs that the graph bakes in (checked by the runtime before it runs).
        "fixed_inputs": {n: example[n][0].tolist() for n in a.fixed_value_inputs if n in example},
    }


def eos_token_id(plan: Any) -> int | None:
    """The id generation stops at: the text config's EOS (the first, where it lists several)."""
    tc = getattr(plan.config, "text_config", plan.config)
    eos = getattr(tc, "eos_token_id", None)
    return eos[0] if isinstance(eos, list) else eos
