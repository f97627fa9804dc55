"""Evaluation datasets: the built-in `shapes` task, or local files in the calibration formats.

- `shapes` (`tokcompile/data/shapes.py`): `eval.split` (default test), the first `num_samples` (default 200).
- A folder with `img_qa.json` (LightCompress's layout: a list of {"image", "question", "answer"}), or a JSONL
  file with one {"image", "question" (or "prompt"), "answer"} per line. `answer` is a string, or a list of
  human answers (scored with the VQAv2 soft score). Image paths are relative to the file's folder.
- Any other name is looked up under `eval.path` (`<path>/<name>` as a folder or `<path>/<name>.jsonl`), then,
  where lmms-eval is installed, among its tasks and the task YAMLs under `eval.path` (`lmms_tasks.py`).

Nothing is downloaded: a dataset that is not on disk is a one-line error naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokcompile.errors import RecipeError
from tokcompile.qa_files import read_entries

BUILTIN = ("shapes",)
LMMS_TASK = "lmms-eval task"  # what `locate` returns for a name lmms-eval knows
SHAPES_DEFAULT_SAMPLES = 200


@dataclass(frozen=True)
class QA:
    id: str
    image: Any  # PIL RGB image
    question: str
    answers: tuple[str, ...]  # one reference answer, or several human answers (VQAv2)
    qtype: str = ""  # the question type where the dataset has one


def _local(p: Path, name: str, limit: int | None, key: str) -> list[QA]:
    from PIL import Image

    rows, base = read_entries(p, key, "image/question/answer entries")
    out = []
    for i, row in enumerate(rows[:limit] if limit else rows):
        question = row.get("question") or row.get("prompt") if isinstance(row, dict) else None
        answer = row.get("answer", row.get("answers")) if isinstance(row, dict) else None
        if not isinstance(row, dict) or "image" not in row or not question or answer in (None, "", []):
            raise RecipeError(key, f"entry {i} of {p} needs 'image', 'question' and 'answer' (a string or a list)")
        answers = tuple(str(a) for a in answer) if isinstance(answer, list) else (str(answer),)
        img_path = base / str(row["image"])
        try:
            image = Image.open(img_path).convert("RGB")
        except OSError as e:
            raise RecipeError(key, f"cannot read image {img_path} ({e.strerror or e})") from None
        out.append(QA(f"{name}-{row.get('id', i)}", image, str(question), answers, str(row.get("type", ""))))
    if not out:
        raise RecipeError(key, f"{p} lists no samples")
    return out


def locate(name: str, path: str | None) -> Path | str | None:
    """The local file or folder for a dataset name (None for the built-in task, LMMS_TASK for an lmms-eval
    task)."""
    if name in BUILTIN:
        return None
    candidates = [Path(name)]
    if path is not None:
        base = Path(path)
        candidates += [base / name, base / f"{name}.jsonl"]
    for c in candidates:
        try:
            if c.is_dir() and (c / "img_qa.json").is_file() or c.is_file():
                return c
        except (OSError, ValueError):  # a name no file system takes (too long, a NUL byte)
            continue
    from tokcompile.eval import lmms_tasks

    include = path if path is not None and Path(path).is_dir() else None
    if lmms_tasks.known(name, include):
        lmms_tasks.check(name, include)
        return LMMS_TASK
    where = f" under eval.path {path}" if path else ""
    tasks = "" if lmms_tasks.available() else " (lmms-eval tasks need lmms-eval: requirements-lmms.txt)"
    raise RecipeError("eval.name", f"dataset '{name}' was not found{where}{tasks}; use shapes (built in), a "
                                   "folder with img_qa.json or a JSONL file of image/question/answer entries, or set "
                                   "eval.path to the folder that holds it (nothing is downloaded), or compile with "
                                   "--no-eval")


def load_dataset(name: str, path: str | None, num_samples: int | None, split: str = "test") -> list[QA]:
    """The first `num_samples` samples of a dataset (every one for None; `shapes` defaults to 200)."""
    if name == "shapes":
        from tokcompile.data import shapes

        n = num_samples or SHAPES_DEFAULT_SAMPLES
        return [QA(s.id, s.image, s.question, (s.answer,), s.qtype) for s in shapes.samples(split, n)]
    where = locate(name, path)
    if where == LMMS_TASK:
        from tokcompile.eval import lmms_tasks

        include = path if path is not None and Path(path).is_dir() else None
        return lmms_tasks.load_task(name, include, num_samples, QA)
    return _local(where, name, num_samples, "eval.name")
