"""Recipe sweeps (`python -m tokcompile sweep`): the points a sweep file expands to, their ids, errors that
name the key, and a small sweep on a local Ray cluster: compiled points, a failing point as one line, and a
re-run that skips what is published."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT
from tokcompile.errors import RecipeError
from tokcompile.sweep import load_sweep, point_id, point_resources


def _sweep(tmp_path, **data) -> str:
    path = tmp_path / "sweep.yml"
    path.write_text(yaml.safe_dump({"base": str(ROOT / "recipes/tiny/fastv.yml"), "out": str(tmp_path / "out"),
                                    **data}))
    return str(path)


def test_points_are_the_grid_crossed_with_the_point_list(tmp_path):
    sweep = load_sweep(_sweep(tmp_path, points=[{"sparse.special.rate": 0.5}, {"sparse.special": {
        "method": "DART", "pruning_loc": 2, "reduction_ratio": 0.75}}], grid={"quant.weight.bit": [4, 8]},
        targets=["onnx"]))
    assert len(sweep.points) == 4
    first = sweep.points[0].recipe
    assert first["sparse"]["special"] == {"method": "FastV", "pruning_loc": 2, "rate": 0.5}
    assert first["quant"]["weight"]["bit"] == 4 and first["export"]["targets"] == ["onnx"]
    assert "save_path" not in first.get("save", {})
    assert sweep.points[2].recipe["sparse"]["special"]["method"] == "DART"  # a mapping replaces the subtree
    assert len({p.id for p in sweep.points}) == 4 and sweep.points[0].id == point_id(first)
    again = load_sweep(_sweep(tmp_path, points=[{"sparse.special.rate": 0.5}], grid={"quant.weight.bit": [4]},
                              targets=["onnx"]))
    assert again.points[0].id == sweep.points[0].id  # the same resolved recipe, the same id


@pytest.mark.parametrize("data, key", [
    ({"grid": {"sparse.special.rate": []}}, "grid"),
    ({"points": [1]}, "points"),
    ({"grids": {}}, "grids"),
    ({"grid": {"model.path.deeper": [1]}}, "points/grid: model.path.deeper"),
    ({"resources": {"memory": 1}}, "resources"),
])
def test_errors_name_the_key(tmp_path, data, key):
    with pytest.raises(RecipeError) as e:
        load_sweep(_sweep(tmp_path, **data))
    assert e.value.key == key


def test_a_sweep_on_a_local_ray_cluster(tmp_path):
    sweep = _sweep(tmp_path, points=[{"sparse.special.rate": 0.5}, {"sparse.special.rate": 1.5},
                                     {"sparse.special": {"method": "DART", "pruning_loc": 2, "reduction_ratio": 0.75}}],
                   targets=["onnx"], resources={"num_cpus": 1})
    cmd = [sys.executable, "-m", "tokcompile", "sweep", sweep]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 1, res.stderr + res.stdout  # one point fails
    assert "3 points, 3 to compile" in res.stdout and "done: 3 points, 1 failed" in res.stdout
    rows = json.loads((tmp_path / "out" / "sweep.json").read_text())["points"]
    assert [r["status"] for r in rows] == ["compiled", "failed", "compiled"]
    assert "sparse.special.rate" in rows[1]["error"] and "\n" not in rows[1]["error"]
    assert rows[0]["flops_ratio"] < 1 and rows[2]["mean_image_tokens"] < 64 and rows[0]["parity"] is True
    assert (tmp_path / "out" / "points" / rows[0]["id"] / "manifest.json").is_file()
    table = (tmp_path / "out" / "sweep.md").read_text()
    assert table.count("| compiled |") == 2 and "failed:" in table
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert "3 points, 1 to compile, 2 already published" in res.stdout
    rows = json.loads((tmp_path / "out" / "sweep.json").read_text())["points"]
    assert [r["status"] for r in rows] == ["skipped (published)", "failed", "skipped (published)"]
    assert rows[0]["flops_ratio"] < 1  # a skipped point still reports its export's figures


def test_the_example_sweep_expands():
    sweep = load_sweep(ROOT / "sweeps" / "tiny_budgets.yml")
    methods = [p.recipe["sparse"]["special"]["method"] for p in sweep.points]
    assert methods == ["FastV", "FastV", "DART", "DART", "RandomPrune", "RandomPrune", "DivPrune", "DivPrune"]
    assert all(p.recipe["export"]["targets"] == ["onnx"] for p in sweep.points)


def test_a_point_asks_for_what_its_recipe_needs(tmp_path):
    sweep = load_sweep(_sweep(tmp_path, points=[{"export.targets": ["onnx"]}, {"export.targets": ["onnx", "tensorrt"]},
                                                {"parity.device": "cuda:1"}],
                              resources={"num_cpus": 2}))
    assert [point_resources(p, sweep.resources) for p in sweep.points] == [
        {"num_cpus": 2.0, "num_gpus": 0}, {"num_cpus": 2.0, "num_gpus": 1}, {"num_cpus": 2.0, "num_gpus": 1}]
