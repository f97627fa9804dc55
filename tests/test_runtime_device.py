"""`--device` for the runtime, on the demo export, with what can be checked without a GPU: the device is parsed
and refused in one line where this machine lacks it; AOTInductor packages compiled for the host are refused on
CUDA; onnxruntime's bound runner (inputs and outputs kept on the device through DLPack, what the CUDA provider
uses) answers as the plain one when bound on the host; the exported programs move to another device (`meta`,
which refuses host tensors as CUDA does) with the weights and every constant built inside the graph.
The run on a real GPU is the `gpu`-marked test at the end (skipped without CUDA) and `benchmarks/gpu.py`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tests.conftest import ROOT
from tokcompile.errors import RecipeError
from tokcompile.export import eager
from tokcompile.export.onnx import as_torch, bound_runner
from tokcompile.runtime import _graph_runner, load

PROMPTS = ["What is in this image?", "Describe everything you see, in detail."]


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(11)
    return [Image.fromarray((rng.random((48, 64, 3)) * 255).astype("uint8")) for _ in PROMPTS]


@pytest.mark.parametrize(("device", "says"), [("gpu", "'gpu' is not a device; use cpu, cuda or cuda:N"),
                                              ("cpu:1", "is not a device"),
                                              ("cuda:64", "cuda:64 was asked for")])
def test_a_device_this_machine_lacks_is_one_line(demo_export, device, says):
    res = subprocess.run([sys.executable, "-m", "tokcompile", "generate", str(demo_export), "--image",
                          str(ROOT / "README.md"), "--prompt", "Hi", "--device", device],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2 and res.stderr.startswith("error: --device: ") and says in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_compile_refuses_a_missing_device_at_plan(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "compile.py"), str(ROOT / "recipes" / "demo.yml"), "--plan",
                          "--device", "cuda:64"], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2 and res.stderr.startswith("error: --device: cuda:64 was asked for"), res.stderr
    data = yaml.safe_load((ROOT / "recipes" / "demo.yml").read_text())
    data.setdefault("parity", {})["device"] = "tpu"
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump(data))
    res = subprocess.run([sys.executable, str(ROOT / "compile.py"), str(recipe), "--plan"], capture_output=True,
                         text=True, cwd=ROOT)
    assert res.returncode == 2 and "parity.device: 'tpu' is not a device" in res.stderr, res.stderr


def test_aoti_packages_record_their_device_and_are_refused_elsewhere(demo_export):
    manifest = json.loads((demo_export / "manifest.json").read_text())
    assert {g["artifacts"]["aoti"]["device"] for g in manifest["graphs"].values()} == {"cpu"}
    assert "device" not in manifest["graphs"]["prefill"]["artifacts"]["onnx"]  # runs on either
    with pytest.raises(RecipeError) as e:
        _graph_runner(demo_export, manifest, "prefill", "aoti", shared={"device": "cuda"})
    assert str(e.value).startswith("--device: this export's aoti artifacts are compiled for cpu, not cuda")


def test_onnx_bound_runner_answers_as_the_plain_one(demo_export, images):
    import onnxruntime as ort

    plain = load(demo_export, "onnxruntime")
    ref = plain.generate(images, PROMPTS, max_new_tokens=8, stop_at_eos=False, first_logits=True)
    bound = load(demo_export, "onnxruntime")
    manifest = bound.manifest
    runners = []
    for g in bound.layout.graphs:
        spec = manifest["graphs"][g]
        session = ort.InferenceSession(str(demo_export / spec["artifacts"]["onnx"]["files"][0]),
                                       providers=["CPUExecutionProvider"])
        names = [i["name"] for i in spec["inputs"]]
        runners.append(bound.layout.graph(g).wrap(bound_runner(session, names, torch.device("cpu"))))
    bound.graphs = runners
    got = bound.generate(images, PROMPTS, max_new_tokens=8, stop_at_eos=False, first_logits=True)
    assert got.token_ids == ref.token_ids and got.kept == ref.kept
    assert torch.equal(got.first_logits, ref.first_logits)


def test_ort_values_reach_torch_with_or_without_dlpack():
    import onnxruntime as ort

    want = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    value = ort.OrtValue.ortvalue_from_numpy(want.numpy().copy())

    class Older:  # an onnxruntime without DLPack on its values
        numpy = value.numpy

    for v in (value, Older()):
        got = as_torch(v, torch.device("cpu"))
        assert torch.equal(got, want) and got.device.type == "cpu"


def test_exported_programs_move_to_another_device(demo_export, images):
    """The vision and prefill programs bound on `meta`: fed from the host, they run there (a constant left on the
    host would make PyTorch refuse the mix) and give the host run's shapes."""
    host = load(demo_export, "eager", trust_export=True)
    batch = host._batch(images, PROMPTS, "auto")
    manifest, shared = host.manifest, {"device": "meta"}
    outs: dict[str, dict] = {}
    for g in ("vision", "prefill"):
        spec = manifest["graphs"][g]
        names = [i["name"] for i in spec["inputs"]]
        run = eager._load(spec["artifacts"]["eager"]["files"], names, g)(demo_export, shared)
        feed = {n: batch[n] if n in batch else outs["vision"][n] for n in names}  # host and meta tensors
        outs[g] = host.layout.graph(g).named(run(feed))
        assert all(t.device.type == "meta" for t in outs[g].values()), g
    seen = host.graphs[0]({n: batch[n] for n in host.layout.vision.inputs})  # the same graphs on the host
    prefilled = host.graphs[1]({n: batch[n] if n in batch else seen[n] for n in host.layout.prefill.inputs})
    for g, reference in (("vision", seen), ("prefill", prefilled)):
        assert {n: tuple(t.shape) for n, t in outs[g].items()} == {n: tuple(t.shape) for n, t in reference.items()}


@pytest.mark.gpu
def test_compile_on_cuda_and_answer_there(tmp_path):
    """The demo compiled with --device cuda (traced, compiled and checked on the GPU), every backend on the GPU
    answering as the exported programs do on the host (`benchmarks/gpu.py --exports`)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu

    result = gpu.export_check("cuda", tmp_path / "demo")
    assert result["same_answers"] and all(result["same_answers"].values()), result
