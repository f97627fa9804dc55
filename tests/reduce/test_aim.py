"""Static AIM (in-decoder PageRank pruning) against the independent masking reference written the official way:
exact where the reference's walk leaves out the pruned tokens' rows (what removing them does), and measured
against the official walk, which keeps them."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import ROOT, compile_recipe, padded_family_case
from tests.references.aim import aim_reference
from tokcompile.errors import RecipeError
from tokcompile.models import ReducedVLM
from tokcompile.reduce.aim import AIMConfig, retain_ratio
from tokcompile.reduce.base import Entering

SCHEDULES = [
    {"prune_scheduler": "piecewise", "prune_start_layer": 1, "prune_end_layer": 2},
    {"prune_scheduler": "linear", "final_prune_ratio": 0.9},
    {"prune_scheduler": "exponential", "final_prune_ratio": 0.9},
    {"prune_scheduler": "step", "final_prune_ratio": 0.6},
    {"prune_scheduler": "cosine", "final_prune_ratio": 0.95},
]


@pytest.fixture(scope="module", params=["llava", "qwen2_5_vl", "llava_onevision"])
def fam(request) -> SimpleNamespace:
    return padded_family_case(request.param)


def _vlm(f, params):
    cfg = AIMConfig(**params)
    schedule = cfg.plan(f.geom, "sparse.special", Entering.start(f.geom))
    return ReducedVLM(f.model, f.adapter, f.geom, schedule, (cfg,) * len(schedule), f.image_id).eval(), schedule, cfg


def _retain(f, cfg):
    return [retain_ratio(cfg.prune_scheduler, layer, f.geom.n_layers, cfg.final_prune_ratio, cfg.prune_start_layer,
                         cfg.prune_end_layer) for layer in range(f.geom.n_layers)]


def _original_indices(out: dict, b: int, n_steps: int) -> list[list[int]]:
    """Every step's kept tokens as indices into the ORIGINAL image span (the steps give them relative to the
    tokens entering each step)."""
    current, result = None, []
    for j in range(n_steps):
        kept = out[f"kept_{j}"][b].tolist()
        current = kept if current is None else [current[i] for i in kept]
        result.append(current)
    return result


@pytest.mark.parametrize("params", SCHEDULES, ids=[p["prune_scheduler"] for p in SCHEDULES])
def test_static_aim_matches_the_reference_without_pruned_rows(fam, params):
    vlm, schedule, cfg = _vlm(fam, params)
    with torch.no_grad():
        out = vlm.run({n: fam.batch[n] for n in fam.adapter.input_names_for(fam.geom)})
    retain = _retain(fam, cfg)
    for b in range(2):
        sample = fam.adapter.sample_inputs(fam.batch, b, fam.geom)
        logits, kept, _ = aim_reference(fam.model, fam.adapter, sample, image_token_id=fam.image_id,
                                        retain=retain, walk_masked_rows=False)
        assert [k.tolist() for k in kept] == _original_indices(out, b, len(schedule))
        torch.testing.assert_close(out["logits"][b], logits, atol=1e-5, rtol=1e-5)


def test_the_official_walk_over_pruned_rows_is_measured(fam):
    """The official code keeps pruned tokens as queries, and their rows enter the PageRank walk; here they are
    gone. With one pruning step (nothing pruned before it) the two agree exactly; after it they may part."""
    vlm, schedule, cfg = _vlm(fam, SCHEDULES[1])  # linear: a pruning step after every layer
    with torch.no_grad():
        out = vlm.run({n: fam.batch[n] for n in fam.adapter.input_names_for(fam.geom)})
    retain = _retain(fam, cfg)
    overlaps = []
    for b in range(2):
        sample = fam.adapter.sample_inputs(fam.batch, b, fam.geom)
        _, official, _ = aim_reference(fam.model, fam.adapter, sample, image_token_id=fam.image_id, retain=retain)
        ours = _original_indices(out, b, len(schedule))
        assert official[0].tolist() == ours[0]  # the first step walks the same rows
        for o, s in zip(official[1:], ours[1:]):
            if len(s):
                overlaps.append(len(set(o.tolist()) & set(s)) / len(s))
    worst = min(overlaps) if overlaps else 1.0
    print(f"{fam.family}: kept-set overlap with the official walk after the first step: {worst:.3f} (min over "
          "steps and samples)")
    assert worst >= 0.9  # measured 1.000 on both tiny models (README); a bound, not a guarantee of the method


def test_schedules_compile_to_counts():
    f = padded_family_case("llava")
    N = f.geom.n_image_tokens
    steps = AIMConfig(prune_start_layer=1, prune_end_layer=2).plan(f.geom, "k", Entering.start(f.geom))
    assert [(s.layer, s.n_in, s.n_out) for s in steps] == [(2, N, N // 2), (3, N // 2, 0)]
    # the official 28-layer schedule: 87.5% survive layer 14, none after layer 21
    assert [retain_ratio("piecewise", layer, 28, 0.0, 14, 21) for layer in (13, 14, 15, 20, 21)] == [
        1.0, 0.875, 0.75, 0.125, 0.0]
    assert retain_ratio("linear", 16, 32, 0.7, 0, 0) == pytest.approx(0.65)
    assert retain_ratio("step", 15, 32, 0.7, 0, 0) == 1.0
    assert retain_ratio("step", 16, 32, 0.7, 0, 0) == pytest.approx(0.3)
    assert retain_ratio("cosine", 32, 32, 0.7, 0, 0) == pytest.approx(0.3)
    assert retain_ratio("exponential", 32, 32, 0.7, 0, 0) == pytest.approx(0.3)


@pytest.mark.parametrize("params,key,text", [
    ({"merge_ratio": 0.6}, "merge_ratio", "is not 1 - 2^-k"),
    ({"prune_scheduler": "fast"}, "prune_scheduler", "unknown scheduler"),
    ({"prune_start_layer": 3, "prune_end_layer": 3}, "prune_start_layer", "leaves no layer"),
    ({"prune_start_layer": 2, "prune_end_layer": 1}, "prune_start_layer", "start <= end"),
    ({"prune_scheduler": "linear", "final_prune_ratio": 1.5}, "final_prune_ratio", "outside [0, 1]"),
    ({"prune_scheduler": "linear", "final_prune_ratio": 0.0}, "prune_scheduler", "prunes no image token"),
    ({"tau_imp": 0}, "tau_imp", "above 0"),
    ({"iters": 0}, "iters", "at least 1"),
])
def test_plan_errors_name_the_key(params, key, text):
    f = padded_family_case("llava")
    with pytest.raises(RecipeError, match=re.escape(text)) as e:
        AIMConfig(**{"prune_start_layer": 1, "prune_end_layer": 2, **params}).plan(f.geom, "sparse.special",
                                                                                  Entering.start(f.geom))
    assert e.value.key == f"sparse.special.{key}"


def test_tiny_recipe_compiles_with_parity(tmp_path):
    """Both stages end to end (aim_merge.yml: a merge at the projector output, then two pruning steps)."""
    res = compile_recipe(ROOT / "recipes" / "tiny" / "aim_merge.yml", tmp_path / "aim", "--targets", "onnx")
    assert res.returncode == 0, res.stderr + res.stdout
    assert "onnx: vision, prefill and decode parity passed; greedy generation equals eager" in res.stdout
    assert "eager generation with KV cache equals the no-cache reference" in res.stdout


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_stage1_merge_then_pruning_matches_the_official_merge(family):
    """Stage 1 (merge_ratio 0.75: two halving iterations at the projector output) then stage 2: the merged
    tokens' order and representatives equal the official `bipartite_soft_matching_merge`, the kept tokens and
    the logits equal the reference's."""
    f = padded_family_case(family)
    params = {"merge_ratio": 0.75, "prune_start_layer": 1, "prune_end_layer": 2}
    vlm, schedule, cfg = _vlm(f, params)
    N = f.geom.n_image_tokens
    assert [(s.method, s.n_in, s.n_out) for s in schedule[:2]] == [("aim_merge", N, N // 2),
                                                                    ("aim_merge", N // 2, N // 4)]
    names = list(vlm.layout.step_outputs)
    with torch.no_grad():
        out = vlm.run({n: f.batch[n] for n in f.adapter.input_names_for(f.geom)})
    retain = _retain(f, cfg)
    for b in range(2):
        sample = f.adapter.sample_inputs(f.batch, b, f.geom)
        logits, kept, rep = aim_reference(f.model, f.adapter, sample, image_token_id=f.image_id, retain=retain,
                                          walk_masked_rows=False, merge_iterations=2)
        assert out["image_source"][b].tolist() == rep.tolist()
        current, ours = None, []
        for name in names[2:]:
            k = out[name][b].tolist()
            current = k if current is None else [current[i] for i in k]
            ours.append(current)
        assert [k.tolist() for k in kept] == ours
        torch.testing.assert_close(out["logits"][b], logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("merge_ratio", [None, 0.75])
def test_video_merges_each_frame_then_prunes_like_the_reference(merge_ratio):
    """LLaVA-OneVision video (4 frames): stage 1 merges within every frame, never across (the official code
    merges the pooled frames as a batch), the newline after the frames passes unchanged; then stage 2 over the
    whole span. Merge order and representatives, kept tokens and logits equal the reference's."""
    frames = 4
    f = padded_family_case("llava_onevision", video_frames=frames)
    params = {"merge_ratio": merge_ratio, "prune_start_layer": 1, "prune_end_layer": 2}
    vlm, schedule, cfg = _vlm(f, params)
    N = f.geom.n_image_tokens
    t0 = (N - 1) // frames  # the tiny tower's pooled frame; one newline after the frames
    merges = 2 if merge_ratio else 0
    want = [(N, N - frames * (t0 // 2)), (N - frames * (t0 // 2), N - frames * (t0 // 2 + t0 // 4))][:merges]
    assert [(s.n_in, s.n_out) for s in schedule[:merges]] == want
    names = list(vlm.layout.step_outputs)
    with torch.no_grad():
        out = vlm.run({n: f.batch[n] for n in f.adapter.input_names_for(f.geom)})
    for b in range(2):
        sample = f.adapter.sample_inputs(f.batch, b, f.geom)
        logits, kept, rep = aim_reference(f.model, f.adapter, sample, image_token_id=f.image_id,
                                          retain=_retain(f, cfg), walk_masked_rows=False, merge_iterations=merges,
                                          frames=(sample["pixel_values_videos"].shape[1], 1))
        assert out["image_source"][b].tolist() == rep.tolist()
        if merges:  # no source crosses a frame: every merged token stands for a token of its own frame
            n_out = schedule[merges - 1].n_out
            per = (n_out - 1) // frames
            assert [int(s) // t0 for s in rep[:-1]] == [i // per for i in range(n_out - 1)]
        current, ours = None, []
        for name in names[merges:]:
            k = out[name][b].tolist()
            current = k if current is None else [current[i] for i in k]
            ours.append(current)
        assert [k.tolist() for k in kept] == ours
        torch.testing.assert_close(out["logits"][b], logits, atol=1e-5, rtol=1e-5)


def test_stage1_is_refused_where_the_span_holds_tiles():
    f = padded_family_case("llava_onevision")
    with pytest.raises(RecipeError, match="one image's grid or one video frame"):
        AIMConfig(merge_ratio=0.5, prune_start_layer=1, prune_end_layer=2).plan(f.geom, "k", Entering.start(f.geom))


def test_one_image_grid_is_what_stage_1_needs():
    """The geometry says whether the image span is one image's grid (LLaVA-1.5 and the Qwen families, not the
    tiled families or video) and where a video's frames lie (OneVision: 4 frames, then one newline)."""
    from tests.reduce.test_contract import FAMILY_RECIPES
    from tokcompile.pipeline import plan_recipe

    grid = {case: plan_recipe(ROOT / path).geometry.one_image_grid for case, path in FAMILY_RECIPES.items()}
    assert grid == {"llava": True, "llava_next": False, "llava_onevision": False, "llava_onevision_video": False,
                    "qwen2_vl": True, "qwen2_5_vl": True, "qwen3_vl": True}
    frames = {case: plan_recipe(ROOT / path).geometry.frames for case, path in FAMILY_RECIPES.items()}
    assert frames == {**{case: None for case in FAMILY_RECIPES}, "llava_onevision_video": (4, 1)}


def test_stage1_merges_follow_the_matrices_decide_returns():
    """Stage 1 hands `ctx.decision` each sample's cosine matrices of every frame together ((B, F, na, nb))
    and merges as it returns: a replay making a source of frame 1 the strongest match of its frame, to another
    destination, moves that merge and leaves frame 0's alone."""
    from tokcompile.reduce.aim_merge import merge_step
    from tokcompile.reduce.schedule import Output, Site, Step
    from tokcompile.reduce.state import ImageTokens

    frames, t, r, B = 2, 8, 2, 2
    n = frames * t + 1  # one trailing token after the frames
    x = torch.randn(B, n, 6, generator=torch.Generator().manual_seed(3))
    state = ImageTokens(x, torch.arange(n).expand(B, n))
    step = Step("aim_merge", Site.PROJECTOR_OUT, 0, n, n - frames * r, Output.ASSIGN, scored=1)
    seen = []
    _, base = merge_step(state, step, (frames, 1), None, lambda s: seen.append(s) or s)
    na, nb = (t + 1) // 2, t // 2
    assert len(seen) == 1 and seen[0].shape == (B, frames, na, nb) and bool(seen[0].isfinite().all())
    slots = t - r  # each frame's output slots
    unmerged = [i for i in range(na) if base[0, t + 2 * i] < slots + (na - r)]  # frame 1's sources that stay
    source, dest = unmerged[0], 0

    def favour(s):
        s = s.clone()
        s[0, 1, source, dest] = s.max() + 1  # frame 1's source `source` now matches destination 0 best of all
        return s

    _, moved = merge_step(state, step, (frames, 1), None, favour)
    assert int(moved[0, t + 2 * source]) == slots + (na - r) + dest
    assert torch.equal(moved[:, :t], base[:, :t]) and torch.equal(moved[1], base[1])
