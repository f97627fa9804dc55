"""The budget autotuner (`python -m tokcompile tune`): the budget filter, successive halving on the KL proxy, the
finalist compiled through the sweep engine, and the winning recipe."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
import yaml

from tests.conftest import ROOT, make_batch
from tokcompile.errors import RecipeError
from tokcompile.generation import Generated
from tokcompile.graphs import build_modules
from tokcompile.pipeline import plan_recipe
from tokcompile.tune import answer_drift, load_tune, rungs, unreduced_answers
from tokcompile.vtw_search import kl_withdrawn_to_full


def _tune(tmp_path, **data) -> str:
    path = tmp_path / "tune.yml"
    path.write_text(yaml.safe_dump({"base": str(ROOT / "recipes/tiny/fastv.yml"), "out": str(tmp_path / "out"),
                                    "targets": ["onnx"], **data}))
    return str(path)


def test_rungs_halve_down_to_the_finalists():
    assert rungs(5, 8, 2, 1) == [1, 2, 4, 8]
    assert rungs(9, 9, 3, 1) == [1, 3, 9]
    assert rungs(2, 8, 2, 2) == [8]


@pytest.mark.parametrize("data, key", [
    ({"budget": {"ttft_ms": -5}, "candidates": [{"method": "FastV"}]}, "budget"),
    ({"budget": {"latency": 5}, "candidates": [{"method": "FastV"}]}, "budget"),
    ({"budget": {}, "candidates": [{"method": "FastV"}]}, "budget"),
    ({"budget": {"flops_ratio": 0.5, "backend": "aoti"}, "candidates": [{"method": "FastV"}]}, "budget.backend"),
    ({"budget": {"ttft_ms": 50, "backend": "tflite"}, "candidates": [{"method": "FastV"}]}, "budget.backend"),
    ({"budget": {"flops_ratio": "0.5"}, "candidates": [{"method": "FastV"}]}, "budget"),
    ({"budget": {"flops_ratio": 0.5}}, "candidates"),
    ({"budget": {"flops_ratio": 0.5}, "candidates": [{"method": "FastV", "grid": {"rate": []}}]},
     "candidates[0].grid"),
    ({"budget": {"flops_ratio": 0.5}, "candidates": [{"method": "FastV"}], "search": {"eta": 1}}, "search"),
    ({"budget": {"flops_ratio": 0.5}, "candidates": [{"method": "FastV"}], "seach": {}}, "seach"),
    ({"budget": {"flops_ratio": 0.5}, "candidates": [{"method": "FastV"}], "search": {"sample": 4}}, "search"),
    ({"budget": {"flops_ratio": 0.5}, "candidates": [{"method": "FastV"}], "search": {"answer_tokens": 0}}, "search"),
    ({"budget": {"flops_ratio": 0.5}, "candidates": [{"method": "FastV"}], "search": {"answer_tokens": True}},
     "search"),
    ({"budget": {"flops_ratio": 0.5}, "candidates": [{"method": "FastV"}], "search": {"answer_tokens": 10**9}},
     "search.answer_tokens"),
    ({"budget": {"flops_ratio": 0.5}, "candidates": [{"method": "FastV"}], "calib": {"name": "pileval"}}, "calib"),
    ({"budget": {"flops_ratio": 0.5}, "candidates": [{"method": "FastV"}], "calib": {"name": "custom"}}, "calib.path"),
])
def test_errors_name_the_key(tmp_path, data, key):
    with pytest.raises(RecipeError) as e:
        load_tune(_tune(tmp_path, **data))
    assert e.value.key == key


def test_the_tuner_picks_the_least_drift_within_budget(tmp_path):
    """RandomPrune with prune_ratio 0 keeps every token: its KL is 0, so within a budget that admits it, it must
    win. SparseVLM's scoring makes its ratio on the tiny model 1.015: over the budget of 1.0, never scored. A
    candidate that does not plan is one line in the report."""
    candidates = [{"method": "FastV", "grid": {"pruning_loc": [2], "rate": [0.5, 0.75]}},
                  {"method": "DART", "grid": {"pruning_loc": [2], "reduction_ratio": [0.75]}},
                  {"method": "DivPrune", "grid": {"reduction_ratio": [0.5]}},
                  {"method": "RandomPrune", "grid": {"pruning_loc": [3], "prune_ratio": [0.0]}},
                  {"method": "SparseVLM", "grid": {"pruning_loc": [[0, 2]], "stage_tokens": [[0.5, 12]]}},
                  {"method": "FastV", "grid": {"pruning_loc": [9]}}]
    res = subprocess.run([sys.executable, "-m", "tokcompile", "tune", _tune(
        tmp_path, budget={"flops_ratio": 1.0, "ttft_ms": 600000}, candidates=candidates,
        search={"samples": 4, "eta": 2, "ttft_repeats": 2}), "--serial"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr + res.stdout
    doc = json.loads((tmp_path / "out" / "tune.json").read_text())
    rows = doc["candidates"]
    assert len(rows) == 7 and "pruning_loc" in rows[6]["error"] and not rows[6]["rungs"]
    assert rows[5]["flops_ratio"] > 1.0 and not rows[5]["in_budget"] and not rows[5]["rungs"]
    scored = [r for r in rows if r["rungs"]]
    assert len(scored) == 5 and all(r["in_budget"] for r in scored)
    prompts = sorted({x["prompts"] for r in scored for x in r["rungs"]})
    assert prompts == [1, 2, 4]  # rungs on 1, 1, 2 and 4 prompts: 5 candidates -> 3 -> 2 -> 1 finalist
    assert doc["best"] == {"method": "RandomPrune", "pruning_loc": 3, "prune_ratio": 0.0}
    final = [r for r in rows if "final" in r]
    assert len(final) == 1 and final[0]["final"]["status"] == "compiled" and final[0]["params"] == doc["best"]
    assert final[0]["rungs"][-1]["kl"] < 1e-6 and final[0]["rungs"][-1]["top1_agreement"] == 1.0
    assert 0 < final[0]["final"]["ttft_ms"] < 600000 and final[0]["final"]["ttft_backend"] == "onnxruntime"
    assert "ttft_ms <= 600000" in (tmp_path / "out" / "tune.md").read_text()
    assert all(r["rungs"][0]["kl"] > 1e-6 for r in scored if r is not final[0])  # the others do drift
    best = yaml.safe_load((tmp_path / "out" / "best.yml").read_text())
    assert best["sparse"]["special"] == doc["best"]
    assert (tmp_path / "out" / "points" / final[0]["final"]["id"] / "manifest.json").is_file()
    assert (tmp_path / "out" / "tune.md").read_text().count("| `") == 7


def test_the_example_tune_file_expands():
    spec = load_tune(ROOT / "sweeps" / "tiny_tune.yml")
    assert len(spec["candidates"]) == 6 + 4 + 2 + 2 and spec["budget"] == {"flops_ratio": 0.92}
    assert spec["candidates"][0]["recipe"]["sparse"] == {"special": {"method": "FastV", "pruning_loc": 1,
                                                                     "rate": 0.5}}


def test_finalists_above_the_ttft_budget_cannot_win(tmp_path):
    """Measured times decide: the finalists over budget drop out in order; none within is one line naming the key."""
    from tokcompile.tune import _within_ttft

    spec = {"out": tmp_path, "budget": {"ttft_ms": 100.0}, "search": {"ttft_repeats": 1}}
    finalists = [{"params": {"n": i}, "recipe": {"export": {"targets": ["aoti", "onnx"]}}, "final": {"id": f"p{i}"}}
                 for i in range(3)]
    measured = {"p0": 180.0, "p1": 95.0, "p2": 40.0}
    seen = []

    def measure(export, backend, repeats):
        seen.append((export.name, backend, repeats))
        return measured[export.name]

    within = _within_ttft(spec, finalists, lambda m: None, measure)
    assert [r["final"]["id"] for r in within] == ["p1", "p2"]  # the best-ranked finalist is over budget
    assert seen == [("p0", "aoti", 1), ("p1", "aoti", 1), ("p2", "aoti", 1)]
    spec["budget"]["ttft_ms"] = 10.0
    with pytest.raises(RecipeError) as e:
        _within_ttft(spec, finalists, lambda m: None, measure)
    assert e.value.key == "budget.ttft_ms" and "180.0 ms, 95.0 ms, 40.0 ms" in str(e.value)
    spec["budget"].update(ttft_ms=100.0, backend="onnxruntime")  # a named backend wins over the targets
    seen.clear()
    _within_ttft(spec, finalists, lambda m: None, measure)
    assert {b for _, b, _ in seen} == {"onnxruntime"}

    def missing(export, backend, repeats):
        raise RecipeError(str(export), "has no onnx graphs")

    with pytest.raises(RecipeError) as e:
        _within_ttft(spec, finalists, lambda m: None, missing)
    assert e.value.key == "budget.backend" and "add its target to targets" in str(e.value)


def test_the_proxy_follows_the_unreduced_answer(tiny_model, processor):
    """The proxy compares the reduced model with the unreduced one at every position of the unreduced greedy
    answer, teacher-forced through the reduced model's own cache: the unreduced model against itself drifts by
    nothing (the positions line up), the first position is the whole reduced model's first-token KL, and the
    later positions count."""
    plan = plan_recipe(ROOT / "recipes/tiny/fastv.yml")
    full = dataclasses.replace(plan, schedule=(), reducers=())
    batches = [make_batch(processor, [q], seed=i) for i, q in enumerate(["What is shown here?", "Describe it."])]
    answers = unreduced_answers(full, tiny_model, batches, 4)
    assert [tuple(a.tokens.shape) for a in answers] == [(1, 4), (1, 4)]
    assert all(len(a.step_logits) == 4 for a in answers)
    kl, top1 = answer_drift(full, tiny_model, batches, answers)
    assert kl < 1e-6 and top1 == 1.0
    firsts = [Generated(a.tokens[:, :1], [1], a.step_logits[:1]) for a in answers]
    kl_first, _ = answer_drift(plan, tiny_model, batches, firsts)
    reduced, full_model = build_modules(plan, tiny_model)[0], build_modules(full, tiny_model)[0]
    with torch.no_grad():
        direct = torch.cat([kl_withdrawn_to_full(reduced.run(dict(b))["logits"], full_model.run(dict(b))["logits"])
                            for b in batches]).double().mean()
    assert kl_first == pytest.approx(float(direct), rel=1e-4) and kl_first > 1e-6
    kl_all, top1_all = answer_drift(plan, tiny_model, batches, answers)
    assert kl_all != pytest.approx(kl_first, rel=1e-3) and 0.0 <= top1_all <= 1.0


def test_proxy_accuracy_benchmark_runs_and_ranks():
    """`benchmarks/proxy_accuracy.py` on two points of the shapes sweep (a smoke run: its figures are in the
    README), and its rank correlation on lists with a known answer."""
    from benchmarks.proxy_accuracy import spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2], [5, 5, 9]) == pytest.approx(1.0)  # ties share their rank
    res = subprocess.run([sys.executable, "benchmarks/proxy_accuracy.py", "--prompts", "2", "--questions", "8",
                          "--limit", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr + res.stdout
    assert "Spearman correlation with accuracy over 2 points" in res.stdout
    assert res.stdout.count('{"method":') == 2


def test_a_bad_calib_folder_names_the_tune_key(tmp_path):
    """The proxy's prompts come from the tune file's calib where it gives one, so its errors name that key."""
    (tmp_path / "calib").mkdir()
    res = subprocess.run([sys.executable, "-m", "tokcompile", "tune", _tune(
        tmp_path, budget={"flops_ratio": 1.0}, candidates=[{"method": "FastV", "grid": {"rate": [0.5]}}],
        calib={"name": "custom_mm", "path": "calib"}), "--serial"], cwd=ROOT, capture_output=True, text=True,
        timeout=300)
    assert res.returncode == 2, res.stderr + res.stdout
    assert res.stderr.startswith("error: calib.path: ") and "Traceback" not in res.stderr, res.stderr
