"""A `tokcompile` model for lmms-eval: any lmms-eval task on an export, through the runtime.

    lmms-eval --model tokcompile --model_args export=DIR,backend=onnxruntime --tasks TASK

Registered through lmms-eval's `lmms_eval.models` entry points (see pyproject.toml): with lmms-eval installed
(`pip install --no-deps -r requirements-lmms.txt`, which leaves out the CUDA-only torchvision), lmms-eval finds
it. Model arguments:
- `export`: the export directory (required);
- `backend`: the runtime backend (`onnxruntime` by default; the others need `trust_export=true`);
- `max_new_tokens`: the default answer length where a task does not give one (the export's own by default).
lmms-eval's `--batch_size` sets the requests per call into the runtime, which splits them into its compiled
batches.

Each request holds one image (or one video, for an export compiled for video) and its question; the question is
wrapped in the model's chat template, as the runtime does for a bare question. Generation is greedy unless the
task asks for a temperature; `until` strings cut the answer where they first occur. `loglikelihood` scores the
task's continuation after the prompt with the export's own prefill and decode graphs (teacher-forced) and returns
lmms-eval's convention, the mean negative log-likelihood per token (smaller is likelier).
"""

from __future__ import annotations

from typing import Any

try:
    from lmms_eval.api.model import lmms
except ImportError as e:  # pragma: no cover - the module is only imported by lmms-eval
    raise ImportError("the tokcompile model for lmms-eval needs lmms-eval: pip install --no-deps -r "
                      "requirements-lmms.txt (in tokcompile's repository)") from e

from tokcompile.errors import RecipeError

MODEL_ID = "tokcompile"


def manifest() -> Any:
    """lmms-eval's registration record for this model (the `lmms_eval.models` entry point)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.TokcompileLMM")


def _passed_through(result: tuple[float, bool]) -> Any:
    """A loglikelihood result that reaches the task as the (loss, greedy) tuple it is. lmms-eval 0.7.3's evaluator
    turns every model output that is not text or a `GenerationResult` into its str(), so multiple-choice tasks
    would get "(5.4, False)" and fail to unpack it; a `GenerationResult` holding the tuple is passed on as is."""
    try:
        from lmms_eval.api.instance import GenerationResult
    except ImportError:  # versions before GenerationResult keep tuples as they are
        return result
    return GenerationResult(text=result)  # type: ignore[arg-type]  # the tuple, on purpose


def _flag(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in {"1", "true", "yes", "on"}


def cut_at(text: str, until: list[str]) -> str:
    """`text` up to the first occurrence of any of the stop strings."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


class TokcompileLMM(lmms):
    """An export directory as an lmms-eval model."""

    is_simple = True

    def __init__(self, export: str | None = None, backend: str = "onnxruntime", batch_size: int | str = 1,
                 max_new_tokens: int | str | None = None, trust_export: bool | str = False, device: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__()
        from tokcompile import runtime

        if export is None:
            raise RecipeError("--model_args", "needs export=DIR, the directory `python compile.py` wrote")
        if kwargs:
            raise RecipeError("--model_args", f"unknown argument(s) {', '.join(sorted(kwargs))}; the tokcompile "
                                              "model takes export, backend, batch_size, max_new_tokens, trust_export, "
                                              "device")
        # lmms-eval's --device (or device= in --model_args): where the export's graphs run (tokcompile.devices)
        self.generator = runtime.load(export, backend=backend, trust_export=_flag(trust_export),
                                      device=device or "cpu")
        self.batch_size_per_call = max(1, int(batch_size))
        self.max_new_tokens = int(max_new_tokens) if max_new_tokens is not None else None

    def _media(self, request_args: tuple) -> Any:
        """The one image (or video) of a request: its doc through the task's doc_to_visual."""
        doc_to_visual, doc_id, task, split = request_args[-4:]
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        if isinstance(visuals, list) and len(visuals) == 1:
            return visuals[0]
        got = len(visuals) if isinstance(visuals, list) else type(visuals).__name__
        raise RecipeError(f"task {task}", f"document {doc_id} has {got} visuals; a tokcompile export answers "
                                          "one image (or one video) per question")

    def _progress(self, total: int, what: str) -> Any:
        from tqdm import tqdm

        return tqdm(total=total, desc=f"tokcompile {what}", disable=self.rank != 0)

    def generate_until(self, requests: list[Any]) -> list[str]:
        answers: list[str] = []
        bar = self._progress(len(requests), "answers")
        for start in range(0, len(requests), self.batch_size_per_call):
            chunk = [r.args for r in requests[start:start + self.batch_size_per_call]]
            by_settings: dict[str, list[int]] = {}  # one runtime call per distinct generation setting
            for i, args in enumerate(chunk):
                by_settings.setdefault(repr(sorted(args[1].items())), []).append(i)
            texts: dict[int, str] = {}
            for rows in by_settings.values():
                kwargs = dict(chunk[rows[0]][1])
                until = kwargs.get("until", [])
                until = [until] if isinstance(until, str) else list(until)
                new_tokens = kwargs.get("max_new_tokens", self.max_new_tokens)
                answer = self.generator.generate(
                    [self._media(chunk[i]) for i in rows], [chunk[i][0] for i in rows],
                    max_new_tokens=int(new_tokens) if new_tokens is not None else None,
                    temperature=float(kwargs.get("temperature", 0.0) or 0.0),
                    top_p=float(kwargs.get("top_p", 1.0) or 1.0))
                for i, text in zip(rows, answer.texts):
                    texts[i] = cut_at(text, until)
            for i, args in enumerate(chunk):
                answers.append(texts[i])
                self.cache_hook.add_partial("generate_until", (args[0], args[1]), texts[i])
            bar.update(len(chunk))
        bar.close()
        return answers

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        """(loss, greedy) per request, as lmms-eval's own models return it (its multiple-choice tasks take the
        smallest): the mean negative log-likelihood of the continuation's tokens, and whether greedy decoding
        writes exactly them."""
        scores: list[tuple[float, bool]] = []
        bar = self._progress(len(requests), "scores")
        for start in range(0, len(requests), self.batch_size_per_call):
            chunk = [r.args for r in requests[start:start + self.batch_size_per_call]]
            continuations = []
            for _question, target, _, doc_id, task, split in chunk:
                doc = self.task_dict[task][split][doc_id]
                continuations.append(target if isinstance(target, str) else target(doc))
            for s in self.generator.score([self._media(a) for a in chunk], [a[0] for a in chunk], continuations):
                scores.append(_passed_through((-s.logprob / s.tokens, s.greedy)))
            bar.update(len(chunk))
        bar.close()
        return scores

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        raise NotImplementedError("the tokcompile model answers single-round tasks; multi-round tasks are not "
                                  "supported")
