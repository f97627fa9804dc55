"""Shared fixtures: the built-in tiny LLaVA (random weights, built in code) and its processor."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tokcompile.models import ADAPTERS
from tokcompile.models.tiny import build_model, build_processor
from tokcompile.parity import format_prompt, process, random_images

ROOT = Path(__file__).resolve().parents[1]


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto` (the default in pyproject.toml): one worker per core, at most 4. Most of a test's time is
    single-threaded tracing in a compile subprocess, so workers scale with cores; past 4 the memory grows
    faster than the time falls."""
    return max(1, min(_cpus(), 4))


_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:  # share the cores between the workers (and the compile subprocesses they start)
    _THREADS = max(1, _cpus() // _WORKERS)
    torch.set_num_threads(_THREADS)
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")
    config.addinivalue_line("markers", "slow: compiles AOTInductor packages (tens of seconds)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model():
    return build_model("llava", seed=0)


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory) -> str:
    """The built-in tiny CLIP (vision head 32 wide: the tiny LLaVA's tower) saved as an ordinary checkpoint
    directory (safetensors, config, tokenizer), for the question-conditioned methods and their references."""
    from tokcompile.models.tiny import clip as tiny_clip

    d = tmp_path_factory.mktemp("tiny_clip")
    tiny_clip.save(str(d), width=32)
    return str(d)


@pytest.fixture(scope="session")
def processor():
    return build_processor("llava")


@pytest.fixture(scope="session")
def adapter():
    return ADAPTERS.get("llava")()


@pytest.fixture(scope="session")
def geometry(adapter, tiny_model):
    return adapter.geometry(tiny_model.config, None)


PADDED_QUESTIONS = ["What is shown here in this picture, in detail?", "Hi?"]


def padded_family_case(family: str, questions: list[str] = PADDED_QUESTIONS,
                       video_frames: int | None = None) -> SimpleNamespace:
    """A family's tiny model, adapter, geometry and a left-padded batch of two (the second prompt is shorter);
    with `video_frames`, one video of that many frames per prompt."""
    model = build_model(family, seed=0).eval()
    adapter = ADAPTERS.get(family)()
    geom = adapter.geometry(model.config, None, video_frames)
    processor = build_processor(family)
    if family == "llava":
        batch = make_batch(processor, questions)
    else:
        media = adapter.random_media(np.random.default_rng(0), len(questions), geom)
        batch = process(processor, adapter, geom, media, questions)
    assert not bool(batch["attention_mask"][1].all())  # the batch really is padded
    return SimpleNamespace(family=family, model=model, adapter=adapter, geom=geom, batch=batch,
                           image_id=adapter.image_token_id(model.config, geom))


def make_batch(processor, questions: list[str], seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    images = random_images(rng, len(questions), (32, 32))
    prompts = [format_prompt(processor, ADAPTERS.get("llava")(), q) for q in questions]
    out = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    return {k: out[k] for k in ("input_ids", "attention_mask", "pixel_values")}


@pytest.fixture()
def batch(processor):
    return make_batch(processor, ["What is shown here in this picture, in detail?", "Hi?"])


DATA_DEPENDENT_OPS = {"nonzero", "masked_scatter", "masked_select", "item", "_local_scalar_dense", "index_put"}


def assert_no_data_dependent_ops(ep) -> set[str]:
    """An exported program whose shapes no tensor value decides: none of the data-dependent aten ops and no
    unbacked sizes. Returns the aten op names it uses."""
    ops = {str(n.target).split(".")[1] for n in ep.graph.nodes if str(n.target).startswith("aten.")}
    assert not ops & DATA_DEPENDENT_OPS, ops & DATA_DEPENDENT_OPS
    assert not ep.range_constraints  # no unbacked (data-dependent) sizes
    return ops


def export_matching_eager(module, args: tuple, exact: bool = True):
    """`torch.export` of `module` at the example's static shapes; the program's outputs equal eager's (floats
    within the default tolerance unless `exact`). Returns the exported program."""
    ep = torch.export.export(module, args, strict=False)
    with torch.no_grad():
        want = module(*args)
    got = ep.module()(*args)
    for a, b in zip(got, want):
        if a.is_floating_point() and not exact:
            torch.testing.assert_close(a, b)
        else:
            assert torch.equal(a, b)
    return ep


def compile_recipe(recipe: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "compile.py"), str(recipe), "--out", str(out), *extra],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )


@pytest.fixture(scope="session")
def demo_export(tmp_path_factory) -> Path:
    """The demo recipe compiled once per test run (ONNX, AOTInductor, exported programs), read-only to tests.
    Under pytest-xdist the workers share it: the first one to ask compiles it under a file lock."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the run's temp root, common to all workers
    out = base / "shared_demo_export"
    with FileLock(str(base / "shared_demo_export.lock")):
        if not (out / "manifest.json").exists():
            res = compile_recipe(ROOT / "recipes" / "demo.yml", out, "--targets", "onnx,aoti,eager")
            assert res.returncode == 0, res.stderr + res.stdout
            assert "parity passed" in res.stdout
    return out


