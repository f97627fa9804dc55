"""The real loading path: an HF checkpoint directory (safetensors + processor) saved to a temp dir."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_model, processor) -> Path:
    d = tmp_path_factory.mktemp("ckpt") / "llava-tiny-hf"
    tiny_model.save_pretrained(str(d), safe_serialization=True)
    processor.save_pretrained(str(d))
    return d


def test_directory_loads_without_torchvision(checkpoint, tiny_model):
    from tokcompile.models.loading import load_config, load_model, load_processor, model_type_of

    assert model_type_of(str(checkpoint)) == "llava"
    proc = load_processor(str(checkpoint), False)
    assert type(proc.image_processor).__name__ == "CLIPImageProcessorPil"
    model = load_model(str(checkpoint), load_config(str(checkpoint), False), 0, False)
    for (n, a), (_, b) in zip(model.state_dict().items(), tiny_model.state_dict().items()):
        assert torch.equal(a, b), n


def test_compile_checkpoint_directory_with_save_fake(checkpoint, tmp_path, tiny_model):
    recipe = {
        "model": {"type": "LlavaHf", "path": str(checkpoint)},
        "quant": {"method": "RTN", "weight": {"bit": 4, "granularity": "per_group", "group_size": 64}},
        "sparse": {"method": "TokenReduction", "special": {"method": "FastV", "pruning_loc": 1, "rate": 0.75}},
        "inputs": {"batch_size": 1},
        "export": {"targets": ["onnx"]},
        "parity": {"samples": 2},
        "save": {"save_path": str(tmp_path / "out"), "save_fake": True},
    }
    path = tmp_path / "llava_dir.yml"
    path.write_text(yaml.safe_dump(recipe))
    cmd = [sys.executable, str(ROOT / "compile.py"), str(path)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "out"
    m = json.loads((out / "manifest.json").read_text())
    assert m["schedule"][0]["n_out"] == 16 and m["fake_quant_checkpoint"] == "fake_quant"

    # The fake-quant checkpoint reloads with from_pretrained and holds RTN's dequantized weights.
    from transformers import LlavaForConditionalGeneration

    from tokcompile.quant import fake_quantize

    fq = LlavaForConditionalGeneration.from_pretrained(str(out / "fake_quant"))
    q = fq.model.language_model.layers[0].self_attn.q_proj.weight
    w = tiny_model.model.language_model.layers[0].self_attn.q_proj.weight
    assert torch.equal(q, fake_quantize(w, 4, True, 64))
    assert torch.equal(fq.lm_head.weight, tiny_model.lm_head.weight)  # skipped by default
    fc1 = "model.vision_tower.encoder.layers.0.mlp.fc1.weight"
    assert torch.equal(fq.get_parameter(fc1), tiny_model.get_parameter(fc1))
