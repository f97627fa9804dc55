"""The generation loop: sampling, EOS handling, and cached decode against the no-cache reference."""

from __future__ import annotations

import torch

from tests.conftest import ROOT
from tokcompile.generation import GenerationConfig, choose, generate, no_cache_logits
from tokcompile.graphs import build_modules, eager_runners
from tokcompile.pipeline import plan_recipe


def test_greedy_and_seeded_sampling():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])
    assert choose(logits, GenerationConfig(), None).tolist() == [1, 0]
    cfg = GenerationConfig(temperature=1.0, seed=3)
    a = choose(logits.repeat(50, 1), cfg, torch.Generator().manual_seed(3))
    b = choose(logits.repeat(50, 1), cfg, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and len(set(a.tolist())) > 1  # reproducible, and really sampling
    cfg = GenerationConfig(temperature=1.0, top_p=0.5)
    nucleus = choose(logits.repeat(50, 1), cfg, torch.Generator().manual_seed(0))
    assert set(nucleus[0::2].tolist()) == {1} and set(nucleus[1::2].tolist()) == {0}  # top_p keeps only the top token


def _modules(tiny_model):
    plan = plan_recipe(ROOT / "recipes" / "demo.yml")
    reduced, decode = build_modules(plan, tiny_model)
    return plan, reduced, eager_runners(reduced, decode)


def test_cached_decode_equals_no_cache_reference(tiny_model, batch):
    plan, reduced, graphs = _modules(tiny_model)
    run = generate(*graphs, batch, layout=reduced.layout, cfg=GenerationConfig(max_new_tokens=8), keep_logits=True)
    assert run.tokens.shape == (2, 8)
    ref = no_cache_logits(reduced, batch, run)
    for t in range(8):
        torch.testing.assert_close(run.step_logits[t], ref[t], atol=1e-5, rtol=1e-5)


def test_padding_never_changes_a_sample(tiny_model, batch):
    _, reduced, graphs = _modules(tiny_model)
    cfg = GenerationConfig(max_new_tokens=8)
    both = generate(*graphs, batch, layout=reduced.layout, cfg=cfg, keep_logits=True)
    for b in range(2):
        m = batch["attention_mask"][b].bool()
        one = {"input_ids": batch["input_ids"][b : b + 1, m], "attention_mask": batch["attention_mask"][b : b + 1, m],
               "pixel_values": batch["pixel_values"][b : b + 1]}
        alone = generate(*graphs, one, layout=reduced.layout, cfg=cfg, keep_logits=True)
        assert torch.equal(alone.tokens[0], both.tokens[b])
        assert torch.equal(alone.kept["kept_0"][0], both.kept["kept_0"][b])
        for t in range(8):
            torch.testing.assert_close(alone.step_logits[t][0], both.step_logits[t][b], atol=1e-5, rtol=1e-5)


def test_eos_stops_a_sample(tiny_model, batch):
    _, reduced, graphs = _modules(tiny_model)
    free = generate(*graphs, batch, layout=reduced.layout, cfg=GenerationConfig(max_new_tokens=6))
    eos = int(free.tokens[0, 2])  # pretend sample 0's third token is EOS
    run = generate(*graphs, batch, layout=reduced.layout, cfg=GenerationConfig(max_new_tokens=6, eos_token_id=eos))
    first = free.tokens[0].tolist().index(eos)
    assert run.lengths[0] == first + 1 and run.sequences()[0] == free.tokens[0, : first + 1].tolist()
    assert all(int(t) == eos for t in run.tokens[0, first:])
