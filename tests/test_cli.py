"""The CLI's bad-input contract: one line naming the key or file and the fix, exit 2, no traceback,
no output directory. Plus --plan, the existing-export guard and the parity-failure path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tokcompile.cli import main

ROOT = Path(__file__).resolve().parents[1]

GOOD = {
    "model": {"path": "tiny-random:llava"},
    "quant": {"method": "RTN", "weight": {"bit": 4, "granularity": "per_group", "group_size": 32}},
    "sparse": {"method": "TokenReduction", "special": {"method": "FastV", "pruning_loc": 2, "rate": 0.5}},
    "export": {"targets": ["onnx"]},
}


def _write(tmp_path: Path, data: dict, name: str = "r.yml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _edit(path: tuple, value) -> dict:
    import copy

    data = copy.deepcopy(GOOD)
    node = data
    for k in path[:-1]:
        node = node.setdefault(k, {})
    node[path[-1]] = value
    return data


def _run_bad(tmp_path: Path, capsys, recipe: Path, *extra: str) -> str:
    out = tmp_path / "out"
    code = main([str(recipe), "--out", str(out), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if not ln.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    return lines[0]


@pytest.mark.parametrize(
    "data,expect",
    [
        (_edit(("model", "pathh"), "x"), ["model.pathh", "did you mean 'path'"]),
        (_edit(("quant", "weight", "bit"), "four"), ["quant.weight.bit", "integer"]),
        (_edit(("quant", "weight", "bit"), 9), ["quant.weight.bit", "2 to 8"]),
        (_edit(("sparse", "special", "rate"), 1.0), ["sparse.special.rate", "[0, 1)"]),
        (_edit(("sparse", "special", "rate"), 0.999), ["sparse.special.rate", "keeps 0"]),
        (_edit(("sparse", "special", "pruning_loc"), 40), ["sparse.special.pruning_loc", "1..3"]),
        (_edit(("sparse", "special", "pruning_lco"), 2), ["sparse.special.pruning_lco", "did you mean 'pruning_loc'"]),
        (_edit(("sparse", "special", "method"), "FastW"), ["sparse.special.method", "did you mean 'fastv'"]),
        (_edit(("model", "path"), "/nonexistent/llava-1.5-7b-hf"), ["model.path", "does not exist"]),
        (_edit(("model", "type"), "Qwen2VL"), ["model.type", "model_type 'llava'", "LlavaHf"]),
        (_edit(("quant", "weight", "group_size"), 48), ["quant.weight.group_size", "does not divide", "128"]),
        (_edit(("inputs", "image_size"), [64, 64]), ["inputs.image_size", "32x32"]),
        (_edit(("export", "targets"), ["onxx"]), ["export.targets", "did you mean 'onnx'"]),
        (_edit(("export", "weight_format"), "int3"), ["export.weight_format", "int4"]),
        ({**_edit(("export", "weight_format"), "int4"), "quant": None}, ["export.weight_format", "bit of 4"]),
        ({**_edit(("export", "weight_format"), "int4"), "export": {"targets": ["eager"], "weight_format": "int4"}},
         ["export.weight_format", "add onnx"]),
        ({**_edit(("export", "weight_format"), "int4"),
          "quant": {"method": "GPTQ", "weight": {"bit": 4, "granularity": "per_group", "group_size": 32},
                    "special": {"actorder": True, "static_groups": False}}},
         ["quant.special.static_groups", "static_groups: true"]),
        ({**GOOD, "quant": {"method": "GPTQ", "weight": {"bit": 4}, "calib": {"name": "pileval"}}},
         ["quant.calib.name", "synthetic, shapes, custom_mm, custom"]),
        ({**GOOD, "quant": {"method": "GPTQ", "weight": {"bit": 4}, "calib": {"name": "custom_mm"}}},
         ["quant.calib.path", "needs a folder"]),
    ],
)
def test_bad_recipe_values(tmp_path, capsys, data, expect):
    line = _run_bad(tmp_path, capsys, _write(tmp_path, data))
    for text in expect:
        assert text in line, line


def test_missing_yaml_file(tmp_path, capsys):
    line = _run_bad(tmp_path, capsys, tmp_path / "nope.yml")
    assert "nope.yml" in line and "does not exist" in line


def test_malformed_yaml(tmp_path, capsys):
    path = tmp_path / "bad.yml"
    path.write_text("model:\n  path: tiny-random:llava\n sparse: [\n")
    line = _run_bad(tmp_path, capsys, path)
    assert "bad.yml" in line and "line" in line


def test_pickled_weights_are_refused(tmp_path, capsys):
    d = tmp_path / "ckpt"
    d.mkdir()
    from tokcompile.models.tiny import build_config

    build_config("llava").save_pretrained(str(d))
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    line = _run_bad(tmp_path, capsys, _write(tmp_path, _edit(("model", "path"), str(d))))
    assert "model.path" in line and "safetensors" in line


def test_plan_prints_schedule_and_flops(tmp_path, capsys):
    code = main([str(ROOT / "recipes" / "demo.yml"), "--plan"])
    out = capsys.readouterr().out
    assert code == 0
    assert "L0:64 L1:64 L2:32 L3:32" in out and "kept        32 of 64" in out
    assert "fastv Eq.5" in out and "exact decoder" in out


def test_existing_export_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    code = main([str(_write(tmp_path, GOOD)), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "--force" in err and "save.save_path" in err
    assert (out / "manifest.json").read_text() == "{}"


def test_parity_failure_publishes_nothing(tmp_path, capsys, monkeypatch):
    """An artifact whose logits drift fails parity: exit 1, one line naming it, no directory left."""
    import torch

    from tokcompile.export import base as export_base
    from tokcompile.export.base import Artifact

    def perturbed(req):
        module = req.program.module()

        def loader(root, shared=None):
            def run(inputs):
                out = module(*[inputs[n] for n in req.input_names])
                if req.graph != "prefill":  # only the prefill's logits drift
                    return tuple(out)
                return (out[0] + 1e-2, *out[1:])

            return run

        (req.out_dir / f"{req.graph}.fake").write_text("x")
        return Artifact(target="onnx", graph=req.graph, files=[f"{req.graph}.fake"], backend="fake", loader=loader)

    monkeypatch.setitem(export_base.EXPORTERS._entries, "onnx", perturbed)
    out = tmp_path / "out"
    with torch.no_grad():
        code = main([str(_write(tmp_path, GOOD)), "--out", str(out), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err == [err[0]] and "parity failed for prefill.onnx" in err[0] and "logits differ" in err[0]
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_subprocess_error_has_no_traceback(tmp_path):
    recipe = _write(tmp_path, _edit(("quant", "weight", "bit"), 1))
    res = subprocess.run(
        [sys.executable, str(ROOT / "compile.py"), str(recipe), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "quant.weight.bit" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "o").exists()
