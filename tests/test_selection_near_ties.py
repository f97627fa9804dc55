"""Selections that differ from eager's at a near-tie: a scored step reports its decision scores, parity replays
eager ranking on a graph's own scores, records the near-tie, and still refuses every other difference.

The "graph" here is eager itself ranking on (and reporting) scores nudged at one pair of neighbours: the two
scores are moved to their midpoint and apart by a hair, so that they rank the other way, as two backends'
rounding can do.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.conftest import ROOT
from tokcompile.errors import ParityError
from tokcompile.generation import GenerationConfig, generate, run_prompt
from tokcompile.graphs import build_modules, eager_runners, replay_runners
from tokcompile.layout import score_names
from tokcompile.models import ReducedVLM
from tokcompile.near_ties import discordance, flipped_decision
from tokcompile.parity import check_artifact, check_generation
from tokcompile.pipeline import plan_recipe
from tokcompile.reduce.ops import rank_desc
from tokcompile.reduce.vispruner import budget


@pytest.fixture(scope="module")
def fastv(tiny_model):
    plan = plan_recipe(ROOT / "recipes" / "demo.yml")  # FastV K=2 in the prefill graph
    return plan, *build_modules(plan, tiny_model)


@pytest.fixture(scope="module")
def vispruner(tiny_model):
    plan = plan_recipe(ROOT / "recipes" / "tiny" / "vispruner.yml")  # the vision graph, several decisions
    return plan, *build_modules(plan, tiny_model)


def nudged(scores: torch.Tensor, position: int) -> tuple[torch.Tensor, float]:
    """Row 0 of (B, n) scores with the neighbours at `position` and `position + 1` of its ranking swapped by the
    smallest move (both to their midpoint, then a hair apart the other way); the move relative to the row max."""
    s = scores.clone().float()
    order = torch.argsort(rank_desc(s[:1]), dim=-1)[0]  # row 0's indices, best first
    hi, lo = int(order[position]), int(order[position + 1])
    mid, gap = (s[0, hi] + s[0, lo]) / 2, float(s[0, hi] - s[0, lo])
    hair = max(gap / 4, 1e-12)
    s[0, hi], s[0, lo] = mid - hair, mid + hair
    return s, (gap / 2 + hair) / float(s[0].abs().max())


def test_scored_steps_report_their_decisions(fastv, vispruner):
    _, reduced, _ = fastv
    assert reduced.layout.score_outputs == ("score_0_0",) and "score_0_0" in reduced.layout.prefill.outputs
    plan, reduced, _ = vispruner
    step = plan.schedule[0]
    assert step.scored > 1  # the attention, then each de-duplication round's similarities
    assert reduced.layout.score_outputs == score_names("kept_0", step.scored)
    assert set(reduced.layout.score_outputs) <= set(reduced.layout.vision.outputs)


def test_a_step_must_make_the_decisions_it_declares(fastv, batch):
    plan, reduced, _ = fastv
    for declared, said in ((2, "called ctx.decision 1 times"), (0, None)):
        schedule = (replace(plan.schedule[0], scored=declared),)
        vlm = ReducedVLM(reduced.model, plan.adapter, plan.geometry, schedule, plan.reducers, plan.image_token_id)
        if said is None:  # undeclared: ranks as before and reports nothing
            out = vlm.run(batch)
            assert not any(n.startswith("score_") for n in out) and out["kept_0"].shape[1] == plan.schedule[0].n_out
            continue
        with pytest.raises(ValueError, match=said):
            vlm.run(batch)


def _vision_case(plan, reduced, batch):
    feed = {n: batch[n] for n in reduced.layout.vision.inputs}
    with torch.no_grad():
        eager = reduced.vision.run(feed)
    return feed, eager


def test_vispruner_near_tie_is_replayed_and_recorded(vispruner, batch):
    plan, reduced, decode = vispruner
    names = list(reduced.layout.vision.outputs)
    feed, eager = _vision_case(plan, reduced, batch)
    cfg = plan.reducers[0]
    _, important = budget(plan.schedule[0].n_in - 1, cfg.prune_ratio, cfg.important_ratio)  # CLS is not a patch
    # the last important patch and the first candidate trade places: another important set
    forced, move = nudged(eager["score_0_0"], important - 1)

    def graph(inputs):
        with torch.no_grad():
            out = reduced.vision.run(inputs, {"score_0_0": forced})
        return tuple({**out, "score_0_0": forced}[n] for n in names)  # it reports what it ranked on

    got = dict(zip(names, graph(feed)))
    assert not torch.equal(got["kept_0"], eager["kept_0"])  # the nudge really changed the selection
    case = [(feed, tuple(eager[n] for n in names))]
    replay = replay_runners(reduced, decode, reduced.layout)["vision"]
    report = check_artifact("vision (nudged)", graph, names, case, 1e-5, 1e-5, replay=replay, score_margin=2 * move)
    tie = report["near_ties"][0]
    assert tie["kind"] == "selection" and tie["decision"] == "score_0_0" and "kept_0" in tie["differ"]
    assert tie["discordant_neighbours"] == 1 and tie["max_relative_score_gap"] <= 2 * move
    print(f"nudge {move:.2e} of the row max; recorded: {tie}")

    with pytest.raises(ParityError, match="kept_0 indices differ"):  # without a replay: a plain failure
        check_artifact("vision (nudged)", graph, names, case, 1e-5, 1e-5)
    with pytest.raises(ParityError, match="beyond the near-tie margin"):  # a move larger than the margin
        check_artifact("vision (nudged)", graph, names, case, 1e-5, 1e-5, replay=replay, score_margin=move / 4)


def test_a_wrong_selection_fails_even_when_replayed(vispruner, batch):
    """Scores equal to eager's but another patch kept: the replay ranks as eager did, and parity fails."""
    plan, reduced, decode = vispruner
    names = list(reduced.layout.vision.outputs)
    feed, eager = _vision_case(plan, reduced, batch)
    kept = eager["kept_0"].clone()
    dropped = sorted(set(range(1, plan.schedule[0].n_in)) - set(kept[0].tolist()))
    kept[0, -1] = dropped[-1] if dropped[-1] > int(kept[0, -2]) else dropped[0]
    kept = kept.sort(dim=-1).values

    def graph(inputs):
        with torch.no_grad():
            out = reduced.vision.run(inputs, {"kept_0": kept})
        return tuple({**out, **{n: eager[n] for n in reduced.layout.score_outputs}}[n] for n in names)

    case = [(feed, tuple(eager[n] for n in names))]
    replay = replay_runners(reduced, decode, reduced.layout)["vision"]
    with pytest.raises(ParityError, match="indices differ"):
        check_artifact("vision (wrong)", graph, names, case, 1e-5, 1e-5, replay=replay)


def test_numbers_wrong_for_another_reason_still_fail_after_the_replay(vispruner, batch):
    """A graph with eager's selection and scores but other features: the comparison fails, eager is replayed on
    the graph's scores (the same as its own), and the replay's comparison fails as plainly."""
    plan, reduced, decode = vispruner
    names = list(reduced.layout.vision.outputs)
    feed, eager = _vision_case(plan, reduced, batch)
    wrong = {**eager, "image_embeds": eager["image_embeds"] + 1e-3}
    case = [(feed, tuple(eager[n] for n in names))]
    replay = replay_runners(reduced, decode, reduced.layout)["vision"]
    with pytest.raises(ParityError, match=r"image_embeds differs from eager by .*deciding on the graph's decision"):
        check_artifact("vision (wrong numbers)", lambda inputs: tuple(wrong[n] for n in names), names, case, 1e-5,
                       1e-5, replay=replay)


@pytest.fixture(scope="module")
def ficoco(tiny_model):
    plan = plan_recipe(ROOT / "recipes" / "tiny" / "ficoco.yml")  # FiCoCo-V: discards, then each one's target
    return plan, *build_modules(plan, tiny_model)


def test_a_target_flip_that_shows_only_in_the_numbers_is_replayed(ficoco, batch):
    """FiCoCo-V's second decision (each discarded token's target) shows in no index output: a graph whose target
    differs from eager's at a near-tie keeps the same tokens and merges other features. Parity replays eager on
    the graph's scores there too and records a "decision" near-tie; without the replay it is a plain failure."""
    plan, reduced, decode = ficoco
    names = list(reduced.layout.vision.outputs)
    feed, eager = _vision_case(plan, reduced, batch)
    t, r = plan.schedule[0].n_in, plan.schedule[0].n_in - plan.schedule[0].n_out
    rows = eager["score_0_1"].reshape(-1, r, t)
    allowed = torch.full((t,), float("-inf"))
    allowed[eager["kept_0"][0]] = 0  # targets are kept tokens (CLS included)
    best = (rows[0, 0] + allowed).topk(2).indices  # the first discarded token's best two targets
    nudged_rows = rows.clone()
    hi, lo = int(best[0]), int(best[1])
    mid, gap = (rows[0, 0, hi] + rows[0, 0, lo]) / 2, float(rows[0, 0, hi] - rows[0, 0, lo])
    nudged_rows[0, 0, hi], nudged_rows[0, 0, lo] = mid - gap / 4, mid + gap / 4
    forced = nudged_rows.reshape(eager["score_0_1"].shape)
    move = (gap * 3 / 4) / float(rows[0].abs().max())

    def graph(inputs):
        with torch.no_grad():
            out = reduced.vision.run(inputs, {"score_0_1": forced})
        return tuple({**out, "score_0_1": forced}[n] for n in names)

    got = dict(zip(names, graph(feed)))
    assert torch.equal(got["kept_0"], eager["kept_0"])  # the same tokens stay
    case = [(feed, tuple(eager[n] for n in names))]
    with pytest.raises(ParityError, match="image_embeds differs from eager"):
        check_artifact("vision (retargeted)", graph, names, case, 1e-5, 1e-5)
    replay = replay_runners(reduced, decode, reduced.layout)["vision"]
    report = check_artifact("vision (retargeted)", graph, names, case, 1e-5, 1e-5, replay=replay,
                            score_margin=2 * move)
    tie = report["near_ties"][0]
    assert tie["kind"] == "decision" and tie["differ"] == {} and tie["decision"] == "score_0_1"
    assert tie["discordant_neighbours"] >= 1


def test_fastv_near_tie_in_generation(fastv, batch):
    """A prefill graph whose FastV selection differs at a near-tie: generation parity replays eager with its
    scores, so tokens and logits are compared against the same selection, and the near-tie is recorded."""
    plan, reduced, decode = fastv
    cfg = GenerationConfig(max_new_tokens=4)
    with torch.no_grad():
        eager_scores = run_prompt(*eager_runners(reduced, decode)[:2], reduced.layout, batch)["score_0_0"]
    forced, move = nudged(eager_scores, plan.schedule[0].n_out - 1)  # the last kept and the first dropped
    graph = generate(*eager_runners(reduced, decode, {"score_0_0": forced}), batch, layout=reduced.layout, cfg=cfg,
                     keep_logits=True)
    graph.scores["score_0_0"] = forced  # it reports what it ranked on
    eager = generate(*eager_runners(reduced, decode), batch, layout=reduced.layout, cfg=cfg, keep_logits=True)
    assert not torch.equal(graph.kept["kept_0"], eager.kept["kept_0"])

    def replay(scores):
        return generate(*eager_runners(reduced, decode, scores), batch, layout=reduced.layout, cfg=cfg,
                        keep_logits=True)

    row = check_generation("generation (nudged)", graph, eager, 1e-5, 1e-5, "on case 0", replay=replay,
                           score_margin=2 * move)
    assert row["near_ties"][0]["decision"] == "score_0_0" and list(row["near_ties"][0]["differ"]) == ["kept_0"]
    assert "note" not in row  # every generated token was compared
    with pytest.raises(ParityError, match="kept_0 differs from eager's selection"):
        check_generation("generation (nudged)", graph, eager, 1e-5, 1e-5, "on case 0")


def test_discordance_counts_neighbours_compared_the_other_way():
    ref = torch.tensor([[0.5, 0.4, 0.3, 0.2]])
    assert discordance(ref.clone(), ref)["discordant_neighbours"] == 0
    swapped = discordance(torch.tensor([[0.5, 0.3, 0.4, 0.2]]), ref)
    assert swapped["discordant_neighbours"] == 1 and swapped["largest_discordant_gap"] == pytest.approx(0.1)
    assert swapped["largest_discordant_gap_relative"] == pytest.approx(0.2)
    tied = torch.tensor([[0.5, 0.4, 0.4, 0.2]])
    assert discordance(tied.clone(), tied)["discordant_neighbours"] == 0  # equal on both sides
    # eager's exact tie broken by the graph (a strict comparison flips): one neighbour pair, eager's gap 0
    split = discordance(torch.tensor([[0.5, 0.4, 0.4000001, 0.2]]), tied)
    assert split["discordant_neighbours"] == 1 and split["largest_discordant_gap"] == 0.0
    merged = discordance(torch.tensor([[0.5, 0.3, 0.3, 0.2]]), ref)  # eager's strict order made a tie
    assert merged["discordant_neighbours"] == 1 and merged["largest_discordant_gap"] == pytest.approx(0.1)
    far = discordance(torch.tensor([[0.2, 0.4, 0.3, 0.5]]), ref)  # a swap of distant entries shows in neighbours
    assert far["discordant_neighbours"] >= 1


def test_the_recorded_decision_is_the_one_whose_flip_changed_the_selection():
    """Two steps, two score vectors each; only the graph's score_1_0 makes eager select as the graph did. The
    record names it: the shortest prefix of the graph's vectors with which eager agrees with the graph ends
    there, though score_0_0 is ordered differently too (rounding no decision depended on) and the replay
    computes step 1's later vectors from the graph's numbers."""
    order = ["score_0_0", "score_0_1", "score_1_0", "score_1_1"]
    runs = []

    def agrees(prefix):  # eager keeps the graph's step-1 set only when ranking on the graph's score_1_0
        runs.append(list(prefix))
        return "score_1_0" in prefix

    assert flipped_decision(order, agrees) == "score_1_0" and len(runs) == 2  # log2(4) prefixes tried
    assert flipped_decision(order[:1], agrees) == "score_0_0" and len(runs) == 2  # one vector: no run
    runs.clear()
    assert flipped_decision(order, lambda prefix: runs.append(prefix) or True) == "score_0_0" and len(runs) == 2
