"""The budget autotuner: `python -m tokcompile tune tune.yml` finds, among candidate methods and parameter grids,
the token reduction that loses the least quality within a prefill FLOPs budget, a measured time-to-first-token
budget, or both.

    base: ../recipes/tiny/fastv.yml        # relative to the tune file; its model, quantization and export
    out: exported/tune/tiny                # default: exported/tune/<tune file name>
    budget: {flops_ratio: 0.6}             # the exact prefill FLOPs ratio (vision, decoder, lm_head, scoring);
                                           # and/or ttft_ms: 400, measured on this machine (step 4), on
                                           # backend: onnxruntime (default: the first of the targets)
    candidates:
      - {method: FastV, grid: {pruning_loc: [1, 2, 3], rate: [0.5, 0.75]}}
      - {method: ToMe, section: vision, grid: {r: [8, 16]}}
    search: {samples: 16, eta: 2, finalists: 2}
    calib: {name: custom_mm, path: DIR}    # the proxy's prompts (default: the base's quant.calib, else synthetic)
    targets: [onnx]                        # export.targets of the finalists' compiles
    resources: {num_cpus: 1}               # what each finalist's compile asks Ray for

1. **Budget.** Every candidate is planned (no weights): its exact FLOPs ratio decides whether it is in budget;
   a candidate whose parameters do not plan is listed with its error.
2. **Proxy, by successive halving** (Jamieson and Talwalkar, AISTATS 2016): the unreduced model (eager,
   unquantized: quantization is the same for every candidate) answers every calibration prompt greedily with
   up to `search.answer_tokens` tokens (default 8; an answer ends at its EOS). The candidates in budget are
   scored on the first `samples / eta^R` prompts by the mean KL divergence of the reduced model's next-token
   distribution from the unreduced one's at every position of that answer (teacher-forced: the reduced model
   decodes the unreduced answer through its own cache), then the best 1/eta go on with eta times more prompts,
   until `finalists` remain; ties go to the higher top-1 agreement over the same positions. `answer_tokens: 1`
   scores the first token only.
3. **Finalists** compile through the sweep engine (`sweep.py`: Ray tasks, or `--serial`) with the base recipe's
   quantization, export and `eval` section. With an `eval` section the winner is the most accurate finalist
   (its first dataset, `exported` else `transformed`); without, the one of least KL.
4. **Time to first token** (`budget.ttft_ms`): after every compile has finished, each compiled finalist is
   loaded with the runtime and timed alone, one after another (`ttft.py`: one image, one question, batch 1,
   median of `search.ttft_repeats`, default 5, on `budget.backend` or the first of its targets). Finalists above
   the budget cannot win. Only finalists are timed (the others never compile): raise `search.finalists` for a
   wider choice.

`out/tune.md` and `out/tune.json` list every candidate tried (FLOPs ratio, budget, the KL and agreement of each
rung it ran); `out/best.yml` is the winning recipe.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tokcompile.errors import RecipeError, TokcompileError, one_line
from tokcompile.generation import Generated, GenerationConfig, generate, teacher_forced_logits
from tokcompile.question import QuestionTokenizer
from tokcompile.sweep import Point, Sweep, execute, point_id
from tokcompile.vtw_search import kl_withdrawn_to_full

KEYS = ("base", "out", "budget", "candidates", "search", "calib", "targets", "resources")
MAX_ANSWER_TOKENS = 256  # the unreduced answer the proxy follows ends at EOS or here


def _read(path: Path, key: str) -> Any:
    from tokcompile.yaml_safe import load_bounded

    try:
        return load_bounded(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise RecipeError(key, f"{path} could not be read as YAML ({one_line(str(e))})") from None


def load_tune(path: str | Path) -> dict[str, Any]:
    """The tune file, checked, with its base recipe and candidates expanded to recipe mappings."""
    src = Path(path)
    if not src.is_file():
        raise RecipeError(str(path), "is not a file; pass the path of a tune .yml")
    data = _read(src, str(path))
    if not isinstance(data, dict):
        raise RecipeError(str(path), "a tune file is a mapping with base, budget and candidates")
    unknown = [k for k in data if k not in KEYS]
    if unknown:
        raise RecipeError(unknown[0], f"unknown tune key; known: {', '.join(KEYS)}")
    if not isinstance(data.get("base"), str) or not (src.parent / data["base"]).is_file():
        raise RecipeError("base", "give the base recipe's path, relative to the tune file")
    base = _read(src.parent / data["base"], "base")
    budget = data.get("budget")
    limits = {k: v for k, v in budget.items() if k != "backend"} if isinstance(budget, dict) else {}
    if not isinstance(budget, dict) or not limits or any(k not in ("flops_ratio", "ttft_ms") for k in limits) or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 for v in limits.values()):
        raise RecipeError("budget", "give {flops_ratio: R} (the most exact prefill FLOPs ratio to accept, 0 < R), "
                                    "{ttft_ms: M} (the most measured time to first token, in ms) or both")
    backend = budget.get("backend")
    if backend is not None:
        from tokcompile.runtime import BACKENDS

        if "ttft_ms" not in limits or backend not in BACKENDS:
            raise RecipeError("budget.backend", f"{backend!r}: the runtime backend the time to first token is "
                                                f"measured on, with ttft_ms; one of {', '.join(BACKENDS)}")
    given = data.get("search") or {}
    counts = ("samples", "eta", "finalists", "ttft_repeats", "answer_tokens")
    if not isinstance(given, dict) or any(k not in counts for k in given):
        raise RecipeError("search", f"takes {', '.join(counts[:-1])} and {counts[-1]}")
    search = {"samples": 16, "eta": 2, "finalists": 1, "ttft_repeats": 5, "answer_tokens": 8, **given}
    if any(isinstance(search[k], bool) or not isinstance(search[k], int) or search[k] < 1 for k in counts) \
            or search["eta"] < 2:
        raise RecipeError("search", "samples, finalists, ttft_repeats and answer_tokens are integers >= 1, eta an "
                                    "integer >= 2")
    if search["answer_tokens"] > MAX_ANSWER_TOKENS:
        raise RecipeError("search.answer_tokens", f"{search['answer_tokens']} is more than {MAX_ANSWER_TOKENS}; the "
                                                  "proxy compares short answers (default 8)")
    calib = _calib(data.get("calib"), src)
    candidates = []
    for i, cand in enumerate(data.get("candidates") or []):
        if not isinstance(cand, dict) or not isinstance(cand.get("method"), str):
            raise RecipeError(f"candidates[{i}]", "each candidate is {method: NAME, grid: {param: [values]}}")
        grid = cand.get("grid") or {}
        if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
            raise RecipeError(f"candidates[{i}].grid", "a mapping of parameter -> non-empty list of values")
        section = cand.get("section", "special")
        if section not in ("special", "vision"):
            raise RecipeError(f"candidates[{i}].section", f"{section!r}: use special (default) or vision")
        for combo in itertools.product(*grid.values()):
            special = {"method": cand["method"], **dict(zip(grid, combo))}
            sparse = {"special": special} if section == "special" else {
                "vision": {"method": "TokenReduction", "special": special}}
            recipe = {**json.loads(json.dumps(base)), "sparse": sparse}
            recipe.setdefault("save", {}).pop("save_path", None)
            if data.get("targets") is not None:
                recipe.setdefault("export", {})["targets"] = data["targets"]
            candidates.append({"params": special, "recipe": recipe})
    if not candidates:
        raise RecipeError("candidates", "no candidate; list methods with their parameter grids")
    out = Path(data.get("out") or Path("exported") / "tune" / src.stem)
    limits = {k: float(v) for k, v in limits.items()}
    return {"source": src, "out": out, "budget": {**limits, **({"backend": backend} if backend else {})},
            "search": search, "calib": calib,
            "candidates": candidates, "resources": data.get("resources") or {}}


def _calib(given: Any, src: Path) -> dict[str, str] | None:
    """The tune file's `calib: {name, path}`: where the proxy's prompts come from (None: the base recipe's
    quant.calib, else synthetic). A relative path is the tune file's."""
    from tokcompile.quant.calib import SOURCES

    if given is None:
        return None
    if not isinstance(given, dict) or any(k not in ("name", "path") for k in given) or given.get("name") not in SOURCES:
        raise RecipeError("calib", f"give {{name: SOURCE}} with a SOURCE of {', '.join(SOURCES)} (and path: for "
                                   "custom_mm or custom); search.samples sets how many prompts")
    if given["name"] in ("custom_mm", "custom"):
        if not isinstance(given.get("path"), str):
            raise RecipeError("calib.path", f"calib name {given['name']} needs a path to a folder or JSONL file")
        return {"name": given["name"], "path": str(src.parent / Path(given["path"]).expanduser())}
    return {"name": given["name"]}


def _plan(recipe: dict[str, Any]):
    from tokcompile.plan import resolve
    from tokcompile.recipe import load_recipe_dict

    parsed = dataclasses.replace(load_recipe_dict(recipe, "candidate"), eval=None)
    return resolve(parsed)


def rungs(n: int, samples: int, eta: int, finalists: int) -> list[int]:
    """Prompts per rung: halvings from n candidates down to `finalists`, the last rung on all `samples`."""
    r = max(0, math.ceil(math.log(max(n, 1) / finalists, eta))) if n > finalists else 0
    return [max(1, samples // eta ** (r - k)) for k in range(r + 1)]


def tune(path: str | Path, *, serial: bool = False, address: str | None = None,
         log: Callable[[str], None] = print) -> dict[str, Any]:
    from tokcompile.models.loading import load_model, load_processor
    from tokcompile.quant.calib import calibration_batches
    from tokcompile.recipe import CalibConfig

    spec = load_tune(path)
    search = spec["search"]
    budget = spec["budget"].get("flops_ratio", math.inf)
    rows = []
    for c in spec["candidates"]:
        row = {"params": c["params"], "recipe": c["recipe"], "rungs": []}
        try:
            plan = _plan(c["recipe"])
            row["flops_ratio"] = round(plan.flops["total_exact"]["ratio"], 4)
            row["in_budget"] = row["flops_ratio"] <= budget
            row["plan"] = plan
        except TokcompileError as e:
            row.update(flops_ratio=None, in_budget=False, error=one_line(str(e)))
        rows.append(row)
    alive = [r for r in rows if r["in_budget"]]
    log(f"tune {spec['source'].name}: {len(rows)} candidates, {len(alive)} within FLOPs ratio {budget:g}")
    if not alive:
        raise RecipeError("budget.flops_ratio", f"no candidate is within a FLOPs ratio of {budget}; raise it or "
                                                "add candidates that prune more")
    first = alive[0]["plan"]
    recipe = first.recipe
    calib = dataclasses.replace(recipe.quant.calib if recipe.quant is not None else CalibConfig(),
                                n_samples=search["samples"], **(spec["calib"] or {}))
    processor = load_processor(recipe.model.path, recipe.model.trust_remote_code)
    model = load_model(recipe.model.path, first.config, recipe.base.seed, recipe.model.trust_remote_code)
    # candidates that read the question (TRIM, CDPruner) get it from one tokenizer; the others ignore it
    specs = {r["plan"].question for r in alive if r["plan"].question is not None}
    if len(specs) > 1:
        raise RecipeError("candidates", "candidates read the question with different text encoders or segments; "
                                        "give them one text_encoder and text_segments")
    question = QuestionTokenizer.load(specs.pop()) if specs else None
    try:
        batches = calibration_batches(calib, processor, first.adapter, first.geometry, recipe.base.seed, 1, question)
    except RecipeError as e:  # the tune file's calib, not the recipe's, where the tune file gave it
        if spec["calib"] is None or not e.key.startswith("quant.calib"):
            raise
        raise RecipeError(e.key.replace("quant.calib", "calib", 1), str(e)[len(e.key) + 2:]) from None
    answers = unreduced_answers(dataclasses.replace(first, schedule=(), reducers=()), model, batches,
                                search["answer_tokens"])
    lengths = [a.tokens.shape[1] for a in answers]
    log(f"  the unreduced model answered {len(batches)} calibration prompt(s) with {min(lengths)}-{max(lengths)} "
        f"token(s) each (at most {search['answer_tokens']})")
    counts = rungs(len(alive), len(batches), search["eta"], search["finalists"])
    for k, n in enumerate(counts):
        for r in alive:
            kl, top1 = answer_drift(r["plan"], model, batches[:n], answers[:n])
            r["rungs"].append({"prompts": n, "kl": kl, "top1_agreement": top1})
        alive.sort(key=lambda r: (r["rungs"][-1]["kl"], -r["rungs"][-1]["top1_agreement"]))
        keep = search["finalists"] if k == len(counts) - 1 else max(search["finalists"],
                                                                     math.ceil(len(alive) / search["eta"]))
        log(f"  rung {k + 1}/{len(counts)}: {len(alive)} candidate(s) on {n} prompt(s); best KL "
            f"{alive[0]['rungs'][-1]['kl']:.4g} ({alive[0]['params']}); {min(keep, len(alive))} go on")
        alive = alive[:keep]
    points = tuple(Point({"sparse": r["recipe"]["sparse"]}, r["recipe"], point_id(r["recipe"])) for r in alive)
    sweep = Sweep(spec["source"], spec["out"], points, {k: float(v) for k, v in spec["resources"].items()})
    compiled = execute(sweep, address=address, serial=serial, log=log)
    for r, c in zip(alive, compiled):
        r["final"] = {k: v for k, v in c.items() if k != "overrides"}
    ok = [r for r in alive if r["final"]["status"] != "failed"]
    if not ok:
        raise RecipeError("candidates", f"every finalist failed to compile; see {spec['out'] / 'sweep.md'}")
    if "ttft_ms" in spec["budget"]:
        ok = _within_ttft(spec, ok, log)
    accuracy = [k for k in ok[0]["final"] if k.startswith("accuracy:")]
    best = max(ok, key=lambda r: r["final"][accuracy[0]]) if accuracy else ok[0]
    return _write(spec, rows, best, accuracy[0] if accuracy else None)


def unreduced_answers(plan: Any, model: Any, batches: list[dict], n_tokens: int) -> list[Generated]:
    """The unreduced model's greedy answer to each prompt (batch 1 each; at most `n_tokens` tokens, up to and
    including EOS), with the logits of every step: the distributions the candidates are compared with."""
    from tokcompile.graphs import build_modules, eager_runners
    from tokcompile.manifest import eos_token_id

    reduced, decode = build_modules(plan, model)
    runners = eager_runners(reduced, decode)
    cfg = GenerationConfig(max_new_tokens=n_tokens, eos_token_id=eos_token_id(plan))
    return [generate(*runners, dict(b), layout=reduced.layout, cfg=cfg, keep_logits=True) for b in batches]


def answer_drift(plan: Any, model: Any, batches: list[dict], answers: list[Generated]) -> tuple[float, float]:
    """A candidate's drift along the unreduced answers: (mean KL(P_reduced || P_unreduced) over every answer
    position of every prompt, the fraction of those positions whose top-1 token agrees)."""
    from tokcompile.graphs import build_modules, eager_runners

    reduced, decode = build_modules(plan, model)
    runners = eager_runners(reduced, decode)
    kl, agree = [], []
    for b, answer in zip(batches, answers):
        got = teacher_forced_logits(*runners, dict(b), layout=reduced.layout, continuation=answer.tokens)  # (1, n, V)
        want = torch.stack(answer.step_logits, dim=1)  # (1, n, V)
        kl.append(kl_withdrawn_to_full(got.flatten(0, 1), want.flatten(0, 1)))  # (n,)
        agree.append((got.argmax(-1) == want.argmax(-1)).flatten())  # (n,)
    return float(torch.cat(kl).double().mean()), float(torch.cat(agree).double().mean())


def _within_ttft(spec: dict[str, Any], finalists: list[dict], log: Callable[[str], None],
                 measure: Callable[[Path, str, int], float] | None = None) -> list[dict]:
    """The compiled finalists whose measured time to first token is within `budget.ttft_ms`, in their order;
    each gets `final.ttft_ms`. Timed one after another, after every compile has finished."""
    from tokcompile.ttft import backend_for, ttft_ms

    measure = measure or ttft_ms
    limit = spec["budget"]["ttft_ms"]
    for r in finalists:
        export = spec["out"] / "points" / r["final"]["id"]
        backend = spec["budget"].get("backend") or backend_for(r["recipe"].get("export", {}).get("targets") or ["onnx"])
        try:
            r["final"]["ttft_ms"] = round(measure(export, backend, spec["search"]["ttft_repeats"]), 1)
        except TokcompileError as e:  # the export lacks that backend's graphs, or the backend is not installed
            raise RecipeError("budget.backend", f"{backend} could not run finalist {r['final']['id']} "
                                                f"({one_line(str(e))}); add its target to targets, or name another "
                                                "backend") from None
        r["final"]["ttft_backend"] = backend
        log(f"  ttft {r['params']}: {r['final']['ttft_ms']} ms ({backend})")
    within = [r for r in finalists if r["final"]["ttft_ms"] <= limit]
    if not within:
        seen = ", ".join(f"{r['final']['ttft_ms']} ms" for r in finalists)
        raise RecipeError("budget.ttft_ms", f"no finalist answers within {limit:g} ms on this machine (measured: "
                                            f"{seen}); raise it, lower flops_ratio or raise search.finalists")
    return within


def _write(spec: dict[str, Any], rows: list[dict], best: dict, by: str | None) -> dict[str, Any]:
    out = spec["out"]
    (out / "best.yml").write_text(json.dumps(best["recipe"], indent=1) + "\n")  # JSON is YAML
    doc = {"budget": spec["budget"], "search": spec["search"], "calib": spec["calib"] or "the base recipe's",
           "chosen_by": by or "kl",
           "best": best["params"], "candidates": [
               {k: v for k, v in r.items() if k not in ("plan", "recipe")} for r in rows]}
    (out / "tune.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    within = " and ".join(f"{k} <= {v:g}" for k, v in spec["budget"].items() if k != "backend")
    lines = [f"# Tune ({within}; chosen by {by or 'the KL proxy'})", "",
             f"Best: `{json.dumps(best['params'])}`, recipe `best.yml`.", "",
             "KL and top-1 agreement over the unreduced model's greedy answer to each prompt (teacher-forced; at "
             f"most {spec['search']['answer_tokens']} tokens, up to its EOS).", "",
             "| candidate | FLOPs ratio | in budget | KL per rung (prompts) | top-1 agreement (last rung) | final | "
             f"{by or 'accuracy'} | TTFT ms |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rung = ", ".join(f"{x['kl']:.4g} ({x['prompts']})" for x in r["rungs"]) or r.get("error", "")
        top1 = f"{r['rungs'][-1]['top1_agreement']:.3f}" if r["rungs"] else ""
        final = r.get("final", {}).get("status", "")
        accuracy = r.get("final", {}).get(by, "") if by else ""
        ttft = r.get("final", {}).get("ttft_ms", "")
        lines.append(f"| `{json.dumps(r['params'])}` | {r['flops_ratio']} | {r['in_budget']} | {rung} | {top1} | "
                     f"{final} | {accuracy} | {ttft} |")
    (out / "tune.md").write_text("\n".join(lines) + "\n")
    return doc
