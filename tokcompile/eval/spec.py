"""The recipe's `eval:` section (LightCompress's keys, plus `exported`, `backend` and a few of our own).

    eval:
      eval_pos: [pretrain, fake_quant, transformed, exported]
      type: vqa
      name: [shapes]              # built-in task, a folder with img_qa.json, or a JSONL file
      num_samples: 200
      bs: 8
      backend: onnxruntime        # the runtime backend `exported` answers with

Positions: `pretrain` is the loaded model with nothing compressed; `fake_quant` has the quantized weights and
no token reduction; `transformed` is quantized and reduced, in eager PyTorch; `exported` is the export itself,
answering through the runtime. Keys of LightCompress's eval section that concern its own harness are accepted
with a warning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokcompile.errors import RecipeError

POSITIONS = ("pretrain", "fake_quant", "transformed", "exported")
LIGHTCOMPRESS_ONLY = ("fake_quant_wo_kv",)
TYPES = ("vqa",)
BACKENDS = ("onnxruntime", "onnxruntime-int4", "aoti", "eager", "torch_compile")
PASSIVE = ("download", "inference_per_block", "statistics", "seq_len", "num_fewshot", "apply_chat_template",
           "eval_token_consist", "max_length")
KEYS = ("eval_pos", "type", "name", "path", "bs", "num_samples", "backend", "max_new_tokens", "split")


@dataclass(frozen=True)
class EvalConfig:
    positions: tuple[str, ...]
    datasets: tuple[str, ...]  # names as written: "shapes", a path, or a task name resolved with `path`
    path: str | None  # LightCompress's eval.path: where a named dataset's local files are
    batch_size: int
    num_samples: int | None  # None: every sample (the built-in `shapes` task: 200)
    backend: str
    max_new_tokens: int
    split: str  # the built-in task's split
    passive: tuple[tuple[str, Any], ...] = ()  # LightCompress-only keys as written (kept, not acted on)

    def to_dict(self) -> dict[str, Any]:
        return {"eval_pos": list(self.positions), "type": "vqa", "name": list(self.datasets), "path": self.path,
                "bs": self.batch_size, "num_samples": self.num_samples, "backend": self.backend,
                "max_new_tokens": self.max_new_tokens, "split": self.split, **dict(self.passive)}


def _names(key: str, value: Any) -> tuple[str, ...]:
    items = value if isinstance(value, (list, tuple)) else [value]
    if not items or not all(isinstance(v, str) and v.strip() for v in items):
        raise RecipeError(key, f"got {value!r}; give a dataset name or a list of them, e.g. [shapes]")
    return tuple(v.strip() for v in items)


def _positive_int(key: str, value: Any, allow_all: bool = False) -> int | None:
    if allow_all and value in (-1, None):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        more = " (or -1 for every sample)" if allow_all else ""
        raise RecipeError(key, f"got {value!r}; use an integer of at least 1{more}")
    return value


def parse_eval(value: Any, notes: list[str]) -> EvalConfig:
    """Validate `eval:`; `notes` collects warnings for keys that are accepted but not acted on."""
    if not isinstance(value, dict):
        raise RecipeError("eval", f"must be a mapping, got {type(value).__name__}; e.g. eval: {{eval_pos: "
                                  "[pretrain, transformed], type: vqa, name: [shapes]}")
    for k in value:
        if k not in KEYS + PASSIVE:
            raise RecipeError(f"eval.{k}", f"unknown key; known keys: {', '.join(KEYS + PASSIVE)}")
        if k in PASSIVE and value[k] is not None:
            notes.append(f"eval.{k} is accepted but not acted on (it concerns LightCompress's own harness)")
    raw_pos = value.get("eval_pos", ["pretrain", "transformed"])
    positions = _names("eval.eval_pos", raw_pos)
    for p in positions:
        if p in LIGHTCOMPRESS_ONLY:
            raise RecipeError("eval.eval_pos", f"{p} is not supported (activations are never quantized here); "
                                               f"use {', '.join(POSITIONS)}")
        if p not in POSITIONS:
            raise RecipeError("eval.eval_pos", f"unknown position '{p}'; use any of {', '.join(POSITIONS)}")
    if len(set(positions)) != len(positions):
        raise RecipeError("eval.eval_pos", f"lists a position twice ({', '.join(positions)}); list each once")
    kind = value.get("type", "vqa")
    if kind not in TYPES:
        raise RecipeError("eval.type", f"'{kind}' is not supported; use vqa (answers scored by exact match, or "
                                       "the VQAv2 soft score for lists of answers)")
    if "name" not in value:
        raise RecipeError("eval.name", "missing; add name: [shapes] (the built-in task) or a local dataset")
    path = value.get("path")
    if path is not None and not isinstance(path, str):
        raise RecipeError("eval.path", f"got {path!r}; give the folder that holds the named dataset's files")
    backend = value.get("backend", "onnxruntime")
    if backend not in BACKENDS:
        raise RecipeError("eval.backend", f"unknown backend '{backend}'; use one of {', '.join(BACKENDS)}")
    split = value.get("split", "test")
    if split not in ("train", "validation", "test"):
        raise RecipeError("eval.split", f"unknown split '{split}'; use train, validation or test")
    return EvalConfig(
        positions=positions,
        datasets=_names("eval.name", value["name"]),
        path=path,
        batch_size=_positive_int("eval.bs", value.get("bs", 8)),
        num_samples=_positive_int("eval.num_samples", value.get("num_samples"), allow_all=True),
        backend=backend,
        max_new_tokens=_positive_int("eval.max_new_tokens", value.get("max_new_tokens", 8)),
        split=split,
        passive=tuple((k, value[k]) for k in PASSIVE if value.get(k) is not None),
    )


def check_plan(cfg: EvalConfig, targets: tuple[str, ...], weight_format: str | None, media: str) -> None:
    """What `--plan` can check before any weights load: the compile takes images, the datasets are on disk, and
    the export will hold the graphs `exported` answers with."""
    from tokcompile.eval.datasets import locate

    if media != "image":
        raise RecipeError("eval", f"the datasets hold image questions, but this compile takes {media} prompts; "
                                  "remove the eval section or compile for images")

    for name in cfg.datasets:
        locate(name, cfg.path)
    if "exported" not in cfg.positions:
        return
    if cfg.backend == "onnxruntime-int4":
        if weight_format != "int4" or "onnx" not in targets:
            raise RecipeError("eval.backend", "onnxruntime-int4 answers with INT4 graphs; add "
                                              "export.weight_format: int4 and the onnx target, or use onnxruntime")
        return
    target = {"onnxruntime": "onnx"}.get(cfg.backend, cfg.backend)
    if target not in targets:
        raise RecipeError("eval.backend", f"the {cfg.backend} backend needs the {target} target, which this compile "
                                          f"does not export ({', '.join(targets)}); add it to export.targets or "
                                          "choose another backend")
