"""lmms-eval tasks as `eval:` datasets: `eval.name: [gqa]` reads the task's documents through lmms-eval, when it
is installed (`pip install --no-deps -r requirements-lmms.txt`).

- The task is looked up among lmms-eval's own tasks, plus task YAMLs under `eval.path` (lmms-eval's
  `--include_path`), so a task of one's own over local data works the same way.
- Its documents come from the local Hugging Face cache or local files only: lmms-eval runs with
  `HF_DATASETS_OFFLINE=1`, and a task whose data is not on disk is one line naming it.
- Each document gives the image (`doc_to_visual`, exactly one), the question (`doc_to_text`, with the task's
  default prompt around it) and the reference answer (`doc_to_target`: a string, or a list of human answers
  scored with the VQAv2 soft score; a multiple-choice index becomes its choice's text).
- Only tasks that generate answers (`output_type: generate_until`) are taken; the split is the task's test split,
  else its validation split.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from tokcompile.errors import RecipeError


@functools.cache
def available() -> bool:
    """lmms-eval is installed; importing it here sets the offline switches first, as `datasets` reads them on
    import, and keeps lmms-eval's own log quiet."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # nothing is downloaded
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import lmms_eval  # noqa: F401
    except ImportError:
        return False
    from loguru import logger

    logger.disable("lmms_eval")
    return True


@functools.cache
def _manager(include_path: str | None) -> Any:
    available()
    from lmms_eval.tasks import TaskManager

    return TaskManager(verbosity="ERROR", include_path=include_path)


def known(name: str, include_path: str | None) -> bool:
    """Whether lmms-eval knows a task of that name (its own, or a YAML under `include_path`)."""
    return available() and name in _manager(include_path).all_tasks


def _data_on_disk(name: str, include_path: str | None) -> None:
    """Fail fast where the task's dataset is not in the local cache: lmms-eval itself retries a failed download
    for up to a minute."""
    import datasets

    config = _manager(include_path)._get_config(name)
    path, kwargs = config.get("dataset_path"), config.get("dataset_kwargs") or {}
    if not path:
        return
    local = {k: kwargs[k] for k in ("data_files", "data_dir") if k in kwargs}
    try:
        datasets.load_dataset_builder(path, config.get("dataset_name"), **local)
    except Exception as e:
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise RecipeError("eval.name", f"lmms-eval task '{name}' needs dataset {path}, which is not on this machine "
                                       f"({first}); put it in the local Hugging Face cache (HF_HOME) or give the task "
                                       "local files (nothing is downloaded)") from None


@functools.cache
def _task(name: str, include_path: str | None) -> Any:
    """The task with its documents loaded (offline), once per process."""
    from lmms_eval.tasks import get_task_dict

    _data_on_disk(name, include_path)
    try:
        return get_task_dict([name], _manager(include_path))[name]
    except Exception as e:  # datasets raises many kinds when the data is not in the cache
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise RecipeError("eval.name", f"lmms-eval task '{name}' could not load its data offline ({type(e).__name__}: "
                                       f"{first}); put the dataset in the local Hugging Face cache (HF_HOME) or give "
                                       "the task local files") from None


def check(name: str, include_path: str | None) -> None:
    """At --plan: the task's data loads offline and the eval section can answer it."""
    task = _task(name, include_path)
    if task.OUTPUT_TYPE != "generate_until":
        raise RecipeError("eval.name", f"lmms-eval task '{name}' is {task.OUTPUT_TYPE}; the eval section answers "
                                       "generate_until tasks (run the others with lmms-eval --model tokcompile)")


def load_task(name: str, include_path: str | None, limit: int | None, qa_type: type) -> list[Any]:
    """The first `limit` documents of lmms-eval task `name` as `qa_type(id, image, question, answers, qtype)`."""
    key = "eval.name"
    check(name, include_path)
    task = _task(name, include_path)
    docs = task.test_docs() if task.has_test_docs() else task.validation_docs() if task.has_validation_docs() else None
    if docs is None:
        raise RecipeError(key, f"lmms-eval task {name} has neither a test nor a validation split")
    out = []
    for i, doc in enumerate(docs):
        if limit is not None and i >= limit:
            break
        visuals = task.doc_to_visual(doc)
        if not isinstance(visuals, list) or len(visuals) != 1 or not hasattr(visuals[0], "convert"):
            raise RecipeError(key, f"lmms-eval task {name}, document {i}: the eval section takes one image per "
                                   "question")
        target = task.doc_to_target(doc)
        if isinstance(target, int) and task.config.doc_to_choice is not None:
            target = task.doc_to_choice(doc)[target]
        answers = tuple(str(a) for a in target) if isinstance(target, list) else (str(target),)
        out.append(qa_type(f"{name}-{i}", visuals[0].convert("RGB"), str(task.doc_to_text(doc)), answers, ""))
    if not out:
        raise RecipeError(key, f"lmms-eval task {name} has no documents")
    return out
