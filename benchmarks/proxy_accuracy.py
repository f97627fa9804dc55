"""Does the tuner's proxy predict accuracy? The KL proxy of `python -m tokcompile tune` against the accuracy of
the same reductions, on the built-in trained model, in one run.

    python benchmarks/proxy_accuracy.py                            # every point of sweeps/shapes_budgets.yml
    python benchmarks/proxy_accuracy.py --prompts 4 --questions 32 --limit 3   # smoke run

For every point of a sweep file whose base recipe uses the trained model (`tiny-trained:shapes`), with the
point's reduction and no quantization (the tuner's proxy leaves quantization out too):
  kl@1, kl@N     the tuner's proxy (`tokcompile.tune.answer_drift`): the mean KL of the reduced model's next-token
                 distribution from the unreduced one's at the first answer position only (`answer_tokens: 1`)
                 and at every position of the unreduced model's greedy answer (at most N tokens, up to its
                 EOS; the default N = 8),
                 on `--prompts` questions of the shapes *validation* split
  agree@N        top-1 agreement over the same positions
  accuracy       the reduced eager model's answers to the first `--questions` questions of the *test* split
                 (the score `eval` uses; the uncompressed model's on the first line)
Then the Spearman rank correlation of accuracy with -kl@1, -kl@N and agree@N over the points: how well each
proxy orders reductions by what they cost in accuracy. The two splits are drawn from different seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def spearman(x: list[float], y: list[float]) -> float:
    """Rank correlation of two lists (average ranks for ties); nan when either is constant."""
    import numpy as np

    def ranks(v: list[float]) -> np.ndarray:
        a = np.asarray(v, dtype=float)
        order = a.argsort(kind="stable")
        r = np.empty(len(a))
        r[order] = np.arange(len(a), dtype=float)
        for value in np.unique(a):  # ties share their mean rank
            tied = a == value
            r[tied] = r[tied].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def accuracy(plan, model, processor, questions, reduce: bool, batch_size: int = 16) -> float:
    """The eager model's accuracy (with the plan's reduction, or none), answered and scored as `eval` does."""
    from tokcompile.eval.run import answer_all, eager_answerer, summarize

    answer = eager_answerer(plan, model, processor, reduce, max_new_tokens=8)  # eval.max_new_tokens' default
    got = answer_all(answer, questions, batch_size, "eager", lambda line: None)
    return summarize(questions, {"eager": got})["eager"]["accuracy"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweep", default=str(ROOT / "sweeps/shapes_budgets.yml"))
    ap.add_argument("--prompts", type=int, default=16, help="validation questions the proxy runs on")
    ap.add_argument("--answer-tokens", type=int, default=8, help="N: positions of the unreduced answer compared")
    ap.add_argument("--questions", type=int, default=200, help="test questions each point answers")
    ap.add_argument("--limit", type=int, default=0, help="only the first points (0: every one)")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()

    from tokcompile.errors import TokcompileError
    from tokcompile.eval.datasets import load_dataset
    from tokcompile.generation import Generated
    from tokcompile.models.loading import load_model, load_processor
    from tokcompile.parity import process
    from tokcompile.sweep import load_sweep
    from tokcompile.tune import _plan, answer_drift, unreduced_answers

    sweep = load_sweep(args.sweep)
    points = sweep.points[: args.limit or None]
    first = _plan(points[0].recipe)
    if first.recipe.model.path != "tiny-trained:shapes":
        print(f"error: {args.sweep}: the base model is {first.recipe.model.path}; this check needs tiny-trained:shapes "
              "(its questions have answers)", file=sys.stderr)
        return 2
    model = load_model(first.recipe.model.path, first.config, first.recipe.base.seed, False)
    processor = load_processor(first.recipe.model.path, False)
    unreduced = dataclasses.replace(first, schedule=(), reducers=())
    calib = load_dataset("shapes", None, args.prompts, split="validation")
    batches = [process(processor, first.adapter, first.geometry, [q.image], [q.question], key="benchmark")
               for q in calib]
    test = load_dataset("shapes", None, args.questions, split="test")
    t0 = time.perf_counter()
    answers = unreduced_answers(unreduced, model, batches, args.answer_tokens)
    firsts = [Generated(a.tokens[:, :1], [1], a.step_logits[:1]) for a in answers]
    base_acc = accuracy(first, model, processor, test, reduce=False)
    print(f"{len(points)} points; proxy on {len(batches)} validation questions, accuracy on {len(test)} test "
          f"questions; uncompressed accuracy {base_acc:.3f}", flush=True)
    n = args.answer_tokens
    print(f"{'point':58s} {'flops':>6s} {'kl@1':>9s} {f'kl@{n}':>9s} {f'agree@{n}':>8s} {'accuracy':>8s}")
    rows = []
    for p in points:
        try:
            plan = _plan(p.recipe)
        except TokcompileError as e:  # a point this model cannot plan is one line, as in the sweep
            print(f"{_label(p):58s} skipped: {str(e).splitlines()[0]}")
            continue
        if plan.question is not None:
            print(f"{_label(p):58s} skipped: reads the question through a text encoder")
            continue
        kl1, _ = answer_drift(plan, model, batches, firsts)
        kln, agree = answer_drift(plan, model, batches, answers)
        acc = accuracy(plan, model, processor, test, reduce=True)
        ratio = plan.flops["total_exact"]["ratio"]
        rows.append({"point": _label(p), "flops_ratio": ratio, "kl_first": kl1, "kl_answer": kln,
                     "agree_answer": agree, "accuracy": acc})
        print(f"{_label(p):58s} {ratio:6.3f} {kl1:9.3g} {kln:9.3g} {agree:8.3f} {acc:8.3f}", flush=True)
    acc = [r["accuracy"] for r in rows]
    corr = {"kl@1": spearman([-r["kl_first"] for r in rows], acc),
            f"kl@{n}": spearman([-r["kl_answer"] for r in rows], acc),
            f"agree@{n}": spearman([r["agree_answer"] for r in rows], acc)}
    print(f"Spearman correlation with accuracy over {len(rows)} points: "
          + ", ".join(f"{k} {v:+.3f}" for k, v in corr.items()) + f" ({time.perf_counter() - t0:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"uncompressed_accuracy": base_acc, "rows": rows,
                                               "spearman": corr}, indent=2) + "\n")
    return 0


def _label(point) -> str:
    sparse = point.recipe.get("sparse", {})
    special = sparse.get("special") or sparse.get("vision", {}).get("special", {})
    return json.dumps(special, separators=(",", ":"))[:58]


if __name__ == "__main__":
    sys.exit(main())
