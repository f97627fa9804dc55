"""Recipe sweeps: a base recipe and a grid of overrides by recipe key, every point compiled (and evaluated, when
the base recipe has an `eval` section) as a Ray task, with one table of cost against quality.

A sweep file:

    base: recipes/tiny/fastv.yml            # relative to the sweep file
    out: exported/sweeps/fastv              # relative to the current directory, like save.save_path;
                                            # default: exported/sweeps/<sweep file name>
    points:                                 # optional: explicit override sets (e.g. one per method)
      - {sparse.special: {method: FastV, pruning_loc: 2, rate: 0.5}}
      - {sparse.special: {method: DART, pruning_loc: 2, reduction_ratio: 0.7778}}
    grid:                                   # optional: every combination, crossed with the points
      quant.weight.bit: [4, 8]
    resources: {num_cpus: 1, num_gpus: 0}   # per point's Ray task (+1 GPU: tensorrt, parity.device: cuda)
    targets: [onnx]                         # optional: export.targets for every point

An override key is a dotted recipe path; its value replaces what is there (a mapping replaces the whole
subtree). Each point's resolved recipe is written under `out/recipes/` and compiled into `out/points/<id>`, where
the id is a hash of that recipe: a re-run skips the points whose export is already published. A point that fails
is one line in the results, not the end of the sweep. `out/sweep.json` and `out/sweep.md` hold the results.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokcompile.errors import RecipeError, TokcompileError, one_line

KEYS = ("base", "out", "points", "grid", "resources", "targets")


@dataclass(frozen=True)
class Point:
    """One recipe of the sweep: its overrides, the resolved recipe mapping and its id."""

    overrides: dict[str, Any]
    recipe: dict[str, Any]
    id: str


@dataclass(frozen=True)
class Sweep:
    source: Path
    out: Path
    points: tuple[Point, ...]
    resources: dict[str, float] = field(default_factory=dict)


def _set(tree: dict[str, Any], dotted: str, value: Any, key: str) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if not isinstance(child, dict):
            raise RecipeError(key, f"'{dotted}' goes through '{p}', which holds {child!r}, not a mapping")
        node = child
    node[parts[-1]] = json.loads(json.dumps(value))  # a copy, and YAML's values only


def point_id(recipe: dict[str, Any]) -> str:
    """A short hash of the resolved recipe (keys sorted): the same recipe, the same id."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def load_sweep(path: str | Path) -> Sweep:
    """Read and expand a sweep file; every error names its key."""
    from tokcompile.yaml_safe import load_bounded

    src = Path(path)
    if not src.is_file():
        raise RecipeError(str(path), "is not a file; pass the path of a sweep .yml")
    try:
        data = load_bounded(src.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise RecipeError(str(path), f"could not be read as YAML ({one_line(str(e))})") from None
    if not isinstance(data, dict):
        raise RecipeError(str(path), "a sweep file is a mapping with base, and points and/or grid")
    unknown = [k for k in data if k not in KEYS]
    if unknown:
        raise RecipeError(unknown[0], f"unknown sweep key; known: {', '.join(KEYS)}")
    if not isinstance(data.get("base"), str):
        raise RecipeError("base", "missing; give the base recipe's path (relative to the sweep file)")
    base_path = (src.parent / data["base"]).resolve()
    if not base_path.is_file():
        raise RecipeError("base", f"{base_path} does not exist")
    try:
        base = load_bounded(base_path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise RecipeError("base", f"{base_path} could not be read as YAML ({one_line(str(e))})") from None
    if not isinstance(base, dict):
        raise RecipeError("base", f"{base_path} is not a recipe (a mapping of sections)")
    points = data.get("points") or [{}]
    grid = data.get("grid") or {}
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
        raise RecipeError("points", "a list of mappings (recipe key -> value) is expected")
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise RecipeError("grid", "a mapping of recipe key -> non-empty list of values is expected")
    out = Path(data.get("out") or Path("exported") / "sweeps" / src.stem)
    targets = data.get("targets")
    expanded = []
    for fixed, combo in itertools.product(points, itertools.product(*grid.values())):
        overrides = {**fixed, **dict(zip(grid, combo))}
        recipe = json.loads(json.dumps(base))
        for k, v in overrides.items():
            _set(recipe, str(k), v, f"points/grid: {k}")
        if targets is not None:
            _set(recipe, "export.targets", targets, "targets")
        recipe.setdefault("save", {}).pop("save_path", None)  # the sweep places every export
        expanded.append(Point(overrides, recipe, point_id(recipe)))
    resources = data.get("resources") or {}
    if not isinstance(resources, dict) or any(k not in ("num_cpus", "num_gpus") for k in resources):
        raise RecipeError("resources", "takes num_cpus and num_gpus")
    return Sweep(src, out, tuple(expanded), {k: float(v) for k, v in resources.items()})


def run_point(recipe_path: str, out_dir: str, num_threads: int) -> dict[str, Any]:
    """Compile one point (in a Ray worker, or in this process). Never raises: a failure is its one line."""
    import torch

    from tokcompile.pipeline import compile_recipe

    if num_threads > 0:  # a Ray task uses the CPUs it asked for; in this process (--serial) torch's default
        torch.set_num_threads(num_threads)
    t0 = time.perf_counter()
    log_path = Path(out_dir).with_suffix(".log")
    try:
        with open(log_path, "w") as log:
            compile_recipe(recipe_path, out=out_dir, log=lambda m: print(m, file=log, flush=True))
        return {"status": "compiled", "seconds": round(time.perf_counter() - t0, 1)}
    except TokcompileError as e:
        return {"status": "failed", "error": one_line(str(e)), "seconds": round(time.perf_counter() - t0, 1)}
    except Exception as e:  # an unexpected failure of one point must not end the sweep
        return {"status": "failed", "error": f"{type(e).__name__}: {one_line(str(e))}",
                "seconds": round(time.perf_counter() - t0, 1), "traceback": traceback.format_exc()[-2000:]}


def point_resources(point: Point, defaults: dict[str, float]) -> dict[str, float]:
    """What a point's task asks Ray for: the sweep's `resources` (1 CPU by default), and a GPU where its recipe
    needs one (the tensorrt target builds its engines on a CUDA GPU; `parity.device: cuda` compiles there)."""
    targets = (point.recipe.get("export") or {}).get("targets") or []
    device = str((point.recipe.get("parity") or {}).get("device", "cpu")).strip().lower()
    needs_gpu = "tensorrt" in targets or device.startswith("cuda")
    gpus = max(defaults.get("num_gpus", 0), 1 if needs_gpu else 0)
    return {"num_cpus": defaults.get("num_cpus", 1), "num_gpus": gpus}


def _published(out_dir: Path) -> bool:
    return (out_dir / "manifest.json").is_file()


def execute(sweep: Sweep, *, address: str | None = None, serial: bool = False,
            log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Compile every point not yet published; returns one result per point, in the sweep's order."""
    (sweep.out / "recipes").mkdir(parents=True, exist_ok=True)
    (sweep.out / "points").mkdir(parents=True, exist_ok=True)
    todo, results = [], {}
    for p in sweep.points:
        recipe_path = sweep.out / "recipes" / f"{p.id}.yml"
        recipe_path.write_text(json.dumps(p.recipe, indent=1) + "\n")  # JSON is YAML
        out_dir = sweep.out / "points" / p.id
        if _published(out_dir):
            results[p.id] = {"status": "skipped (published)", "seconds": 0.0}
        else:
            todo.append((p, str(recipe_path), str(out_dir)))
    log(f"sweep {sweep.source.name}: {len(sweep.points)} points, {len(todo)} to compile, "
        f"{len(sweep.points) - len(todo)} already published")
    threads = int(sweep.resources.get("num_cpus", 1))
    t0 = time.perf_counter()
    if serial or not todo:
        for i, (p, rp, od) in enumerate(todo):
            results[p.id] = run_point(rp, od, 0)
            log(f"  [{i + 1}/{len(todo)}] {p.id} {_label(p)}: {_status(results[p.id])}")
    else:
        import ray

        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     **({} if address else {"object_store_memory": 200 << 20}))
        task = ray.remote(run_point)
        refs = {task.options(**point_resources(p, sweep.resources)).remote(rp, od, threads): p for p, rp, od in todo}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            p = refs[done[0]]
            results[p.id] = ray.get(done[0])
            log(f"  [{len(todo) - len(pending)}/{len(todo)}] {p.id} {_label(p)}: {_status(results[p.id])}")
    wall = round(time.perf_counter() - t0, 1)
    rows = [{"id": p.id, "overrides": p.overrides, **results[p.id], **_measures(sweep.out / "points" / p.id)}
            for p in sweep.points]
    (sweep.out / "sweep.json").write_text(json.dumps({"wall_seconds": wall, "serial": serial or not todo,
                                                      "points": rows}, indent=2) + "\n")
    (sweep.out / "sweep.md").write_text(markdown(rows, wall))
    return rows


def _label(p: Point) -> str:
    return " ".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in p.overrides.items()) or "(base)"


def _status(r: dict[str, Any]) -> str:
    return f"{r['status']} in {r['seconds']} s" + (f": {r['error']}" if "error" in r else "")


def _measures(out_dir: Path) -> dict[str, Any]:
    """Cost and quality of a published point: FLOPs ratio, image tokens per layer, parity, drift, accuracy."""
    if not _published(out_dir):
        return {}
    flops = json.loads((out_dir / "flops.json").read_text())
    parity = json.loads((out_dir / "parity.json").read_text())
    per_layer = flops.get("image_tokens_per_layer") or [0]
    row = {"flops_ratio": round(flops["total_exact"]["ratio"], 4),
           "mean_image_tokens": round(sum(per_layer) / len(per_layer), 1), "parity": parity.get("passed"),
           "top1_agreement": parity.get("drift_vs_uncompressed", {}).get("top1_agreement")}
    if (out_dir / "eval.json").is_file():
        ev = json.loads((out_dir / "eval.json").read_text())
        for name, data in ev.get("datasets", {}).items():
            pos = data["positions"]
            best = next((p for p in ("exported", "transformed") if p in pos), None)
            if best is not None:
                row[f"accuracy:{name}"] = round(pos[best]["accuracy"], 4)
    return row


def markdown(rows: list[dict[str, Any]], wall: float) -> str:
    acc = sorted({k for r in rows for k in r if k.startswith("accuracy:")})
    head = ["point", "overrides", "status", "FLOPs ratio", "mean image tokens / layer", "top-1 vs uncompressed",
            *acc, "seconds"]
    lines = [f"# Sweep ({len(rows)} points, {wall} s)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        status = r["status"] + (f": {r['error']}" if "error" in r else "")
        cells = [r["id"], json.dumps(r["overrides"], separators=(",", ":")).replace("|", "\\|"), status,
                 str(r.get("flops_ratio", "")), str(r.get("mean_image_tokens", "")), str(r.get("top1_agreement", "")),
                 *(str(r.get(a, "")) for a in acc), str(r["seconds"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
