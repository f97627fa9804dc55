"""`python -m tokcompile save-model`: a built-in model as an ordinary Hugging Face directory that the checkpoint
path loads to the same logits."""

from __future__ import annotations

import subprocess
import sys

import torch

from tests.conftest import ROOT, make_batch
from tokcompile.models.loading import load_config, load_model, load_processor


def test_save_model_writes_a_checkpoint_directory_with_the_same_logits(tmp_path):
    out = tmp_path / "llava_hf"
    cmd = [sys.executable, "-m", "tokcompile", "save-model", "tiny-random:llava", str(out), "--seed", "3"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    builtin = load_model("tiny-random:llava", load_config("tiny-random:llava", False), 3, False)
    saved = load_model(str(out), load_config(str(out), False), 0, False)
    batch = make_batch(load_processor(str(out), False), ["What is this?", "Hi?"])
    assert torch.equal(batch["input_ids"], make_batch(load_processor("tiny-random:llava", False),
                                                      ["What is this?", "Hi?"])["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(saved(**batch).logits, builtin(**batch).logits)
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert again.returncode == 2 and "not an empty directory" in again.stderr
    unknown = subprocess.run([sys.executable, "-m", "tokcompile", "save-model", "tiny-random:cats",
                              str(tmp_path / "x")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert unknown.returncode == 2 and "tiny-random:llava" in unknown.stderr and "Traceback" not in unknown.stderr
