"""compile(): the one orchestration function, read top to bottom.

recipe -> plan (config only) -> processor, parity inputs, uncompressed baseline -> weights quantized ->
ReducedVLM -> torch.export -> each target -> parity -> manifest -> publish.

Everything is written into a temporary sibling directory, which is renamed into place only after parity
passed; a failed compile leaves no directory behind and never touches an existing export.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from tokcompile import __version__
from tokcompile.errors import RecipeError
from tokcompile.plan import Plan, resolve
from tokcompile.recipe import load_recipe

FORMAT_VERSION = 1
GRAPH = "prefill"

Log = Callable[[str], None]


def plan_recipe(recipe_path: str | Path, out: str | Path | None = None, targets: tuple[str, ...] | None = None) -> Plan:
    return resolve(load_recipe(recipe_path), out=out, targets=targets)


def _sha256(path: Path) -> str:
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


def _io_spec(names: list[str], tensors: list[Any], dynamic: dict[str, dict[int, str]]) -> list[dict]:
    spec = []
    for name, t in zip(names, tensors):
        shape: list[Any] = list(t.shape)
        for axis, label in dynamic.get(name, {}).items():
            shape[axis] = label
        spec.append({"name": name, "dtype": str(t.dtype).replace("torch.", ""), "shape": shape})
    return spec


def check_output_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not force:
        raise RecipeError(
            "save.save_path",
            f"{out_dir} already exists; pass --force to replace it, or choose another save.save_path or --out",
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise RecipeError("save.save_path", f"{out_dir} is a file; choose a directory path")


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename `tmp` into place; an existing export (only with --force) is swapped out, then removed."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def compile_recipe(
    recipe_path: str | Path,
    *,
    out: str | Path | None = None,
    targets: tuple[str, ...] | None = None,
    force: bool = False,
    log: Log = print,
) -> Path:
    """Compile a recipe into a validated export directory and return its path."""
    t0 = time.perf_counter()
    recipe = load_recipe(recipe_path)
    for w in recipe.warnings:
        log(f"warning: {w}")
    plan = resolve(recipe, out=out, targets=targets)
    check_output_dir(plan.out_dir, force)
    plan.out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = plan.out_dir.with_name(f".{plan.out_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _compile_into(plan, tmp, log)
        _publish(tmp, plan.out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"done in {time.perf_counter() - t0:.1f}s: {plan.out_dir}")
    return plan.out_dir


def _compile_into(plan: Plan, tmp: Path, log: Log) -> None:
    import torch

    from tokcompile import parity
    from tokcompile.export import EXPORTERS
    from tokcompile.models import ReducedVLM
    from tokcompile.models.loading import load_model, load_processor
    from tokcompile.quant import quantize_
    from tokcompile.reference import fastv_reference

    recipe, g = plan.recipe, plan.geometry
    torch.manual_seed(recipe.base.seed)
    timings: dict[str, float] = {}

    def stage(name: str) -> Callable[[], None]:
        start = time.perf_counter()
        log(f"[{name}] ...")

        def done() -> None:
            timings[name] = round(time.perf_counter() - start, 2)
            log(f"[{name}] {timings[name]:.1f}s")

        return done

    done = stage("load")
    processor = load_processor(recipe.model.path, recipe.model.trust_remote_code)
    model = load_model(recipe.model.path, plan.config, recipe.base.seed, recipe.model.trust_remote_code)
    try:
        inputs = parity.make_inputs(
            processor, plan.batch_size, recipe.parity.samples, g.image_size, recipe.base.seed, plan.text_len_range[1]
        )
    except ValueError as e:
        raise RecipeError("inputs.max_prompt_len", f"{e}; raise it or remove it") from None
    with torch.no_grad():  # the uncompressed model's logits, per unpadded sample, for the drift report
        baseline = [
            torch.cat([model(input_ids=ids, pixel_values=pix).logits[:, -1] for ids, pix in map(inp.sample, range(len(inp.prompts)))])
            for inp in inputs
        ]
    done()

    quant_report = None
    if plan.quant is not None:
        done = stage("quantize")
        quant_report = quantize_(model, plan.quant, include=plan.quant_include, ignore=plan.quant_ignore)
        log(f"  {quant_report.n_layers} Linear layers fake-quantized, max relative weight error "
            f"{quant_report.max_rel_error:.4f}")
        done()

    processor.save_pretrained(str(tmp / "processor"))
    if recipe.save.save_fake:
        done = stage("save_fake")
        model.save_pretrained(str(tmp / "fake_quant"), safe_serialization=True)
        processor.save_pretrained(str(tmp / "fake_quant"))
        done()

    reduced = ReducedVLM(model, plan.adapter, g, plan.schedule, plan.reducers, plan.image_token_id).eval()
    names = list(plan.adapter.input_names)
    with torch.no_grad():
        eager = [reduced(*[inp.batch[n] for n in names]) for inp in inputs]

    done = stage("reference")
    report: dict[str, Any] = {"atol": recipe.parity.atol, "rtol": recipe.parity.rtol, "artifacts": {}}
    if recipe.parity.reference:
        step = plan.schedule[0] if plan.schedule else None
        if step is None or (len(plan.schedule) == 1 and step.method == "fastv"):
            def ref(ids: Any, pix: Any) -> Any:
                return fastv_reference(
                    model, ids, pix, image_token_id=plan.image_token_id,
                    pruning_loc=step.layer if step else None, keep=step.n_out if step else None,
                )
            report["reference"] = parity.check_reference(ref, eager, inputs, recipe.parity.atol, recipe.parity.rtol)
            log(f"  independent eager reference agrees (max |Δlogit| {report['reference']['max_abs_diff']:.2e})")
        else:
            report["reference"] = {"passed": None, "note": "no independent reference for this schedule"}
    report["drift_vs_uncompressed"] = parity.drift(eager, baseline)
    done()

    done = stage("export")
    example = tuple(inputs[0].batch[n] for n in names)
    text_dim = torch.export.Dim("prompt_len", min=plan.text_len_range[0], max=plan.text_len_range[1])
    dynamic = {"input_ids": {1: text_dim}, "attention_mask": {1: text_dim}, "pixel_values": None}
    with torch.no_grad():
        program = torch.export.export(reduced, example, dynamic_shapes=dynamic, strict=False)
    done()

    artifacts = []
    for target in plan.targets:
        done = stage(target)
        art = EXPORTERS.get(target)(
            program, dict(zip(names, example)), tmp, graph=GRAPH, input_names=names,
            output_names=reduced.output_names, opset=recipe.export.opset, log=log,
        )
        runner = art.load(tmp)
        report["artifacts"][art.name] = {
            "files": art.files,
            **parity.check_artifact(art.name, runner, eager, inputs, recipe.parity.atol, recipe.parity.rtol),
        }
        log(f"  {art.name}: parity passed (max |Δlogit| {report['artifacts'][art.name]['max_abs_diff']:.2e}, "
            f"kept indices equal on {len(inputs)} inputs)")
        artifacts.append(art)
        done()

    report["passed"] = True
    _write_json(tmp / "parity.json", report)
    _write_json(tmp / "flops.json", plan.flops)
    dyn = {"input_ids": {1: "prompt_len"}, "attention_mask": {1: "prompt_len"}}
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": recipe.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "recipe": {"name": recipe.name, **recipe.to_dict()},
        "warnings": list(recipe.warnings),
        "plan": plan.to_dict(),
        "schedule": [s.to_dict() for s in plan.schedule],
        "graphs": {
            GRAPH: {
                "inputs": _io_spec(names, list(example), dyn),
                "outputs": _io_spec(reduced.output_names, list(eager[0]), {}),
                "prompt_len": {"min": plan.text_len_range[0], "max": plan.text_len_range[1]},
                "artifacts": {a.target: {"files": a.files, "backend": a.backend, **a.meta} for a in artifacts},
            }
        },
        "backends": sorted({a.backend for a in artifacts}),
        "quantization": quant_report.to_dict() if quant_report else None,
        "processor": "processor",
        "fake_quant_checkpoint": "fake_quant" if recipe.save.save_fake else None,
        "parity": {"passed": True, "file": "parity.json"},
        "flops": {"file": "flops.json", "exact_ratio": plan.flops["conventions"]["exact"]["ratio"]},
        "timings_s": timings,
        "versions": library_versions(),
    }
    manifest["files"] = {
        str(p.relative_to(tmp)): {"sha256": _sha256(p), "bytes": p.stat().st_size}
        for p in sorted(tmp.rglob("*"))
        if p.is_file()
    }
    _write_json(tmp / "manifest.json", manifest)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
