"""Nothing in the graphs assumes host tensors: every registered reducer on every family's tiny model runs its
vision, prefill and one decode step with the model on PyTorch's `meta` device, fed from the host.

A meta tensor has a device and no data, and PyTorch refuses to mix it with host tensors just as it refuses to
mix CUDA and host tensors. A constant built on the host inside a graph (`torch.arange(n)` without `device=`, a
numpy table) fails here as it would on a GPU, and so does a feed the runners forget to move. The cases are the
contract test's (`test_contract.py`) that the plan accepts (it checks the refusals).

Some eager-only code reads values (transformers' mask helpers choosing a faster path, TRIM's warning about its
slots), which a meta tensor cannot give; while exporting it does not. The test takes the exporting path, the one
the graphs are traced through.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.reduce.test_contract import CASES, _recipe, family_models  # noqa: F401  (a fixture)
from tokcompile.errors import RecipeError
from tokcompile.generation import run_prompt
from tokcompile.graphs import build_modules, decode_feed, eager_runners
from tokcompile.models import tiny
from tokcompile.parity import make_inputs
from tokcompile.plan import resolve
from tokcompile.question import for_plan
from tokcompile.recipe import load_recipe_dict

META = torch.device("meta")


def _plan(method: str, case: str):
    try:
        return resolve(load_recipe_dict(_recipe(method, case), f"{method}-{case}"))
    except RecipeError:
        return None


PLANNED = [(m, c) for m, c in CASES if _plan(m, c) is not None]


def test_most_cases_plan():
    assert len(PLANNED) >= 70  # 73 of 112 today; a change that refuses many more shows here


@pytest.mark.parametrize(("method", "case"), PLANNED, ids=[f"{m}-{c}" for m, c in PLANNED])
def test_graphs_run_on_another_device(method, case, family_models, monkeypatch):  # noqa: F811
    import transformers.masking_utils

    monkeypatch.setattr(transformers.masking_utils, "is_torchdynamo_exporting", lambda: True)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    data = _recipe(method, case)
    plan = _plan(method, case)
    model, processor = family_models(tiny.tiny_family(data["model"]["path"]))
    batch = make_inputs(processor, plan.adapter, plan.geometry, 2, 1, seed=3, max_len=10_000,
                        question=for_plan(plan))[0].batch  # on the host
    reduced, decode = build_modules(plan, copy.deepcopy(model).to(META))  # a step's own weights follow the model
    vision, prefill, decode_run = eager_runners(reduced, decode)
    layout = reduced.layout
    out = run_prompt(vision, prefill, layout, batch)
    g = plan.geometry
    assert out["logits"].device == META and tuple(out["logits"].shape) == (2, g.vocab_size)
    past = {f"past_{n[len('present_'):]}": out[n] for n in layout.present}
    token = torch.zeros(2, dtype=torch.long)  # a generated token, still on the host
    step = decode_run({**decode_feed(layout, out, token, 0), **past})
    assert step["logits"].device == META and tuple(step["logits"].shape) == (2, g.vocab_size)
    assert all(step[n].device == META for n in layout.present)
