"""tools/train_shapes.py in miniature (two steps per stage, a handful of questions): it writes the weights, the
stage-1 tower and its settings; a run is reproducible from its seed; `--init` with `--first-batch` continues from
saved weights on other scenes."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT


@pytest.fixture(scope="module")
def train():
    sys.path.insert(0, str(ROOT / "tools"))
    import train_shapes

    # the script sets the process's thread count: keep this session's
    return lambda *args: train_shapes.main([*map(str, args), "--threads", str(torch.get_num_threads()),
                                            "--eval-every", "0", "--final-samples", "8"])


@pytest.fixture(scope="module")
def first_run(train, tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "run.safetensors"
    assert train("--out", out, "--vision-steps", 2, "--vision-batch", 4, "--steps", 2, "--batch", 2,
                 "--turns", 2) == 0
    return out


def stage2(train, out, init, first_batch):
    assert train("--out", out, "--init", init, "--vision-steps", 0, "--steps", 1, "--batch", 2, "--turns", 2,
                 "--first-batch", first_batch, "--warmup", 1) == 0
    return load_file(str(out))


def test_a_run_writes_the_weights_the_tower_and_its_settings(first_run):
    from tokcompile.data import shapes
    from tokcompile.models import tiny

    model = tiny.build_model("llava", seed=0, size="shapes")
    model.load_state_dict(load_file(str(first_run)), strict=True)
    tower = load_file(str(first_run.with_name("run.vision.safetensors")))
    assert any(k.startswith("model.vision_tower.") for k in tower)
    info = json.loads(first_run.with_suffix(".json").read_text())
    assert info["steps"] == 2 and info["turns"] == 2 and info["first_batch"] == 0 and info["final_samples"] == 8
    assert set(info["test_accuracy"]) == {*shapes.QUESTION_TYPES, "all"}
    assert all(0.0 <= v <= 1.0 for v in info["test_accuracy"].values())


def test_a_continuation_is_reproducible_and_reads_the_batches_it_is_given(train, first_run, tmp_path):
    start = load_file(str(first_run))
    again = stage2(train, tmp_path / "a.safetensors", first_run, 2)
    same = stage2(train, tmp_path / "b.safetensors", first_run, 2)
    other = stage2(train, tmp_path / "c.safetensors", first_run, 0)
    projector = "model.multi_modal_projector.linear_1.weight"
    assert not torch.equal(again[projector], start[projector])  # it trained from the saved weights
    assert all(torch.equal(again[k], same[k]) for k in again)  # same seed, same batches: the same weights
    assert not torch.equal(again[projector], other[projector])  # other scenes, other weights
    tower = [k for k in again if k.startswith("model.vision_tower.")]
    assert tower and all(torch.equal(again[k], start[k]) for k in tower)  # the tower stays frozen in stage 2


@pytest.mark.parametrize("args", [("--turns", "0"), ("--first-batch", "-1"), ("--caption-fraction", "0.25")])
def test_bad_settings_are_refused_before_any_work(train, args, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train("--out", tmp_path / "x.safetensors", *args)
    assert e.value.code == 2 and args[0] in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
