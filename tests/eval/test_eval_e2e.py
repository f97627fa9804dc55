"""The eval section end to end on the tiny random LLaVA (recipes/tiny/eval.yml): every position, an export that
answers as its eager twin on every backend it holds, nothing pruned answering as pretrain, and the report over
exports. Random weights answer noise: these tests check the mechanics, not an accuracy."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import ROOT, compile_recipe
from tokcompile.data import shapes

RECIPE = ROOT / "recipes" / "tiny" / "eval.yml"
N = 64


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "export"
    res = compile_recipe(RECIPE, out, "--targets", "onnx,eager")
    assert res.returncode == 0, res.stderr + res.stdout
    assert "[eval]" in res.stdout and f"exported on shapes: {N}/{N} answered" in res.stdout
    return out


@pytest.fixture(scope="module")
def results(export) -> dict:
    return json.loads((export / "eval.json").read_text())["datasets"]["shapes"]


def test_manifest_points_to_the_results(export, results):
    m = json.loads((export / "manifest.json").read_text())
    assert m["eval"]["json"] == "eval.json" and m["eval"]["markdown"] == "eval.md"
    assert m["eval"]["accuracy"]["shapes"]["exported"] == results["positions"]["exported"]["accuracy"]
    table = (export / "eval.md").read_text()
    assert "| position | accuracy |" in table and "| exported |" in table
    assert list(results["positions"]) == ["pretrain", "fake_quant", "transformed", "exported"]
    assert set(results["positions"]["pretrain"]["per_type"]) == set(shapes.QUESTION_TYPES)


def test_positions_are_scored_against_pretrain(results):
    pos = results["positions"]
    assert pos["pretrain"]["agreement_with_pretrain"] == 1.0 and pos["pretrain"]["kl_first_token_vs_pretrain"] == 0
    # 4-bit weights and then FastV each move the first token's distribution away from the uncompressed model's
    assert 0 < pos["fake_quant"]["kl_first_token_vs_pretrain"] < pos["transformed"]["kl_first_token_vs_pretrain"]
    rows = results["answers"]
    assert len(rows) == N and all(set(r) >= {"id", "question", "answers", "pretrain", "exported"} for r in rows)
    agree = sum(r["transformed"].strip() == r["pretrain"].strip() for r in rows) / N
    assert pos["transformed"]["agreement_with_pretrain"] == pytest.approx(agree)


def test_exported_answers_as_transformed_answer_for_answer(results):
    rows = results["answers"]
    assert [r["exported"] for r in rows] == [r["transformed"] for r in rows]
    pos = results["positions"]
    assert pos["exported"]["kl_first_token_vs_pretrain"] == pytest.approx(
        pos["transformed"]["kl_first_token_vs_pretrain"], rel=1e-3, abs=1e-6)


def test_the_exported_programs_answer_as_transformed(export, results):
    from tokcompile.runtime import load

    data = shapes.samples("test", 24)
    got = load(export, "eager", trust_export=True).generate(
        [s.image for s in data], [s.question for s in data], max_new_tokens=8)
    assert got.texts == [r["transformed"] for r in results["answers"][:24]]


def test_nothing_pruned_answers_as_pretrain(tmp_path):
    """A reduction that keeps every image token (FastV R=0), no quantization: `transformed` runs the reduced
    model's gathers, yet answers exactly as `pretrain`, with the same first-token distribution."""
    from tokcompile.eval.run import Evaluation
    from tokcompile.models.loading import load_model, load_processor
    from tokcompile.pipeline import plan_recipe

    data = yaml.safe_load(RECIPE.read_text())
    data.pop("quant")
    data["sparse"]["special"]["rate"] = 0.0
    data["eval"].update(eval_pos=["pretrain", "transformed"], num_samples=32)
    path = tmp_path / "keep_all.yml"
    path.write_text(yaml.safe_dump(data))
    plan = plan_recipe(path, out=tmp_path / "unused")
    assert plan.schedule and plan.schedule[0].n_out == plan.schedule[0].n_in  # a step that keeps every token
    model = load_model(plan.recipe.model.path, plan.config, 0, False)
    processor = load_processor(plan.recipe.model.path, False)
    ev = Evaluation(plan.recipe.eval, lambda _: None)
    ev.eager("pretrain", plan, model, processor, reduce=False)
    ev.eager("transformed", plan, model, processor, reduce=True)
    pre, tra = ev.answers["shapes"]["pretrain"], ev.answers["shapes"]["transformed"]
    assert pre.texts == tra.texts
    torch.testing.assert_close(tra.first_logits, pre.first_logits, atol=1e-5, rtol=1e-5)


def test_report_gathers_exports_into_tables_and_plots(export, results, tmp_path):
    """Two exports: the real one, and a copy relabelled as another method at another budget (the report's
    grouping and plots are under test here, not the copy's figures)."""
    other = tmp_path / "other"
    shutil.copytree(export, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["name"], manifest["schedule"][0]["method"] = "relabelled", "othermethod"
    (other / "manifest.json").write_text(json.dumps(manifest))
    flops = json.loads((other / "flops.json").read_text())
    flops["total_exact"]["ratio"] = 0.5
    (other / "flops.json").write_text(json.dumps(flops))
    out = tmp_path / "report"
    res = subprocess.run([sys.executable, "-m", "tokcompile", "report", str(export), str(other), "--out",
                          str(out), "--measure", "2"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "report.json").read_text())
    rows = {r["export"]: r for r in report["rows"]}
    real = rows[json.loads((export / "manifest.json").read_text())["name"]]
    assert real["method"] == "fastv" and real["position"] == "exported" and real["image_tokens"] == "64 to 32"
    assert real["accuracy"]["shapes"] == results["positions"]["exported"]["accuracy"]
    assert real["per_type"] == results["positions"]["exported"]["per_type"]
    assert real["agreement"] == results["positions"]["exported"]["agreement_with_pretrain"]
    assert real["setting"] == "pruning_loc=2, rate=0.5"  # recipes/tiny/eval.yml's FastV
    assert real["ttft_ms"] > 0 and rows["relabelled"]["flops_ratio"] == 0.5
    assert sorted(report["plots"]) == ["accuracy_vs_flops.png", "accuracy_vs_ttft.png"]
    for png in report["plots"]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    other_row = next(line for line in md.splitlines() if line.startswith("| othermethod | "))
    assert other_row.endswith(" | relabelled |") and " | 0.500 | " in other_row
    assert "| agreement with pretrain | color | count | presence | side |" in md
    assert "<table" in (out / "report.html").read_text()
    missing = subprocess.run([sys.executable, "-m", "tokcompile", "report", str(tmp_path), "--out", str(out)],
                             capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert missing.returncode == 2 and "manifest.json" in missing.stderr and "Traceback" not in missing.stderr
