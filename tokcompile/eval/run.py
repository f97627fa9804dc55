"""Answering a dataset at each evaluation position, and scoring the answers against each other.

Every position answers greedily through the same generation loop (`generation.generate`): the eager positions
with the compile's eager graphs (the reduced model, or the same model with an empty schedule for `pretrain` and
`fake_quant`), `exported` with the export's own graphs through the runtime. So `transformed` with nothing
pruned answers exactly as `pretrain`, and `exported` answers as `transformed` wherever parity holds.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tokcompile.eval.datasets import QA
from tokcompile.eval.score import first_token_kl, normalize, vqa_score
from tokcompile.question import for_plan as question_tokenizer

# questions -> (answer texts, first-token logits [B, V])
Answerer = Callable[[list[QA]], tuple[list[str], Tensor]]
Log = Callable[[str], None]


@dataclass
class PositionAnswers:
    texts: list[str]
    first_logits: Tensor  # [N, V] float32
    seconds: float


def eager_answerer(plan: Any, model: Any, processor: Any, reduce: bool, max_new_tokens: int) -> Answerer:
    """Answers from the eager graphs of `model`: with the plan's reduction, or (reduce=False) with none."""
    from tokcompile.generation import GenerationConfig, generate
    from tokcompile.graphs import build_modules, eager_runners
    from tokcompile.manifest import eos_token_id
    from tokcompile.parity import process

    use = plan if reduce else dataclasses.replace(plan, schedule=(), reducers=())
    reduced, decode = build_modules(use, model)
    graphs = eager_runners(reduced, decode)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=eos_token_id(plan))
    tokenizer = processor.tokenizer
    question = question_tokenizer(plan)

    def answer(batch: list[QA]) -> tuple[list[str], Tensor]:
        feed = process(processor, plan.adapter, plan.geometry, [q.image for q in batch], [q.question for q in batch],
                       key="eval.name", question=question)
        result = generate(*graphs, dict(feed), layout=reduced.layout, cfg=cfg, keep_logits=True)
        texts = [tokenizer.decode([t for t in seq if t != cfg.eos_token_id], skip_special_tokens=True)
                 for seq in result.sequences()]
        return texts, result.step_logits[0]

    return answer


def export_answerer(export_dir: Path, backend: str, max_new_tokens: int, device: str = "cpu") -> Answerer:
    """Answers from an export directory through the runtime on `device` (the compile built it, so it is
    trusted)."""
    from tokcompile.runtime import load

    gen = load(export_dir, backend, trust_export=True, device=device)

    def answer(batch: list[QA]) -> tuple[list[str], Tensor]:
        out = gen.generate([q.image for q in batch], [q.question for q in batch], max_new_tokens=max_new_tokens,
                           first_logits=True)
        return out.texts, out.first_logits

    return answer


def answer_all(answerer: Answerer, data: list[QA], batch_size: int, label: str, log: Log) -> PositionAnswers:
    """Answer every sample in batches, logging progress about every 10% (and the last batch)."""
    texts: list[str] = []
    logits: list[Tensor] = []
    start, shown = time.perf_counter(), 0
    for i in range(0, len(data), batch_size):
        got, first = answerer(data[i : i + batch_size])
        texts.extend(got)
        logits.append(first.float())
        done = min(len(data), i + batch_size)
        if done == len(data) or done - shown >= max(1, len(data) // 10):
            shown = done
            log(f"  {label}: {done}/{len(data)} answered ({time.perf_counter() - start:.1f}s)")
    return PositionAnswers(texts, torch.cat(logits), time.perf_counter() - start)


def summarize(data: list[QA], answers: dict[str, PositionAnswers]) -> dict[str, Any]:
    """Per position: accuracy (overall and per question type), agreement with `pretrain`'s answers and the mean
    first-token KL against `pretrain` (where `pretrain` was evaluated), and the time it took."""
    base = answers.get("pretrain")
    out: dict[str, Any] = {}
    for pos, got in answers.items():
        scores = [vqa_score(t, q.answers) for t, q in zip(got.texts, data)]
        per_type: dict[str, list[float]] = {}
        for s, q in zip(scores, data):
            if q.qtype:
                per_type.setdefault(q.qtype, []).append(s)
        row: dict[str, Any] = {
            "accuracy": sum(scores) / len(scores),
            "per_type": {k: sum(v) / len(v) for k, v in sorted(per_type.items())},
            "seconds": round(got.seconds, 3),
        }
        if base is not None:
            same = [normalize(a) == normalize(b) for a, b in zip(got.texts, base.texts)]
            row["agreement_with_pretrain"] = sum(same) / len(same)
            row["kl_first_token_vs_pretrain"] = float(first_token_kl(base.first_logits, got.first_logits).mean())
        out[pos] = row
    return out


def sample_rows(data: list[QA], answers: dict[str, PositionAnswers]) -> list[dict[str, Any]]:
    return [{"id": q.id, "question": q.question, "answers": list(q.answers), "type": q.qtype,
             **{pos: got.texts[i] for pos, got in answers.items()}} for i, q in enumerate(data)]


class Evaluation:
    """The recipe's `eval:` over one compile: each position answers every dataset when its model is ready
    (`eager` for pretrain, fake_quant and transformed, `exported` after the export is written), then `write`
    scores them and writes `eval.json` and `eval.md` into the export directory."""

    def __init__(self, cfg: Any, log: Log):
        from tokcompile.eval.datasets import load_dataset

        self.cfg, self.log = cfg, log
        self.data = {name: load_dataset(name, cfg.path, cfg.num_samples, cfg.split) for name in cfg.datasets}
        self.answers: dict[str, dict[str, PositionAnswers]] = {name: {} for name in cfg.datasets}

    def check_prompts(self, plan: Any, processor: Any) -> None:
        """Before any answering: every question fits the export's compiled prompt length (`exported` answers
        with the graphs), so a long question fails in seconds, not after the compile."""
        from tokcompile.errors import RecipeError
        from tokcompile.parity import process

        if not self.wants("exported"):
            return
        limit = plan.text_len_range[1]
        question = question_tokenizer(plan)
        for name, data in self.data.items():
            for i in range(0, len(data), 32):
                chunk = data[i : i + 32]
                ids = process(processor, plan.adapter, plan.geometry, [q.image for q in chunk],
                              [q.question for q in chunk], key="eval.name", question=question)["input_ids"]
                if ids.shape[1] > limit:
                    raise RecipeError("inputs.max_prompt_len", f"a question of {name} needs {ids.shape[1]} tokens "
                                                               f"(image tokens included), more than the {limit} the "
                                                               "export is compiled for; raise it")

    def wants(self, position: str) -> bool:
        return position in self.cfg.positions

    def run(self, position: str, answerer: Answerer) -> None:
        for name, data in self.data.items():
            self.answers[name][position] = answer_all(answerer, data, self.cfg.batch_size, f"{position} on {name}",
                                                      self.log)

    def eager(self, position: str, plan: Any, model: Any, processor: Any, reduce: bool) -> None:
        if self.wants(position):
            self.run(position, eager_answerer(plan, model, processor, reduce, self.cfg.max_new_tokens))

    def exported(self, export_dir: Path, device: str = "cpu") -> None:
        if self.wants("exported"):
            self.run("exported", export_answerer(export_dir, self.cfg.backend, self.cfg.max_new_tokens, device))

    def write(self, out_dir: Path) -> dict[str, Any]:
        """Score, log one line per position and dataset, write the files; returns the manifest's `eval` entry."""
        import json

        from tokcompile.eval.report import markdown_table

        results = {}
        for name, data in self.data.items():
            order = {p: self.answers[name][p] for p in self.cfg.positions if p in self.answers[name]}
            summary = summarize(data, order)
            results[name] = {"samples": len(data), "positions": summary, "answers": sample_rows(data, order)}
            for pos, row in summary.items():
                extra = (f", agreement {row['agreement_with_pretrain']:.3f}, first-token KL "
                         f"{row['kl_first_token_vs_pretrain']:.2e}" if "agreement_with_pretrain" in row else "")
                self.log(f"  {name} {pos}: accuracy {row['accuracy']:.3f}{extra}")
        doc = {"config": self.cfg.to_dict(), "datasets": results}
        (out_dir / "eval.json").write_text(json.dumps(doc, indent=1) + "\n")
        (out_dir / "eval.md").write_text(markdown_table(doc))
        return {"json": "eval.json", "markdown": "eval.md",
                "accuracy": {n: {p: r["accuracy"] for p, r in d["positions"].items()} for n, d in results.items()}}
