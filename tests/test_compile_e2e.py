"""compile.py end to end on the demo recipe (ONNX, AOTInductor and exported programs), the seed recipes and
the export layout. The demo is compiled once per session in a subprocess (conftest.demo_export), as a user runs it.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, make_batch
from tests.conftest import compile_recipe as _compile


@pytest.fixture(scope="session")
def demo_eager():
    """The demo's eager ReducedVLM, rebuilt from the recipe the same way compile does."""
    from tokcompile.models import ReducedVLM
    from tokcompile.models.loading import load_model
    from tokcompile.pipeline import plan_recipe
    from tokcompile.quant import quantize_

    plan = plan_recipe(ROOT / "recipes" / "demo.yml")
    model = load_model(plan.recipe.model.path, plan.config, plan.recipe.base.seed, False)
    quantize_(model, plan.quant, include=plan.quant_include, ignore=plan.quant_ignore)
    return ReducedVLM(model, plan.adapter, plan.geometry, plan.schedule, plan.reducers, plan.image_token_id).eval()


def test_manifest_describes_the_export(demo_export):
    m = json.loads((demo_export / "manifest.json").read_text())
    assert m["format_version"] == 2
    assert m["recipe"]["sparse"]["special"]["method"] == "FastV"
    assert m["schedule"] == [{"method": "fastv", "site": "decoder_layer", "layer": 2, "n_in": 64, "n_out": 32,
                              "output": "kept", "positions": "keep", "sizes": False, "scored": 1}]
    assert m["plan"]["image_tokens_per_layer"] == [64, 64, 32, 32]
    assert m["cache_groups"] == [[0, 2], [2, 4]]
    v = m["graphs"]["vision"]
    assert [i["name"] for i in v["inputs"]] == ["pixel_values"] and v["inputs"][0]["shape"] == ["batch", 3, 32, 32]
    assert [(o["name"], o["shape"]) for o in v["outputs"]] == [("image_embeds", ["batch", 64, 128]),
                                                               ("image_source", ["batch", 64])]
    p = m["graphs"]["prefill"]
    assert [i["name"] for i in p["inputs"]] == ["input_ids", "attention_mask", "image_embeds", "image_source"]
    assert p["inputs"][0]["shape"] == ["batch", "prompt_len"] and p["inputs"][0]["dtype"] == "int64"
    assert p["inputs"][2]["shape"] == ["batch", 64, 128]
    assert m["layout"]["prefill"]["outputs"] == [o["name"] for o in p["outputs"]]
    out = {o["name"]: o for o in p["outputs"]}
    assert list(out)[:5] == ["logits", "kept_0", "score_0_0", "cache_mask_0", "cache_mask_1"]
    assert out["kept_0"]["shape"] == ["batch", 32]
    assert out["score_0_0"]["shape"] == ["batch", 64] and out["score_0_0"]["dtype"] == "float32"  # FastV's ranking
    assert out["present_key_1"]["shape"] == ["batch", 2, "cache_len_0", 32]  # layers before K: full length
    assert out["present_key_2"]["shape"] == ["batch", 2, "cache_len_1", 32]  # layers from K: reduced
    d = m["graphs"]["decode"]
    assert [i["name"] for i in d["inputs"]][:4] == ["input_ids", "position_ids", "attention_mask_0", "attention_mask_1"]
    assert {i["name"]: i["shape"] for i in d["inputs"]}["past_value_3"] == ["batch", 2, "past_len_1", 32]
    for g in (v, p, d):
        assert set(g["artifacts"]) == {"onnx", "aoti", "eager"}
    assert m["backends"] == ["aoti", "eager", "onnxruntime"]
    assert all(k <= 3840 for k in p["artifacts"]["onnx"]["topk_k"] if k is not None)
    for name in ("torch", "transformers", "onnx", "onnxruntime"):
        assert name in m["versions"]
    for rel, info in m["files"].items():  # every file is hashed, and the hashes hold
        data = (demo_export / rel).read_bytes()
        assert hashlib.sha256(data).hexdigest() == info["sha256"] and len(data) == info["bytes"]
    expected = {f"{g}.{ext}" for g in ("vision", "prefill", "decode") for ext in ("onnx", "ep.pt2")}
    expected |= {"aoti.pt2", "weights.safetensors"}  # one AOTInductor package; eager and aoti share the weights
    assert expected | {"weights.onnx.data", "parity.json", "flops.json"} <= set(m["files"])
    assert not any(f.endswith(".onnx.data") and f != "weights.onnx.data" for f in m["files"])  # one weight file


def test_parity_and_flops_reports(demo_export):
    p = json.loads((demo_export / "parity.json").read_text())
    assert p["passed"] and p["reference"]["passed"]
    assert set(p["artifacts"]) == {f"{g}.{t}" for g in ("vision", "prefill", "decode")
                                   for t in ("onnx", "aoti", "eager")}
    for name, rep in p["artifacts"].items():
        assert rep["max_abs_diff"] < 1e-4, name
    assert len({r["batch"] for r in p["artifacts"]["prefill.onnx"]["inputs"]}) == 1
    for target in ("onnx", "aoti", "eager"):
        cases = p["generation"][target]["cases"]
        assert {c["batch"] for c in cases} == {1, 2} and all(c["tokens"] == 16 for c in cases)
    assert p["eager_vs_no_cache"]["passed"] and p["eager_vs_no_cache"]["steps"] == 16
    assert 0 <= p["drift_vs_uncompressed"]["top1_agreement"] <= 1
    f = json.loads((demo_export / "flops.json").read_text())
    assert f["conventions"]["exact"]["reduced"] < f["conventions"]["exact"]["dense"]


@pytest.mark.parametrize("backend", ["onnx", "aoti"])
def test_artifacts_at_new_text_lengths(demo_export, demo_eager, processor, backend):
    """Inputs the compile never saw, at two prompt lengths, through the vision then the prefill artifact:
    same kept tokens, same logits."""
    if backend == "onnx":
        import onnxruntime as ort

        vision, prefill = (ort.InferenceSession(str(demo_export / f"{g}.onnx"), providers=["CPUExecutionProvider"])
                           for g in ("vision", "prefill"))

        def run(b):
            embeds, source = vision.run(["image_embeds", "image_source"], {"pixel_values": b["pixel_values"].numpy()})
            feed = {"input_ids": b["input_ids"].numpy(), "attention_mask": b["attention_mask"].numpy(),
                    "image_embeds": embeds, "image_source": source}
            return [torch.from_numpy(o) for o in prefill.run(["logits", "kept_0"], feed)]
    else:
        from tokcompile.export import aoti

        shared: dict = {}  # one package and one set of weights for both graphs
        vision, prefill = (aoti._load(["aoti.pt2", "weights.safetensors"], names, g)(demo_export, shared) for g, names
                           in (("vision", ["pixel_values"]),
                               ("prefill", ["input_ids", "attention_mask", "image_embeds", "image_source"])))

        def run(b):
            embeds, source = vision(b)[:2]
            return prefill({**b, "image_embeds": embeds, "image_source": source})

    lengths = set()
    for seed, qs in enumerate([["Tell me a story about it?", "Why?"], ["x" * 90 + "?", "Colour of the sky here?"]]):
        b = make_batch(processor, qs, seed=seed + 7)
        lengths.add(b["input_ids"].shape[1])
        with torch.no_grad():
            ref = demo_eager(b["input_ids"], b["attention_mask"], b["pixel_values"])
        got = run(b)
        assert torch.equal(got[1], ref[1])
        torch.testing.assert_close(got[0], ref[0], atol=1e-4, rtol=1e-3)
    assert len(lengths) == 2


def test_processor_is_exported(demo_export):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(str(demo_export / "processor"))
    ids = proc.tokenizer("hello there").input_ids
    assert proc.tokenizer.decode(ids, skip_special_tokens=True) == "hello there"
    assert type(proc.image_processor).__name__.endswith("Pil")  # works without torchvision


def test_force_replaces_an_export(demo_export, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(demo_export, out)
    res = _compile(ROOT / "recipes" / "demo.yml", out, "--targets", "eager")
    assert res.returncode == 2 and "--force" in res.stderr
    res = _compile(ROOT / "recipes" / "demo.yml", out, "--targets", "eager", "--force", "-q")
    assert res.returncode == 0, res.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert set(m["graphs"]["prefill"]["artifacts"]) == {"eager"} and not (out / "aoti.pt2").exists()
    assert not (out / "decode.onnx").exists()
    assert not list(tmp_path.glob(".copy*"))


@pytest.mark.parametrize("name", ["seed_sparse", "seed_quant"])
def test_seed_recipes_compile(tmp_path, name):
    """Both YAML forms of the seed document compile (ONNX here; the demo covers AOTInductor). The sparse seed's
    eval section names lmms-eval tasks (gqa, mmbench_en_dev, mme) that are not on disk here: --no-eval skips it."""
    extra = ("--no-eval",) if name == "seed_sparse" else ()
    res = _compile(ROOT / "recipes" / "tiny" / f"{name}.yml", tmp_path / name, "--targets", "onnx", *extra)
    assert res.returncode == 0, res.stderr
    m = json.loads((tmp_path / name / "manifest.json").read_text())
    assert m["schedule"][0]["n_out"] == 14  # round(64 * (1 - 0.778))
    if name == "seed_quant":
        assert "quant.special is GPTQ-only; RTN ignores it" in res.stderr
        assert m["quantization"]["config"]["weight"]["symmetric"] is False
    else:
        assert "eval.inference_per_block is accepted" in res.stderr and m["quantization"] is None
        assert "eval" not in m


def test_gptq_int4_and_the_two_step_flow(tmp_path):
    """GPTQ calibrated through the reduction, INT4 ONNX weights, then the seed's two-step flow: the saved
    fake-quant checkpoint is reloaded with from_pretrained and compiled again with token reduction."""
    out = tmp_path / "gptq"
    res = _compile(ROOT / "recipes" / "tiny" / "gptq_int4.yml", out)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("gptq model.language_model.layers.") == 4 and "output error" in res.stdout
    m = json.loads((out / "manifest.json").read_text())
    q = m["quantization"]
    assert q["method"] == "gptq" and q["config"]["calib"]["with_reduction"] is True
    assert [r["layer"] for r in q["layerwise"]["layers"]] == [0, 1, 2, 3]
    for graph in ("prefill", "decode"):
        g = m["int4_onnx"]["graphs"][graph]
        assert g["replaced"] == 28 and g["size_ratio"] < 0.6 and g["opset"] >= 21
    p = json.loads((out / "parity.json").read_text())
    assert p["int4"]["prefill.exact"]["passed"] and p["int4"]["decode.unfused"]["passed"]
    assert p["int4"]["generation_exact"]["passed"]
    for graph in ("vision", "prefill", "decode"):  # the runtime's onnxruntime-int4 backend, one weight file
        art = m["graphs"][graph]["artifacts"]["onnx_int4"]
        assert art["backend"] == "onnxruntime-int4" and art["files"][1] == "weights.onnx.data"
    assert m["graphs"]["prefill"]["artifacts"]["onnx_int4"]["files"][0] == "prefill.int4.onnx"
    assert "onnxruntime-int4" in m["backends"]
    from PIL import Image

    from tokcompile.runtime import load

    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (48, 40, 3)).astype("uint8"))
    answers = [load(out, backend).generate([image], ["What is this?"], max_new_tokens=8, stop_at_eos=False)
               for backend in ("onnxruntime", "onnxruntime-int4")]
    assert answers[0].token_ids == answers[1].token_ids and answers[0].kept == answers[1].kept

    import yaml
    from transformers import LlavaForConditionalGeneration

    step2 = {
        "model": {"type": "LlavaHf", "path": str(out / "fake_quant")},
        "sparse": {"method": "TokenReduction", "special": {"method": "FastV", "pruning_loc": 3, "rate": 0.75}},
        "export": {"targets": ["eager"]},
        "parity": {"samples": 1},
    }
    recipe = tmp_path / "step2.yml"
    recipe.write_text(yaml.safe_dump(step2))
    res = _compile(recipe, tmp_path / "step2")
    assert res.returncode == 0, res.stderr
    reloaded = LlavaForConditionalGeneration.from_pretrained(str(out / "fake_quant"))
    w = reloaded.model.language_model.layers[1].mlp.up_proj.weight.detach()
    groups = w.reshape(w.shape[0], -1, 32)  # (O, G, 32): every group holds at most 16 distinct 4-bit values
    assert max(len(torch.unique(groups[o, j])) for o in range(4) for j in range(groups.shape[1])) <= 16
    assert not torch.equal(w, w.round())  # real-valued, dequantized weights
