"""Streaming GPTQ (`python -m tokcompile quantize`): a sharded checkpoint quantized one decoder layer at a time
gives exactly the weights the in-memory GPTQ gives, writes a checkpoint that loads and compiles, and holds far
less than the decoder in memory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from tests.conftest import ROOT
from tokcompile.models import tiny
from tokcompile.models.loading import load_model

GPTQ = {"method": "GPTQ", "weight": {"bit": 4, "symmetric": True, "granularity": "per_group", "group_size": 32},
        "special": {"actorder": True, "static_groups": True, "blocksize": 128, "true_sequential": True},
        "calib": {"name": "synthetic", "n_samples": 2, "with_reduction": True}}


def _checkpoint(path, size: str, dtype: torch.dtype, shard: str):
    model = tiny.build_model("llava", seed=0, size=size).to(dtype)
    model.save_pretrained(str(path), max_shard_size=shard)
    tiny.build_processor("llava", size).save_pretrained(str(path))
    return model


def _recipe(tmp_path, model_path, **extra) -> str:
    data = {"base": {"seed": 3}, "model": {"path": str(model_path), "torch_dtype": "float32"},
            "inputs": {"batch_size": 1}, "quant": GPTQ,
            "sparse": {"special": {"method": "FastV", "pruning_loc": 2, "rate": 0.5}}, **extra}
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _quantize(recipe: str, out, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tokcompile", "quantize", recipe, "--out", str(out), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_streaming_equals_in_memory_gptq(tmp_path):
    from tokcompile.pipeline import _quantize as quantize_in_memory
    from tokcompile.pipeline import plan_recipe

    src = tmp_path / "ckpt"
    _checkpoint(src, "tiny", torch.float32, "200KB")
    assert len(list(src.glob("*.safetensors"))) > 3  # really sharded
    recipe = _recipe(tmp_path, src)
    res = _quantize(recipe, tmp_path / "q")
    assert res.returncode == 0, res.stderr + res.stdout
    assert res.stdout.count("peak memory") >= 4 and "done: 4 decoder layers quantized" in res.stdout

    plan = plan_recipe(recipe)
    streamed = load_model(str(tmp_path / "q"), plan.config, 0, False)
    model = load_model(str(src), plan.config, 0, False)
    processor = tiny.build_processor("llava", "tiny")
    quantize_in_memory(plan, model, processor, lambda m: None)
    want, got = model.state_dict(), streamed.state_dict()
    assert want.keys() == got.keys()
    changed = [k for k in want if "language_model.layers." in k and "_proj.weight" in k]
    assert len(changed) == 4 * 7
    for k in want:
        assert torch.equal(want[k], got[k]), k
    original = load_model(str(src), plan.config, 0, False).state_dict()
    assert all(not torch.equal(original[k], got[k]) for k in changed)  # the decoder Linears were quantized
    report = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert [r["layer"] for r in report["layers"]] == [0, 1, 2, 3]


def test_a_measurement_run_copies_the_layers_it_leaves(tmp_path):
    src = tmp_path / "ckpt"
    original = _checkpoint(src, "tiny", torch.float32, "200KB").state_dict()
    res = _quantize(_recipe(tmp_path, src), tmp_path / "q", "--layers", "1")
    assert res.returncode == 0, res.stderr + res.stdout
    from tokcompile.pipeline import plan_recipe

    got = load_model(str(tmp_path / "q"), plan_recipe(_recipe(tmp_path, src)).config, 0, False).state_dict()
    assert not torch.equal(got["model.language_model.layers.0.mlp.down_proj.weight"],
                           original["model.language_model.layers.0.mlp.down_proj.weight"])
    assert all(torch.equal(got[k], original[k]) for k in got if "layers.0." not in k)


def test_spilled_activations_give_the_same_weights(tmp_path):
    """Calibration activations kept in files between layers (one batch read back at a time) change nothing."""
    src = tmp_path / "ckpt"
    _checkpoint(src, "tiny", torch.float32, "200KB")
    recipe = _recipe(tmp_path, src, quant={**GPTQ, "calib": {**GPTQ["calib"], "n_samples": 3, "bs": 1}})
    spill = tmp_path / "spill"
    spill.mkdir()
    (spill / "keep.txt").write_text("not ours")
    runs = {}
    for name, extra in (("memory", ()), ("disk", ("--spill-dir", str(spill)))):
        res = _quantize(recipe, tmp_path / name, *extra)
        assert res.returncode == 0, res.stderr + res.stdout
        runs[name] = res.stdout
    assert "activations on disk" in runs["disk"] and "activations on disk" not in runs["memory"]
    assert sorted(p.name for p in spill.iterdir()) == ["keep.txt"]  # its own files removed, nothing else
    from safetensors.torch import load_file

    def weights(d):
        return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(str(f)).items()}

    a, b = weights(tmp_path / "memory"), weights(tmp_path / "disk")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    report = json.loads((tmp_path / "disk" / "quantization.json").read_text())
    assert report["streaming"]["activations_spilled"] and report["n_batches"] == 3


def test_activation_store_round_trips_token_states(tmp_path):
    from tokcompile.quant.activations import ActivationStore
    from tokcompile.reduce.state import TokenState

    state = TokenState(torch.randn(2, 5, 8), torch.arange(10).reshape(2, 5), torch.ones(2, 5, dtype=torch.bool),
                       torch.tensor([1, 0]), 3, torch.tensor([4, 4]), side=(torch.randn(2, 5, 8),))
    keys = torch.randn(2, 1, 5, 4)
    store = ActivationStore(spill_dir=tmp_path)
    store.put("prev", 0, (state, keys))
    store.put("prev", 1, None)
    got, k = store.get("prev", 0)
    assert isinstance(got, TokenState) and got.n_image == 3 and torch.equal(k, keys)
    assert all(torch.equal(getattr(got, f), getattr(state, f)) for f in ("hidden", "positions", "valid", "last"))
    assert torch.equal(got.side[0], state.side[0]) and got.sizes is None and store.get("prev", 1) is None
    store.rename("prev", "state", 2)
    assert store.get("state", 1) is None
    store.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("recipe_extra, args, text", [
    ({"quant": {"method": "RTN", "weight": {"bit": 4}}}, (), "quant.method: streaming quantization runs GPTQ"),
    ({}, ("--layers", "0"), "--layers: 0 is not a layer count"),
    ({}, ("--device", "tpu9"), "--device: 'tpu9' is not a device"),
    ({}, ("--device", "cuda:64"), "--device: cuda:64 was asked for"),  # no CUDA, or not 65 GPUs
])
def test_errors_are_one_line(tmp_path, recipe_extra, args, text):
    src = tmp_path / "ckpt"
    _checkpoint(src, "tiny", torch.float32, "1GB")
    res = _quantize(_recipe(tmp_path, src, **recipe_extra), tmp_path / "q", *args)
    assert res.returncode == 2 and res.stderr.strip().startswith("error:") and text in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "q").exists()


def test_peak_memory_stays_far_below_the_decoder(tmp_path):
    """The medium LLaVA (16 layers of d=1024; its decoder is 0.72 GB in float32, the precision GPTQ runs in) as
    a bfloat16 sharded checkpoint: the quantize process grows by less than the decoder's float32 size, and its
    peak stops growing after the second layer (two layers are resident at a time)."""
    src = tmp_path / "ckpt"
    model = _checkpoint(src, "medium", torch.bfloat16, "60MB")
    decoder_mb = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n and "language_model" in n)
    decoder_mb = decoder_mb * 4 / 2**20
    del model
    res = _quantize(_recipe(tmp_path, src), tmp_path / "q")
    assert res.returncode == 0, res.stderr + res.stdout
    report = json.loads((tmp_path / "q" / "quantization.json").read_text())
    s = report["streaming"]
    growth = s["peak_rss_mb"] - s["rss_at_start_mb"]
    peaks = [r["peak_rss_mb"] for r in report["layers"]]
    print(f"decoder {decoder_mb:.0f} MB in float32; peak {s['peak_rss_mb']} MB, {growth} MB above the start; "
          f"per layer {peaks}")
    assert s["layers_quantized"] == 16 and growth < decoder_mb
    assert peaks[-1] - peaks[1] < 2 * decoder_mb / 16  # less than two more layers' worth over 14 layers
