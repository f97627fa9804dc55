"""Prefill speedup of every token-reduction method, exported, over the eager HF full model, in one run.

    python benchmarks/methods.py                                   # every method, medium LLaVA, ONNX
    python benchmarks/methods.py --methods none,fastv-r0.5,tome-r16 --repeats 3
    python benchmarks/methods.py --methods budgets --repeats 3     # each method at 64, 128 and 192 image tokens
    python benchmarks/methods.py --size tiny --repeats 1           # smoke run on the 4-layer tiny LLaVA
    python benchmarks/methods.py --backends onnx,aoti              # AOTInductor too (minutes per graph)
    python benchmarks/methods.py --methods tome-r16,pact --unreported  # what reporting decision scores costs

It builds the built-in random LLaVA (`tiny-random:llava@medium`: about 235M parameters, 576 image tokens, 16
decoder layers, 5 CLIP blocks run), one image prompt at the compiled resolution, and times the prefill (time to
first token, batch 1) of:
  hf_full     the HF model's own forward, eager, without compression (`model(**batch).logits[:, -1]`)
  <config>    the exported vision graph then prefill graph with that method's static schedule
for each method configuration (a recipe `sparse` section). Both graphs are exported at the prompt's static
shapes with the compiler's own exporters and checked against eager before they are timed as one chain
(benchmarks/common.py: kept / assign indices, cache masks, image sources and next positions equal, logits
within 1e-3). The table prints, per configuration, the image tokens that reach the decoder, the mean image
tokens per decoder layer, the time, the speedup over hf_full and the ideal speedup from the analytic FLOPs
(exact convention: vision tower + decoder + lm_head, at the prompt's own text length). PACT and its baselines
also get the official-style eager implementation (benchmarks/hooked_pact.py: the HF model with hooks and
dynamic shapes, as the official code runs), checked against the compiler's eager run (the same clusters, the
logit difference; k-means seeds differently there) and timed in the same run.

Layer indices are given for the 16-layer medium model (PyramidDrop stages before layers 4, 8, 12; VTW at
layer 8) and scaled to other depths (1, 2, 3 and 2 on the 4-layer tiny model). A method whose reducer is not
registered (`tokcompile.reduce.REDUCERS`), or whose configuration the plan rejects at this size, is skipped
with a note. Machines are noisy: read the ratios of one run, and run nothing else meanwhile.

`--unreported` also exports every configuration that reports decision scores (`Step.scored`) without them (the
same schedule, no score outputs; the selection is the same) and times the two chains alternately, run for run:
the ratio is what reporting costs the deployed graphs.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tokcompile.reduce.sparsevlm import THREE_STAGES  # noqa: E402  LightCompress's SparseVLM rows

QUESTION = "Describe this image in detail, please."
REFERENCE_LAYERS = 16  # the depth the layer indices below are written for (the medium LLaVA)


@dataclass(frozen=True)
class Config:
    name: str  # what --methods selects
    method: str | None  # the reducer's registry name (None: no reduction)
    label: Callable[[int], str]  # n_layers -> the table's name
    sparse: Callable[[int], dict | None]  # n_layers -> the recipe's `sparse` section
    official_eager: Callable[[Any, Any], Any] | None = None  # (HF model, plan) -> hooks: the official-style eager


def _hooked_pact(model: Any, plan: Any) -> Any:
    from benchmarks.hooked_pact import HookedPACT

    return HookedPACT(model, plan.image_token_id, plan.reducers[0])


def _hooked_aim(model: Any, plan: Any) -> Any:
    from benchmarks.hooked_aim import HookedAIM

    cfg = plan.reducers[0]
    return HookedAIM(model, plan.image_token_id, plan.schedule, cfg.tau_imp, cfg.iters)


def _layer(k: int, n_layers: int) -> int:
    """A layer index written for the 16-layer model, at `n_layers` layers."""
    return max(1, round(k * n_layers / REFERENCE_LAYERS))


def _special(method: str, **params) -> dict:
    return {"method": "TokenReduction", "special": {"method": method, **params}}


def _pyramid_layers(n: int) -> list[int]:
    return [_layer(k, n) for k in (4, 8, 12)]


def _sparsevlm_layers(n: int) -> list[int]:
    """LightCompress's [2, 6, 15] of 32 layers at `n` layers (each below n - 1, strictly increasing)."""
    return [max(0, round(k * n / 32)) for k in (2, 6, 15)]


CONFIGS: tuple[Config, ...] = (
    Config("none", None, lambda n: "no reduction", lambda n: None),
    Config("fastv-r0.5", "fastv", lambda n: "FastV K=2 R=0.5",
           lambda n: _special("FastV", pruning_loc=2, rate=0.5)),
    Config("fastv-r0.778", "fastv", lambda n: "FastV K=2 R=0.778",
           lambda n: _special("FastV", pruning_loc=2, rate=0.778)),
    Config("pyramiddrop", "pyramiddrop",
           lambda n: "PyramidDrop L" + "/".join(map(str, _pyramid_layers(n))) + " R=0.5/0.25/0.125",
           lambda n: _special("PyramidDrop", layer_list=_pyramid_layers(n),
                              image_token_ratio_list=[0.5, 0.25, 0.125])),
    Config("tome-r16", "tome", lambda n: "ToMe r=16 (vision)",
           lambda n: {"vision": _special("ToMe", r=16)}),
    Config("tome-r48", "tome", lambda n: "ToMe r=48 (vision)",
           lambda n: {"vision": _special("ToMe", r=48)}),
    Config("divprune-r0.7778", "divprune", lambda n: "DivPrune R=0.7778",
           lambda n: _special("DivPrune", reduction_ratio=0.7778)),
    Config("vtw", "vtw", lambda n: f"VTW K={_layer(8, n)}",
           lambda n: _special("VTW", pruning_loc=_layer(8, n))),
    Config("fastervlm-r0.778", "fastervlm", lambda n: "FasterVLM R=0.778 (vision)",
           lambda n: _special("FasterVLM", rate=0.778)),
    Config("visionzip-108-20", "visionzip", lambda n: "VisionZip 108+20 (vision)",
           lambda n: {"vision": _special("VisionZip", dominant=108, contextual=20)}),
    Config("ficoco-v-r42", "ficoco", lambda n: "FiCoCo-V r=42 from block 1 (vision)",
           lambda n: {"vision": _special("FiCoCo", merge_visual=True, r=42, control_encoding_layer=0)}),
    Config("vispruner-r0.7778", "vispruner", lambda n: "VisPruner R=0.7778 r=0.5 (vision)",
           lambda n: {"vision": _special("VisPruner", prune_ratio=0.7778, important_ratio=0.5)}),
    Config("dart-k2-r0.7778", "dart", lambda n: "DART K=2 R=0.7778",
           lambda n: _special("DART", pruning_loc=2, reduction_ratio=0.7778, pivot_image_token=4,
                              pivot_text_token=4)),
    # SparseVLM: LightCompress's layers 2, 6, 15 of 32 at this depth, with its "192" row (300, 200, 110 kept)
    Config("sparsevlm-192", "sparsevlm", lambda n: "SparseVLM L" + "/".join(map(str, _sparsevlm_layers(n)))
           + " 300/200/110", lambda n: _special("SparseVLM", pruning_loc=_sparsevlm_layers(n),
                                               stage_tokens=[300, 200, 110])),
    Config("randomprune-r0.778", "randomprune", lambda n: "RandomPrune K=2 R=0.778",
           lambda n: _special("RandomPrune", pruning_loc=2, prune_ratio=0.778)),
    # FiCoCo-L: the official 14 per layer from layer 5 of 32 leaves 198 of 576; 29 from layer 3 of 16 leaves 199
    Config("ficoco-l-r29", "ficoco", lambda n: f"FiCoCo-L r=29 from layer {_layer(2, n) + 1}",
           lambda n: _special("FiCoCo", merge_visual=False, AT=True, r=29, control_encoding_layer=_layer(2, n))),
    # AIM: the official piecewise schedule (layers 14..21 of 28) at this depth
    Config("aim-piecewise", "aim", lambda n: f"AIM piecewise {_layer(8, n)}..{_layer(12, n)}",
           lambda n: _special("AIM", prune_scheduler="piecewise", prune_start_layer=_layer(8, n),
                              prune_end_layer=_layer(12, n)), _hooked_aim),
)

# PACT: the official configuration (configs/pact.json) before layer 4; clusters fill at most int(0.55·576) slots
PACT_OFFICIAL = {"layer_for_reduction": 4, "use_DBDPC": True, "cutoff": 0.21, "token_pruning": True,
                 "pruning_tokeep_percentage_value": 0.55, "multiply_by_norm": True, "include_pruned_in_mean": True,
                 "coef_pruned": 1.5}
BASELINE = {"use_DBDPC": False, "token_pruning": False}  # the official baseline files: no pruning first
CONFIGS += (
    Config("pact", "pact", lambda n: f"PACT official, layer {_layer(4, n)}",
           lambda n: _special("PACT", **{**PACT_OFFICIAL, "layer_for_reduction": _layer(4, n)}), _hooked_pact),
    Config("pact-dpc", "pact", lambda n: f"PACT's DPC baseline p=0.3, layer {_layer(4, n)}",
           lambda n: _special("PACT", **BASELINE, use_dpc=True, percentage_to_keep_dpc=0.3,
                              layer_for_reduction=_layer(4, n)), _hooked_pact),
    Config("pact-dbscan", "pact", lambda n: f"PACT's DBSCAN baseline eps=0.6, layer {_layer(4, n)}",
           lambda n: _special("PACT", **BASELINE, use_dbscan=True, eps_dbscan=0.6, noise_as_clusters_dbscan=True,
                              layer_for_reduction=_layer(4, n)), _hooked_pact),
    Config("pact-agglomerative", "pact",
           lambda n: f"PACT's agglomerative baseline (single) p=0.3, layer {_layer(4, n)}",
           lambda n: _special("PACT", **BASELINE, use_agglomerative=True, percentage_to_keep_agglomerative=0.3,
                              linkage="single", layer_for_reduction=_layer(4, n)), _hooked_pact),
    Config("pact-kmeans", "pact", lambda n: f"PACT's k-means baseline p=0.3, layer {_layer(4, n)}",
           lambda n: _special("PACT", **BASELINE, use_kmeans=True, perc_tokeep_kmeans=0.3,
                              layer_for_reduction=_layer(4, n)), _hooked_pact),
    Config("pact-tome", "pact", lambda n: "PACT's ToMe baseline (every layer) p=0.3",
           lambda n: _special("PACT", **BASELINE, use_tome=True, perc_tokeep_tome_total=0.3,
                              tome_equivalant_layer_for_reduction=_layer(4, n)), _hooked_pact),
)

BUDGETS = (64, 128, 192)  # image tokens kept of LLaVA-1.5's 576, as the method papers report them
# The built-in CLIP whose vision head takes the benchmarked tower's features (set by `bench` from the geometry),
# for the methods that read the question (TRIM, CDPruner): random weights, as the LLaVA's.
CLIP = {"text_encoder": "tiny-random:clip@384"}


def _budget_configs() -> tuple[Config, ...]:
    """Each method at each budget, or the nearest setting it allows (`--methods budgets`); the ratios and merge
    counts are written for 576 image tokens and 5 running CLIP blocks (the medium LLaVA, as LLaVA-1.5's count)."""
    out = []
    for b in BUDGETS:
        ratio = round(1 - b / 576, 4)  # 0.8889, 0.7778, 0.6667: round(576·(1 - ratio)) = b
        dominant = {64: 54, 128: 108, 192: 162}[b]
        tome_r = {64: 102, 128: 90, 192: 77}[b]  # 84, 126, 191 tokens: a block merges at most half its tokens
        ficoco_r = (576 - b) // 4  # four merging blocks after block 0
        out += [
            Config(f"fastv-b{b}", "fastv", lambda n, r=ratio: f"FastV K=2 R={r}",
                   lambda n, r=ratio: _special("FastV", pruning_loc=2, rate=r)),
            Config(f"divprune-b{b}", "divprune", lambda n, r=ratio: f"DivPrune R={r}",
                   lambda n, r=ratio: _special("DivPrune", reduction_ratio=r)),
            Config(f"dart-b{b}", "dart", lambda n, r=ratio: f"DART K=2 R={r}",
                   lambda n, r=ratio: _special("DART", pruning_loc=2, reduction_ratio=r)),
            Config(f"sparsevlm-b{b}", "sparsevlm", lambda n, b=b: f"SparseVLM {'/'.join(map(str, THREE_STAGES[b]))}",
                   lambda n, b=b: _special("SparseVLM", pruning_loc=_sparsevlm_layers(n),
                                           stage_tokens=list(THREE_STAGES[b]))),
            Config(f"randomprune-b{b}", "randomprune", lambda n, r=ratio: f"RandomPrune K=2 R={r}",
                   lambda n, r=ratio: _special("RandomPrune", pruning_loc=2, prune_ratio=r)),
            Config(f"fastervlm-b{b}", "fastervlm", lambda n, r=ratio: f"FasterVLM R={r} (vision)",
                   lambda n, r=ratio: _special("FasterVLM", rate=r)),
            Config(f"visionzip-b{b}", "visionzip",
                   lambda n, d=dominant: f"VisionZip {d}+{d * 10 // 54} (vision)",
                   lambda n, d=dominant: {"vision": _special("VisionZip", dominant=d, contextual=d * 10 // 54)}),
            Config(f"vispruner-b{b}", "vispruner", lambda n, r=ratio: f"VisPruner R={r} r=0.5 (vision)",
                   lambda n, r=ratio: {"vision": _special("VisPruner", prune_ratio=r, important_ratio=0.5)}),
            Config(f"ficoco-v-b{b}", "ficoco", lambda n, r=ficoco_r: f"FiCoCo-V r={r} from block 1 (vision)",
                   lambda n, r=ficoco_r: {"vision": _special("FiCoCo", r=r, control_encoding_layer=0)}),
            Config(f"tome-b{b}", "tome", lambda n, r=tome_r: f"ToMe r={r} (vision)",
                   lambda n, r=tome_r: {"vision": _special("ToMe", r=r)}),
            # keep_ratio just above b/576 so that the code's int(576·k) is b; TRIM adds its aggregated token
            Config(f"trim-b{b}", "trim", lambda n, b=b: f"TRIM k={b}/576 + 1 aggregated (vision)",
                   lambda n, b=b: _special("TRIM", keep_ratio=round(b / 576 + 1e-4, 4), **CLIP)),
            Config(f"cdpruner-b{b}", "cdpruner", lambda n, b=b: f"CDPruner k={b} (projector)",
                   lambda n, b=b: _special("CDPruner", visual_token_num=b, **CLIP)),
        ]
    return tuple(out)


BUDGET_CONFIGS = _budget_configs()


def _plan(size: str, sparse: dict | None, tmp: Path, name: str):
    import yaml

    from tokcompile.pipeline import plan_recipe

    path = "tiny-random:llava" + (f"@{size}" if size != "tiny" else "")
    recipe: dict = {"model": {"path": path}, "inputs": {"batch_size": 1, "max_prompt_len": 128}}
    if sparse is not None:
        recipe["sparse"] = sparse
    f = tmp / f"{name}.yml"
    f.write_text(yaml.safe_dump(recipe))
    return plan_recipe(f, out=tmp / "unused")


def _static_eager(plan, model, batch) -> tuple[dict, tuple[str, ...]]:
    """The compiler's eager run of `plan` on `batch`: its outputs by name and the step outputs' names."""
    import torch

    from tokcompile.models import ReducedVLM

    vlm = ReducedVLM(model, plan.adapter, plan.geometry, plan.schedule, plan.reducers, plan.image_token_id).eval()
    with torch.no_grad():
        return vlm.run(batch), vlm.layout.step_outputs


def _survivors(kind: str, out: dict, steps: tuple[str, ...], n_image: int) -> Any:
    """Sample 0's result of the schedule: "cluster", every image token's centre (the last step's `cluster_j`);
    "kept", the image tokens left after each `kept_j` step (indices into the `n_image` entering the first)."""
    import torch

    if kind == "cluster":
        return out[steps[-1]][0]
    if kind == "assign":  # merges: every step's slot of each entering token
        return [out[name][0] for name in steps]
    idx, after = torch.arange(n_image), []
    for name in steps:
        idx = idx[out[name][0]]
        after.append(idx)
    return after


def _official_eager(cfg: Config, plan, model, batch, ours: tuple, hf, repeats: int) -> dict:
    """Times the official-style eager implementation (HF model plus hooks) and checks it against the compiler's
    eager run of the same plan: the same survivors (clusters or kept tokens), and the logit difference."""
    import torch

    from benchmarks.common import median_time

    hooks = cfg.official_eager(model, plan)
    try:
        logits = hf(batch)  # (1, V)
        kind, theirs = hooks.result()
        ms = 1e3 * median_time(hf, batch, repeats)
    finally:
        hooks.remove()
    out, steps = ours
    mine = _survivors(kind, out, steps, plan.schedule[0].n_in)
    pairs = [(mine, theirs)] if kind == "cluster" else list(zip(mine, theirs, strict=True))  # strict: same steps
    agree = sum(a.shape == b.shape and torch.equal(a, b) for a, b in pairs)
    diff = float((out["logits"].reshape(logits.shape) - logits).abs().max())
    count = {"cluster": lambda: int((theirs == torch.arange(len(theirs))).sum()),
             "kept": lambda: len(theirs[-1]), "assign": lambda: int(theirs[-1].max()) + 1}[kind]()
    return {"ms": ms, "same": agree == len(pairs), "steps_agreeing": f"{agree}/{len(pairs)}",
            "logit_diff": diff, "kind": kind, "count": count}


def _paired_ms(a: Callable, b: Callable, feed: Any, repeats: int) -> tuple[float, float]:
    """Median ms of `a(feed)` and `b(feed)` timed alternately, after one warm-up run of each."""
    a(feed), b(feed)
    times: tuple[list, list] = ([], [])
    for _ in range(repeats):
        for fn, out in ((a, times[0]), (b, times[1])):
            t = time.perf_counter()
            fn(feed)
            out.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times[0]), 1e3 * statistics.median(times[1])


def without_scores(plan):
    """`plan` with no step reporting decision scores: the same schedule and selections, no `score_j_c` outputs."""
    from dataclasses import replace

    return replace(plan, schedule=tuple(replace(s, scored=None) for s in plan.schedule))


def _unreported(cfg: Config, plan, model, feed, backend: str, runner: Callable, repeats: int, tmp: Path) -> dict:
    """The same plan exported without its decision scores (checked against eager like every chain), timed
    alternately with the reporting chain."""
    from benchmarks.common import export_chain

    plain = export_chain(without_scores(plan), model, feed, backend, tmp / f"{cfg.name}-{backend}-unreported")
    with_ms, without_ms = _paired_ms(runner, plain, feed, repeats)
    print(f"[{cfg.name}] {backend}: {with_ms:.0f} ms reporting decision scores, {without_ms:.0f} ms without "
          f"(x{with_ms / without_ms:.3f})", flush=True)
    return {"with_ms": with_ms, "without_ms": without_ms, "ratio": with_ms / without_ms}


def bench(size: str, configs: list[Config], backends: list[str], repeats: int, tmp: Path,
          unreported: bool = False) -> tuple[dict, list[dict]]:
    import numpy as np
    import torch

    from benchmarks.common import export_chain, median_time
    from tokcompile import flops
    from tokcompile.errors import ExportError, RecipeError
    from tokcompile.models.tiny import build_model, build_processor
    from tokcompile.parity import process
    from tokcompile.question import for_plan
    from tokcompile.reduce import REDUCERS
    from tokcompile.reduce.schedule import Output, decoder_image_tokens_in

    base_plan = _plan(size, None, tmp, "base")
    g = base_plan.geometry
    CLIP["text_encoder"] = f"tiny-random:clip@{g.vision_hidden_size}"
    model = build_model("llava", seed=0, size=size)
    processor = build_processor("llava", size)
    batch = process(processor, base_plan.adapter, g, base_plan.adapter.random_media(np.random.default_rng(0), 1, g),
                    [QUESTION])
    prompt_len = int(batch["input_ids"].shape[1])
    n_text = prompt_len - g.n_image_tokens

    def hf(feed):
        with torch.no_grad():
            return model(**feed).logits[:, -1]

    head = {"size": size, "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
            "n_layers": g.n_layers, "image_tokens": g.n_image_tokens, "prompt_len": prompt_len,
            "hf_full_ms": 1e3 * median_time(hf, batch, repeats)}
    print(f"[llava {size}] {head['params_m']}M params, {g.n_layers} decoder layers, {g.n_image_tokens} image tokens, "
          f"prompt {prompt_len}: hf_full {head['hf_full_ms']:.0f} ms", flush=True)
    rows = []
    for cfg in configs:
        label = cfg.label(g.n_layers)
        if cfg.method is not None and cfg.method not in REDUCERS:
            print(f"[{cfg.name}] skipped: reducer '{cfg.method}' is not registered in tokcompile.reduce", flush=True)
            continue
        try:
            plan = base_plan if cfg.method is None else _plan(size, cfg.sparse(g.n_layers), tmp, cfg.name)
        except RecipeError as e:
            print(f"[{cfg.name}] skipped at size {size}: {e}", flush=True)
            continue
        per_layer = plan.image_tokens_per_layer()
        feed = batch if plan.question is None else {**batch, **for_plan(plan)([QUESTION])}  # + question inputs
        ours = _static_eager(plan, model, feed)
        if plan.schedule and plan.schedule[-1].output is Output.CLUSTER:
            centre = ours[0][ours[1][-1]]  # (B, n)
            clusters = float((centre == torch.arange(centre.shape[1])).sum(-1).float().mean())
            label = f"{label} ({clusters:.0f} clusters in {plan.schedule[-1].n_out} slots)"
        row = {"name": cfg.name, "config": label, "sparse": cfg.sparse(g.n_layers),
               "image_tokens_to_decoder": decoder_image_tokens_in(g.n_image_tokens, plan.schedule, g.vision_tokens),
               "mean_image_tokens_per_layer": statistics.fmean(per_layer) if per_layer else float(g.n_image_tokens),
               "flops_ideal": 1 / flops.prefill_flops(g, plan.schedule, n_text)["total_exact"]["ratio"],
               "times_ms": {}, "speedup": {}}
        if cfg.official_eager is not None:
            row["official_eager"] = e = _official_eager(cfg, plan, model, batch, ours, hf, repeats)
            what = {"cluster": "clusters", "kept": "image tokens kept at the end",
                    "assign": "image tokens after the last merge"}[e["kind"]]
            print(f"[{cfg.name}] official-style eager: {e['ms']:.0f} ms, {e['count']} {what}; the compiler's "
                  f"eager chose the same in {e['steps_agreeing']} steps, logits within {e['logit_diff']:.1e}",
                  flush=True)
        for backend in backends:
            t0 = time.perf_counter()
            try:
                runner = export_chain(plan, model, feed, backend, tmp / f"{cfg.name}-{backend}")
            except (AssertionError, ExportError) as e:  # export failed or disagrees with eager: reported, not timed
                print(f"[{cfg.name}] {backend}: not timed, {e}", flush=True)
                row.setdefault("parity_failed", {})[backend] = str(e)
                continue
            export_s = time.perf_counter() - t0
            ms = 1e3 * median_time(runner, feed, repeats)
            row["times_ms"][backend], row["speedup"][backend] = ms, head["hf_full_ms"] / ms
            print(f"[{cfg.name}] {backend}: {ms:.0f} ms, {row['speedup'][backend]:.2f}x hf_full "
                  f"(exported and checked in {export_s:.0f}s)", flush=True)
            if unreported and any(s.scored for s in plan.schedule):
                row.setdefault("unreported", {})[backend] = _unreported(cfg, plan, model, feed, backend, runner,
                                                                        repeats, tmp)
            del runner
            gc.collect()
        rows.append(row)
    return head, rows


def table(head: dict, rows: list[dict], backends: list[str]) -> str:
    """One row per configuration: speedups over the eager HF model and over the same backend's export without
    reduction (which separates what the reduction buys from what the backend does), beside the FLOPs ideal."""
    cols = ["config", "image tokens to decoder", "mean image tokens / layer"]
    for b in backends:
        cols += [f"{b} ms", f"{b} vs HF (x)", f"{b} vs {b} unreduced (x)"]
    official = any("official_eager" in r for r in rows)
    if official:
        cols += ["official-style eager ms"] + [f"{b} vs official-style eager (x)" for b in backends]
    cols.append("FLOPs ideal (x)")
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    n = head["image_tokens"]
    base = next((r for r in rows if r["sparse"] is None), None)
    hf = ["hf_full (eager HF, no reduction)", str(n), f"{n:.1f}"]
    for _ in backends:
        hf += [f"{head['hf_full_ms']:.0f}", "1.00", ""]
    hf += [""] * (1 + len(backends)) if official else []
    lines.append("| " + " | ".join([*hf, "1.00"]) + " |")
    for r in rows:
        cells = [r["config"], str(r["image_tokens_to_decoder"]), f"{r['mean_image_tokens_per_layer']:.1f}"]
        for b in backends:
            if b not in r["times_ms"]:  # the export disagreed with eager
                cells += ["parity failed", "", ""]
                continue
            own = f"{base['times_ms'][b] / r['times_ms'][b]:.2f}" if base is not None and b in base["times_ms"] else ""
            cells += [f"{r['times_ms'][b]:.0f}", f"{r['speedup'][b]:.2f}", own]
        if official:
            e = r.get("official_eager")
            cells.append(f"{e['ms']:.0f}" if e else "" if r["sparse"] is None else "not covered")
            cells += [f"{e['ms'] / r['times_ms'][b]:.2f}" if e and b in r["times_ms"] else "" for b in backends]
        cells.append(f"{r['flops_ideal']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(c.name for c in CONFIGS),
                   help=f"configurations to run (default: all): {', '.join(c.name for c in CONFIGS)}")
    p.add_argument("--size", default="medium", help="built-in LLaVA size: medium (default) or tiny (smoke run)")
    p.add_argument("--backends", default="onnx")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per configuration (the median is reported)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--unreported", action="store_true",
                   help="also time each configuration that reports decision scores without them")
    args = p.parse_args()
    import torch

    torch.manual_seed(0)
    by_name = {c.name: c for c in CONFIGS + BUDGET_CONFIGS}
    names = [m for m in args.methods.split(",") if m]
    if names == ["budgets"]:  # every method at 64, 128 and 192 kept image tokens
        names = ["none"] + [c.name for c in BUDGET_CONFIGS]
    unknown = [m for m in names if m not in by_name]
    if unknown:
        sys.exit(f"error: --methods: unknown configuration {unknown[0]}; known: {', '.join(by_name)}")
    backends = [b for b in args.backends.split(",") if b]
    with tempfile.TemporaryDirectory() as d:
        head, rows = bench(args.size, [by_name[m] for m in names], backends, args.repeats, Path(d), args.unreported)
    print()
    print(f"Prefill (vision + prefill graphs) speedup over the eager HF full model: LLaVA {args.size} "
          f"({head['params_m']}M params, {head['n_layers']} decoder layers, {head['image_tokens']} image tokens, "
          f"prompt {head['prompt_len']}), batch 1, median of {args.repeats}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads:")
    print(table(head, rows, backends))
    if args.json:
        args.json.write_text(json.dumps({**head, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
