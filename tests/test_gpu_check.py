"""benchmarks/gpu.py, the one-command GPU check, in its CPU smoke mode (the tiny model, fp32 and bf16): every
variant runs, and the static FastV graphs agree with the independent reference on the device they ran on; its
export check compiles with --device and answers through the runtime there."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import ROOT


@pytest.fixture(scope="module")
def gpu_check():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu

    return gpu


def test_smoke_run_in_fp32_agrees_exactly(gpu_check, capsys):
    r = gpu_check.main(["--size", "tiny", "--device", "cpu", "--dtype", "float32", "--repeats", "1",
                        "--new-tokens", "3"])
    assert r["parity"]["kept_identical"] and r["parity"]["same_top1"]
    assert r["parity"]["max_abs_logit_diff"] < 1e-5
    assert set(r["variants"]) == {"hf", "lightcompress_fastv", "tokcompile_static"}
    assert all(v["ttft_s"] > 0 for v in r["variants"].values())
    assert r["variants"]["hf"]["decode_tok_s"] > 0 and r["variants"]["tokcompile_static"]["decode_tok_s"] > 0
    out = capsys.readouterr().out
    assert "| tokcompile_static |" in out and "parity on cpu: kept tokens identical" in out


def test_smoke_run_in_bf16_reports_near_ties_not_failures(gpu_check):
    r = gpu_check.main(["--size", "tiny", "--device", "cpu", "--dtype", "bfloat16", "--repeats", "1",
                        "--new-tokens", "2"])
    p = r["parity"]
    assert p["kept_identical"] or p["near_tie"] is not None
    assert p["same_top1"] and p["max_abs_logit_diff"] < 0.05


def test_the_7b_geometry_plans_with_576_image_tokens(gpu_check):
    plan = gpu_check.make_plan("llava7b", 2, 0.75, "bfloat16")
    g = plan.geometry
    assert (g.n_layers, g.hidden_size, g.n_heads, g.n_image_tokens) == (32, 4096, 32, 576)
    assert plan.schedule[0].n_out == 144


def test_the_export_check_compiles_on_the_device_and_answers_there(gpu_check, tmp_path):
    """`--exports` on the host (the eager and ONNX backends, to keep CI short): the compile with --device, then
    the runtime on that device, answer for answer against the host's."""
    r = gpu_check.export_check("cpu", tmp_path / "demo", only=("eager", "onnxruntime"))
    assert r["targets"] == ["eager", "onnx"] and r["same_answers"] == {"eager": True, "onnxruntime": True}
    manifest = (tmp_path / "demo" / "manifest.json").read_text()
    assert '"device": "cpu"' in manifest
