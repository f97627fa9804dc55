"""`python -m tokcompile vtw-search recipe.yml`: VTW's withdrawal layer K, chosen by its KL criterion.

VTW (lzhxmu/VTW, `--findk`) picks K offline: for every candidate K' from 5 to L-1 it prefills each calibration
prompt with every image token withdrawn before layer K' and compares the next-token distribution at the last
position with the full model's, D(K') = mean over samples of KL(P_withdrawn || P_full). K is the first K' with
D(K') <= eta. The official code sets eta by checkpoint: 0.003 for LLaVA-1.5-7B (and any model it does not
know), 0.0005 for LLaVA-1.5-13B, 0.0001 for LLaVA-1.6-Vicuna-7B.

Here the prompts are the recipe's calibration data (`quant.calib`; synthetic images and questions when the
recipe has no `quant` section), the model is the one the recipe loads (unquantized, as the official search runs
it), eta is the recipe's VTW `eta` (default 0.003), and the withdrawal runs through the same eager graphs the
compile traces, batched (each sample's own image span; the last real token's logits).

Differences from the official search:
- Candidates start at layer 5 as in the official loop, or at 1 for a model with 5 layers or fewer (the tiny
  models), where the official loop has no candidate at all; `--start` sets it.
- Where no candidate reaches eta, the official code fails on an empty index; here it is one line naming the
  smallest D(K') found.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from tokcompile.errors import RecipeError

DEFAULT_ETA = 0.003  # the official default (its LLaVA-1.5-7B value)
OFFICIAL_START = 5  # the official loop's first candidate layer


@dataclass(frozen=True)
class SearchResult:
    layers: list[int]  # the candidates K', ascending
    kl: list[float]  # D(K') per candidate: mean over samples of KL(P_withdrawn || P_full)
    eta: float
    samples: int
    chosen: int | None  # the first K' with D(K') <= eta, or None


def kl_withdrawn_to_full(withdrawn: Tensor, full: Tensor) -> Tensor:
    """(B, V) next-token logits with and without the withdrawal -> (B,) KL(P_withdrawn || P_full), in fp32 (the
    official `KLDivLoss(reduction='batchmean')(log_softmax(full), softmax(withdrawn))`, per sample)."""
    log_w = withdrawn.float().log_softmax(-1)  # (B, V)
    log_f = full.float().log_softmax(-1)  # (B, V)
    return (log_w.exp() * (log_w - log_f)).sum(-1)  # (B,)


def choose_layer(layers: list[int], kl: list[float], eta: float) -> int | None:
    """The first candidate whose mean KL is at most eta."""
    return next((k for k, d in zip(layers, kl) if d <= eta), None)


def candidate_layers(n_layers: int, start: int | None) -> list[int]:
    if start is None:
        start = OFFICIAL_START if n_layers > OFFICIAL_START else 1
    if not 1 <= start <= n_layers - 1:
        raise RecipeError("--start", f"{start} is outside 1..{n_layers - 1} for this model's {n_layers} decoder layers")
    return list(range(start, n_layers))


def _vtw_config(plan, key: str):
    from tokcompile.reduce.vtw import VTWConfig

    if len(plan.reducers) != 1 or not isinstance(plan.reducers[0], VTWConfig):
        methods = ", ".join(type(r).method for r in plan.reducers) or "none"
        raise RecipeError(key, f"vtw-search needs a recipe whose only token reduction is VTW (it has: {methods}); "
                               "write sparse: {special: {method: VTW, pruning_loc: <any layer>}}")
    return plan.reducers[0]


def search(recipe_path: str | Path, eta: float | None = None, start: int | None = None,
           samples: int | None = None, trust_remote_code: bool = False,
           log: Callable[[str], None] = print) -> SearchResult:
    """D(K') for every candidate K' on the recipe's calibration prompts, and the K it picks."""
    from tokcompile.graphs import build_modules
    from tokcompile.models.loading import load_model, load_processor
    from tokcompile.plan import resolve
    from tokcompile.quant.calib import calibration_batches
    from tokcompile.recipe import CalibConfig, load_recipe

    recipe = load_recipe(recipe_path)
    recipe = dataclasses.replace(recipe, eval=None)  # the search answers no questions
    plan = resolve(recipe, trust_remote_code=trust_remote_code)
    vtw = _vtw_config(plan, "sparse.special.method")
    if eta is None:
        eta = vtw.eta if vtw.eta is not None else DEFAULT_ETA
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta > 0:
        raise RecipeError("sparse.special.eta", f"got {eta!r}; use a KL threshold above 0 (official: 0.003)")
    layers = candidate_layers(plan.geometry.n_layers, start)
    calib = recipe.quant.calib if recipe.quant is not None else CalibConfig()
    if samples is not None:
        if samples < 1:
            raise RecipeError("--samples", f"got {samples}; use at least 1")
        calib = dataclasses.replace(calib, n_samples=samples)

    log(f"vtw-search: {calib.n_samples} {calib.name} prompt(s), candidates K = {layers[0]}..{layers[-1]}, "
        f"eta {eta:g}")
    processor = load_processor(recipe.model.path, recipe.model.trust_remote_code)
    model = load_model(recipe.model.path, plan.config, recipe.base.seed, recipe.model.trust_remote_code)
    batches = calibration_batches(calib, processor, plan.adapter, plan.geometry, recipe.base.seed, plan.batch_size)
    full_model, _ = build_modules(dataclasses.replace(plan, schedule=(), reducers=()), model)
    withdrawn_at = {k: build_modules(dataclasses.replace(
        plan, schedule=(dataclasses.replace(plan.schedule[0], layer=k),), reducers=(vtw,)), model)[0]
        for k in layers}
    totals = torch.zeros(len(layers), dtype=torch.float64)  # sum over samples of KL, per candidate
    n = 0
    with torch.no_grad():
        for i, batch in enumerate(batches):
            full = full_model.run(dict(batch))["logits"]  # (B, V) at each sample's last real token
            for j, k in enumerate(layers):
                totals[j] += kl_withdrawn_to_full(withdrawn_at[k].run(dict(batch))["logits"], full).double().sum()
            n += full.shape[0]
            log(f"  batch {i + 1}/{len(batches)}: {n} prompt(s)")
    kl = (totals / n).tolist()
    return SearchResult(layers, kl, float(eta), n, choose_layer(layers, kl, float(eta)))


def format_result(r: SearchResult) -> str:
    lines = ["  K   mean KL(withdrawn || full)"]
    lines += [f"  {k:<3} {d:.6g}{'   <- first at or below eta' if k == r.chosen else ''}"
              for k, d in zip(r.layers, r.kl)]
    return "\n".join(lines)


def require_choice(r: SearchResult) -> int:
    if r.chosen is None:
        best = min(range(len(r.layers)), key=lambda i: r.kl[i])
        raise RecipeError("sparse.special.eta", f"no candidate layer brings the mean KL to {r.eta:g} or below (the "
                                                f"smallest is {r.kl[best]:.6g}, at layer {r.layers[best]}); raise eta "
                                                "(--eta) to accept more drift")
    return r.chosen
