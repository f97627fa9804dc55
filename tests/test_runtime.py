"""The runtime and `python -m tokcompile generate` on the demo export: every backend answers the same,
and broken exports or inputs get one clear line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT
from tokcompile.errors import RecipeError
from tokcompile.runtime import load


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(5)
    paths = []
    for i, (h, w) in enumerate([(40, 60), (90, 70)]):
        p = d / f"img{i}.png"
        Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).save(p)
        paths.append(str(p))
    return paths


def test_backends_agree_and_batching_changes_nothing(demo_export, image_files):
    prompts = ["What is in this image?", "Describe everything you see, in detail."]
    answers = {}
    for backend in ("onnxruntime", "aoti", "eager"):
        gen = load(demo_export, backend, trust_export=True)
        answers[backend] = gen.generate(image_files, prompts, max_new_tokens=16, stop_at_eos=False)
    ref = answers["eager"]
    assert all(len(ids) == 16 for ids in ref.token_ids)
    for backend, ans in answers.items():
        assert ans.token_ids == ref.token_ids and ans.kept == ref.kept, backend
    # each sample alone gives what it gave in the padded batch of 2
    gen = load(demo_export, "onnxruntime")
    for i in range(2):
        alone = gen.generate([image_files[i]], [prompts[i]], max_new_tokens=16, stop_at_eos=False)
        assert alone.token_ids[0] == ref.token_ids[i] and alone.kept["kept_0"][0] == ref.kept["kept_0"][i]
    # larger batches than compiled run in chunks
    three = gen.generate(image_files + image_files[:1], prompts + prompts[:1], max_new_tokens=4, stop_at_eos=False)
    assert three.token_ids[2] == three.token_ids[0]


def test_cli_generate(demo_export, image_files):
    res = subprocess.run(
        [sys.executable, "-m", "tokcompile", "generate", str(demo_export), "--image", image_files[0], "--prompt",
         "What is this?", "--max-new-tokens", "5", "--no-eos", "--show-kept", "--verify", "--no-prepack"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr
    assert "kept_0: [" in res.stdout and len(res.stdout.splitlines()) == 2


def _cli_error(*args: str) -> str:
    cmd = [sys.executable, "-m", "tokcompile", "generate", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    return res.stderr


def test_wrong_image_path(demo_export):
    err = _cli_error(str(demo_export), "--image", "/nonexistent/cat.png", "--prompt", "hi")
    assert "--image" in err and "/nonexistent/cat.png" in err


@pytest.fixture()
def broken(demo_export, tmp_path):
    out = tmp_path / "export"
    shutil.copytree(demo_export, out)
    return out


def test_missing_graph_file(broken):
    (broken / "decode.onnx").unlink()
    with pytest.raises(RecipeError, match="decode.onnx: is missing"):
        load(broken, "onnxruntime")
    load(broken, "eager", trust_export=True)  # other backends still load


def test_truncated_graph_file(broken):
    data = (broken / "prefill.ep.pt2").read_bytes()
    (broken / "prefill.ep.pt2").write_bytes(data[: len(data) // 2])
    with pytest.raises(RecipeError, match="prefill.ep.pt2: has .* bytes, the manifest says"):
        load(broken, "eager", trust_export=True)


def test_corrupt_graph_file_same_size(broken):
    path = broken / "prefill.onnx"
    data = bytearray(path.read_bytes())
    data[: 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    with pytest.raises(RecipeError, match="prefill.onnx: could not be loaded"):
        load(broken, "onnxruntime")
    with pytest.raises(RecipeError, match="does not match its sha256"):
        load(broken, "onnxruntime", verify=True)


def test_newer_format_version(broken):
    m = json.loads((broken / "manifest.json").read_text())
    m["format_version"] = 99
    (broken / "manifest.json").write_text(json.dumps(m))
    err = _cli_error(str(broken), "--image", "x.png", "--prompt", "hi")
    assert "format 99" in err and "upgrade tokcompile" in err
    m["format_version"] = 1  # written before the vision graph was split out
    (broken / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(RecipeError, match="export format 1, which this tokcompile no longer reads .* recompile"):
        load(broken, "onnxruntime")


def test_not_an_export_and_unknown_backend(demo_export, tmp_path):
    with pytest.raises(RecipeError, match="no manifest.json"):
        load(tmp_path)
    with pytest.raises(RecipeError, match="unknown backend 'openvino'"):
        load(demo_export, "openvino")
    with pytest.raises(RecipeError, match="no tensorrt artifacts .* add tensorrt to export.targets"):
        load(demo_export, "tensorrt", trust_export=True)
    with pytest.raises(RecipeError, match=r"no onnx_int4 artifacts .* set export.weight_format: int4"):
        load(demo_export, "onnxruntime-int4")


def test_code_running_backends_need_trust(demo_export, image_files):
    """aoti and eager run code stored in the export: refused unless the caller trusts it, before anything loads."""
    for backend in ("aoti", "eager", "torch_compile", "tensorrt"):
        with pytest.raises(RecipeError, match=f"the {backend} backend .* add --trust-export .* onnxruntime"):
            load(demo_export, backend)
    err = _cli_error(str(demo_export), "--backend", "eager", "--image", image_files[0], "--prompt", "hi")
    assert "--trust-export" in err and len(err.strip().splitlines()) == 1
    load(demo_export, "onnxruntime")  # data only: no trust needed


def test_prompt_longer_than_compiled(demo_export, image_files):
    gen = load(demo_export, "eager", trust_export=True)
    with pytest.raises(RecipeError, match="more than the 320 this export was compiled for"):
        gen.generate(image_files[:1], ["word " * 100], max_new_tokens=2)
