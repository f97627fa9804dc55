"""lmms-eval on an export: `lmms-eval --model tokcompile` (registered through the `lmms_eval.models` entry point)
runs two tasks of our own over a local dataset, one generating answers, one multiple choice, and its answers
and scores equal what the runtime gives for the same requests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tokcompile import runtime
from tokcompile.data import shapes
from tokcompile.errors import RecipeError
from tokcompile.eval.lmms_model import TokcompileLMM, cut_at

N_DOCS = 5  # more than the demo export's compiled batch of 2

TASK_UTILS = '''
from PIL import Image

CHOICES = {choices!r}


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_target(doc):
    return CHOICES.index(doc["answer"])
'''

GENERATE_TASK = '''task: shapes_local_answers
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: "{{{{question}}}}"
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 3
  until: ["\\n"]
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
'''

CHOICE_TASK = '''task: shapes_local_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: "{{{{question}}}}"
doc_to_target: !function utils.doc_to_target
doc_to_choice: {choices}
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
'''


def write_tasks(root: Path) -> tuple[list[dict], Path]:
    """N_DOCS shapes test samples as PNG files and a JSONL file, and the two task YAMLs over them."""
    rows = []
    for s in shapes.samples("test", N_DOCS):
        image = root / f"{s.id}.png"
        s.image.save(image)
        rows.append({"id": s.id, "image": str(image), "question": s.question, "answer": s.answer})
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(TASK_UTILS.format(choices=shapes.answers()))
    (tasks / "answers.yaml").write_text(GENERATE_TASK.format(data=data))
    (tasks / "choice.yaml").write_text(CHOICE_TASK.format(data=data, choices=json.dumps(shapes.answers())))
    return rows, tasks


@pytest.fixture(scope="module")
def lmms_run(demo_export, tmp_path_factory):
    """The two tasks written to a folder, and lmms-eval's CLI run on the demo export with --log_samples."""
    root = tmp_path_factory.mktemp("lmms")
    rows, tasks = write_tasks(root)
    out = root / "out"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf")}
    res = subprocess.run(
        [sys.executable, "-m", "lmms_eval", "--model", "tokcompile", "--model_args",
         f"export={demo_export},backend=onnxruntime", "--batch_size", "2", "--device", "cpu",
         "--tasks", "shapes_local_answers,shapes_local_choice",
         "--include_path", str(tasks), "--output_path", str(out), "--log_samples"],
        capture_output=True, text=True, timeout=600, cwd=root, env=env)
    log = res.stdout[-3000:] + res.stderr[-3000:]
    assert res.returncode == 0 and "Error during evaluation" not in res.stderr, log
    samples = {}
    for task in ("shapes_local_answers", "shapes_local_choice"):
        files = sorted(out.rglob(f"*samples_{task}.jsonl"))
        assert files, f"lmms-eval wrote no samples for {task}: {sorted(p.name for p in out.rglob('*'))}"
        samples[task] = sorted((json.loads(line) for line in files[-1].read_text().splitlines()),
                               key=lambda r: r["doc_id"])
    return rows, samples, res.stdout


def test_generated_answers_are_the_runtimes(lmms_run, demo_export):
    rows, samples, stdout = lmms_run
    got = samples["shapes_local_answers"]
    assert [r["doc_id"] for r in got] == list(range(N_DOCS))
    gen = runtime.load(demo_export, backend="onnxruntime")
    from PIL import Image

    want = gen.generate([Image.open(r["image"]).convert("RGB") for r in rows], [r["question"] for r in rows],
                        max_new_tokens=3)
    answers = [r["filtered_resps"] for r in got]  # the filtered answer (a list of one in some versions)
    answers = [a[0] if isinstance(a, list) else a for a in answers]
    assert answers == [cut_at(t, ["\n"]) for t in want.texts]
    assert "shapes_local_answers" in stdout and "exact_match" in stdout


def test_multiple_choice_losses_are_the_runtimes_scores(lmms_run, demo_export):
    """Every choice's loss is the runtime's mean negative log-likelihood of that continuation, and lmms-eval's
    accuracy follows from the smallest loss."""
    rows, samples, _ = lmms_run
    got = samples["shapes_local_choice"]
    choices = shapes.answers()
    gen = runtime.load(demo_export, backend="onnxruntime")
    from PIL import Image

    for row, sample in zip(rows, got):
        image = Image.open(row["image"]).convert("RGB")
        # lmms-eval puts its target delimiter (a space) before each choice
        scores = gen.score([image] * len(choices), [row["question"]] * len(choices), [" " + c for c in choices])
        losses = [float(loss) for loss, _ in sample["filtered_resps"]]
        assert losses == pytest.approx([-s.logprob / s.tokens for s in scores], abs=1e-5)
        best = min(range(len(choices)), key=lambda i: losses[i])
        assert sample["acc"] == float(best == choices.index(row["answer"]))


def test_model_arguments_are_checked(demo_export):
    with pytest.raises(RecipeError, match="export=DIR"):
        TokcompileLMM()
    with pytest.raises(RecipeError, match="unknown argument.*pretrained"):
        TokcompileLMM(export=str(demo_export), pretrained="x")
    with pytest.raises(RecipeError, match="trust"):
        TokcompileLMM(export=str(demo_export), backend="aoti")
    with pytest.raises(RecipeError, match="--device: cuda:64 was asked for"):  # lmms-eval's --device reaches it
        TokcompileLMM(export=str(demo_export), device="cuda:64")


def test_cut_at_stops_at_the_first_stop_string():
    assert cut_at("red\nblue", ["\n"]) == "red"
    assert cut_at("a. b, c", [",", "."]) == "a"
    assert cut_at("yes", []) == "yes"


def test_the_entry_point_names_the_model():
    from lmms_eval.models import get_model

    assert get_model("tokcompile") is TokcompileLMM
    assert Path(sys.modules[TokcompileLMM.__module__].__file__).name == "lmms_model.py"


def test_the_eval_section_reads_an_lmms_eval_task(tmp_path):
    """`eval.name` naming an lmms-eval task (here one of our own under `eval.path`, lmms-eval's include path):
    its documents become the eval questions, and a multiple-choice task or a task without local data is one
    clear error."""
    from tokcompile.eval.datasets import LMMS_TASK, load_dataset, locate

    rows, tasks = write_tasks(tmp_path)
    assert locate("shapes_local_answers", str(tasks)) == LMMS_TASK
    got = load_dataset("shapes_local_answers", str(tasks), 3)
    assert [(q.question, q.answers) for q in got] == [(r["question"], (r["answer"],)) for r in rows[:3]]
    assert got[0].image.size == shapes.sample("test", 0).image.size
    with pytest.raises(RecipeError, match="is multiple_choice; the eval section answers generate_until"):
        load_dataset("shapes_local_choice", str(tasks), 3)
    with pytest.raises(RecipeError, match="'gqa' needs dataset .* not on this machine"):
        locate("gqa", None)
