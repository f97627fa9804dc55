"""`Generator.score`: teacher-forced log-probabilities of given answers through the export's own graphs."""

from __future__ import annotations

import pytest
import torch

from tokcompile import runtime
from tokcompile.data import shapes
from tokcompile.errors import RecipeError
from tokcompile.generation import GenerationConfig, generate


@pytest.fixture(scope="module")
def gen(demo_export):
    return runtime.load(demo_export, backend="onnxruntime")


def test_the_greedy_answer_scores_as_greedy_with_the_generated_logits(gen):
    """Score each greedy answer (3 samples: more than the compiled batch of 2, so two chunks) and compare with
    the step logits generation chose it from: the same log-probabilities, and greedy True."""
    items = shapes.samples("validation", 3)
    images, questions = [s.image for s in items], [s.question for s in items]
    n = 4
    answer = gen.generate(images, questions, max_new_tokens=n, stop_at_eos=False)
    scores = gen.score(images, questions, answer.token_ids)  # as ids: random bytes need not decode to text
    for i, s in enumerate(scores):
        batch = gen._batch(images[i:i + 1], questions[i:i + 1], "auto")
        want = generate(*gen.graphs, batch, layout=gen.layout, cfg=GenerationConfig(max_new_tokens=n),
                        keep_logits=True)
        tokens = want.tokens[0].tolist()
        expected = sum(float(step[0].log_softmax(-1)[tok]) for step, tok in zip(want.step_logits, tokens))
        assert tokens == answer.token_ids[i] and s.tokens == n
        assert s.greedy, f"sample {i}: its own greedy answer does not score as greedy"
        assert s.logprob == pytest.approx(expected, abs=1e-4)


def test_another_answer_is_not_greedy_and_less_likely(gen):
    item = shapes.sample("validation", 0)
    greedy = gen.generate([item.image], [item.question], max_new_tokens=1, stop_at_eos=False).token_ids[0]
    other = [greedy[0] + 1]
    s_greedy, s_other = gen.score([item.image] * 2, [item.question] * 2, [greedy, other])
    assert s_greedy.greedy and not s_other.greedy
    assert s_other.logprob < s_greedy.logprob
    assert torch.isfinite(torch.tensor([s_greedy.logprob, s_other.logprob])).all()


def test_mismatched_lists_and_empty_continuations_are_refused(gen):
    item = shapes.sample("validation", 0)
    with pytest.raises(RecipeError, match="one of each"):
        gen.score([item.image], [item.question, item.question], ["a"])
    with pytest.raises(RecipeError, match="non-empty continuation"):
        gen.score([item.image], [item.question], [""])
