"""Static ToMe (CLIP vision tower) against the independent LightCompress-style reference, padding, the merge
itself, plan errors and counts, the family refusal, and one full compile."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, assert_no_data_dependent_ops, compile_recipe, export_matching_eager
from tests.references.tome import bipartite_merge, tome_reference, tome_schedule
from tokcompile.errors import RecipeError
from tokcompile.models import ReducedVLM
from tokcompile.reduce.base import Entering, config_from_params
from tokcompile.reduce.context import VisionContext
from tokcompile.reduce.schedule import Output, Site, Step
from tokcompile.reduce.state import ImageTokens
from tokcompile.reduce.tome import ToMeConfig

KEY = "sparse.vision.special"


def _vlm(model, adapter, geometry, **params):
    cfg = ToMeConfig(**params)
    schedule = cfg.plan(geometry, KEY, Entering.start(geometry))
    return ReducedVLM(model, adapter, geometry, schedule, (cfg,) * len(schedule), 4).eval(), schedule


def _ref_schedule(params, n_blocks):
    if "inflect" in params:
        return tome_schedule([params["r"], params["inflect"]], n_blocks, pair="inflect")
    return tome_schedule(params["r"], n_blocks, pair="start_step")


@pytest.mark.parametrize("prop_attn", [False, True])
@pytest.mark.parametrize(
    "params",
    [{"r": 16}, {"r": [20, -8]}, {"r": [5, 30, 7]}, {"r": [0, 12]}, {"r": 8, "inflect": -1.0}],
    ids=["int", "start_step", "per_block_whole_tower", "first_block_idle", "inflect"],
)
def test_static_tome_matches_reference(tiny_model, adapter, geometry, batch, params, prop_attn):
    vlm, schedule = _vlm(tiny_model, adapter, geometry, prop_attn=prop_attn, **params)
    with torch.no_grad():
        out = vlm(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    r_blocks = _ref_schedule(params, geometry.vision_layers)
    names = list(vlm.layout.step_outputs)
    assert all(n.startswith("assign_") for n in names) and names == vlm.output_names[1 : 1 + len(names)]
    for b in range(2):
        sample = adapter.sample_inputs(batch, b, geometry)
        ref_logits, assigns = tome_reference(tiny_model, adapter, sample, image_token_id=4, r_per_block=r_blocks,
                                             prop_attn=prop_attn)
        for name, step in zip(names, schedule):
            assert out[name].dtype == torch.int64 and out[name].shape == (2, step.n_in)
            assert torch.equal(out[name][b], assigns[step.layer])
        idle = [a for i, a in enumerate(assigns) if i not in {s.layer for s in schedule}]
        assert all(torch.equal(a, torch.arange(a.shape[0])) for a in idle)
        torch.testing.assert_close(out["logits"][b], ref_logits, atol=1e-5, rtol=1e-5)


def test_padding_changes_nothing_and_forced_replays(tiny_model, adapter, geometry, batch):
    vlm, schedule = _vlm(tiny_model, adapter, geometry, r=16, prop_attn=True)
    names = list(vlm.layout.step_outputs)
    with torch.no_grad():
        full = vlm.run(dict(batch))
        assert not torch.equal(full[names[0]][0], full[names[0]][1])  # each sample merges its own tokens
        for b in range(2):
            m = batch["attention_mask"][b].bool()
            one = vlm.run({"input_ids": batch["input_ids"][b : b + 1, m],
                           "attention_mask": batch["attention_mask"][b : b + 1, m],
                           "pixel_values": batch["pixel_values"][b : b + 1]})
            for n in names:
                assert torch.equal(one[n][0], full[n][b])
            torch.testing.assert_close(one["logits"][0], full["logits"][b], atol=1e-5, rtol=1e-5)
        replay = vlm.run(dict(batch), forced={n: full[n] for n in names})
    for n in names:
        assert torch.equal(replay[n], full[n])
    torch.testing.assert_close(replay["logits"], full["logits"], atol=0, rtol=0)


def _apply_one(x, metric, r, sizes, prop_attn, decide=None):
    """ToMeConfig.apply on a batch built from one (t, C) sequence, its (t, c) metric and sizes."""
    t = x.shape[0]
    state = ImageTokens(x[None], torch.arange(t)[None], None if sizes is None else sizes[None], n_protected=1)
    ctx = VisionContext(0, metric[None, None], metric[None, None], decide=decide)  # one head: the metric
    step = Step("tome", Site.VISION_BLOCK, 0, t, t - min(r, (t - 1) // 2), output=Output.ASSIGN)
    return ToMeConfig(r=r, prop_attn=prop_attn).apply(state, ctx, step)


@pytest.mark.parametrize("t,r,seed", [(9, 3, 0), (9, 4, 1), (8, 3, 2), (13, 5, 3), (5, 1, 4), (65, 16, 5)])
def test_merge_equals_reference_merge(t, r, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, 6, generator=g, dtype=torch.float64)
    metric = torch.randn(t, 4, generator=g, dtype=torch.float64)
    sizes = torch.randint(1, 4, (t,), generator=g).double()
    want_x, want_size, want_assign = bipartite_merge(x, metric, r, sizes)
    got, assign = _apply_one(x, metric, r, sizes, prop_attn=True)
    assert torch.equal(assign[0], want_assign)
    torch.testing.assert_close(got.hidden[0], want_x)
    torch.testing.assert_close(got.sizes[0], want_size)
    n_unm = (t + 1) // 2 - min(r, (t - 1) // 2)  # unmerged A (by position), then every B token
    assert got.source[0].tolist() == [i for i in range(0, t, 2) if assign[0, i] < n_unm] + list(range(1, t, 2))
    plain, _ = _apply_one(x, metric, r, sizes, prop_attn=False)  # LightCompress: sizes reset to 1
    torch.testing.assert_close(plain.hidden[0], bipartite_merge(x, metric, r, None)[0])
    assert plain.sizes is None


def test_ties_go_to_lowest_index_and_cls_is_protected():
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    metric = torch.tensor([e2, e1, e2, e2, e1, e1, e1])  # every A row ties; A2, A4 win over A6, B1 over B5
    got, assign = _apply_one(torch.arange(7.0)[:, None], metric, 2, None, prop_attn=False)
    assert got.hidden[0].flatten().tolist() == [0.0, 6.0, 2.5, 2.5, 5.0]
    assert assign[0].tolist() == [0, 2, 3, 3, 2, 4, 1]
    got, assign = _apply_one(torch.arange(6.0)[:, None], torch.ones(6, 2), 100, None, prop_attn=False)
    assert got.n == 4 and assign[0, 0] == 0 and got.hidden[0, 0, 0] == 0.0 and got.source[0, 0] == 0


def test_merges_follow_the_matrix_decide_returns():
    """`ctx.decision` sees the whole A·Bᵀ cosine matrix (nA·nB values, the CLS row unmasked and finite) and both
    decisions follow what it returns: a replay that makes another B token an A token's best partner, and that
    A token the strongest match, moves its merge."""
    g = torch.Generator().manual_seed(7)
    x, metric = torch.randn(9, 6, generator=g), torch.randn(9, 4, generator=g)
    seen = []
    _, base = _apply_one(x, metric, 2, None, False, lambda s: seen.append(s) or s)
    assert len(seen) == 1 and seen[0].shape == (1, 5 * 4) and bool(seen[0].isfinite().all())
    assert torch.equal(base, _apply_one(x, metric, 2, None, False)[1])
    n_unm = 5 - 2
    a = next(i for i in range(1, 5) if base[0, 2 * i] < n_unm)  # an A token (not CLS) that stays unmerged
    partner = 3  # any B token: `a` merges into none

    def other_partner(s):
        s = s.clone().reshape(1, 5, 4)
        s[0, a, partner] = s.max() + 1  # A token `a` now matches B token `partner` best of all
        return s.reshape(1, 20)

    _, moved = _apply_one(x, metric, 2, None, False, other_partner)
    assert int(moved[0, 2 * a]) == n_unm + partner and not torch.equal(moved, base)


def test_plan_counts_and_schedules(geometry):
    steps = ToMeConfig(r=16).plan(geometry, KEY, Entering.start(geometry))
    assert [(s.site, s.layer, s.n_in, s.n_out, s.output) for s in steps] == [
        (Site.VISION_BLOCK, 0, 65, 49, Output.ASSIGN), (Site.VISION_BLOCK, 1, 49, 33, Output.ASSIGN)]
    assert geometry.vision_layers == 2 and geometry.vision_tokens == 65
    for params in ({"r": [20, -8]}, {"r": [0, 12]}, {"r": [4, 6, 99]}, {"r": 8, "inflect": 0.5},
                   {"r": 8, "inflect": -1.0}, {"r": 40}):
        want = _ref_schedule(params, 2)
        steps = ToMeConfig(**params).plan(geometry, KEY, Entering.start(geometry))
        t, got = 65, []
        for layer, r in enumerate(want):
            if min(r, (t - 1) // 2) > 0:
                got.append((layer, t, t - min(r, (t - 1) // 2)))
                t -= min(r, (t - 1) // 2)
        assert [(s.layer, s.n_in, s.n_out) for s in steps] == got, params


def test_schedule_of_a_24_block_tower_matches_reference():
    from tokcompile.models.geometry import Geometry

    g = Geometry("llava", 32, 4096, 11008, 32, 32, 128, 32064, (336, 336), n_image_tokens=576, vision_layers=23,
                 vision_hidden_size=1024, vision_intermediate_size=4096, vision_heads=16, vision_tokens=577)
    for r, inflect in ((16, -1.0), (16, -0.5), (8, 0.5)):
        assert ToMeConfig(r=r, inflect=inflect).per_block(g, KEY) == tome_schedule([r, inflect], 23)
    assert ToMeConfig(r=[16, -1.0]).per_block(g, KEY) == [16 - i for i in range(16)] + [0] * 7
    assert ToMeConfig(r=list(range(24))).per_block(g, KEY) == list(range(23))
    steps = ToMeConfig(r=16).plan(g, KEY, Entering.start(g))
    assert len(steps) == 23 and steps[-1].n_out == 577 - 23 * 16


@pytest.mark.parametrize(
    "params,key,text",
    [
        ({"r": -1}, "r", "negative"),
        ({"r": 0}, "r", "merges no token"),
        ({"r": [0, 0]}, "r", "merges no token"),
        ({"r": [1, 2, 3, 4, 5]}, "r", "got 5"),
        ({"r": [1, -2, 3]}, "r", "-2"),
        ({"r": "16"}, "r", "expected an int"),
        ({"r": [16, 0], "inflect": 0.5}, "inflect", "needs an int r"),
        ({"r": 16, "inflect": "x"}, "inflect", "expected a number"),
        ({"r": -4, "inflect": 0.5}, "r", "negative"),
    ],
)
def test_plan_errors_name_the_key(geometry, params, key, text):
    with pytest.raises(RecipeError) as e:
        ToMeConfig(**params).plan(geometry, KEY, Entering.start(geometry))
    assert e.value.key == f"{KEY}.{key}" and text in str(e.value)


def test_unknown_parameter_and_type_errors():
    with pytest.raises(RecipeError) as e:
        config_from_params(ToMeConfig, {"r": 16, "prop_atn": True}, KEY)
    assert e.value.key == f"{KEY}.prop_atn" and "prop_attn" in str(e.value)
    with pytest.raises(RecipeError) as e:
        config_from_params(ToMeConfig, {"prop_attn": "yes"}, KEY)
    assert e.value.key == f"{KEY}.prop_attn"


def _plan(recipe) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "compile.py"), str(recipe), "--plan"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


def test_cli_plan_shows_merges_and_vision_flops():
    res = _plan(ROOT / "recipes/tiny/tome.yml")
    assert res.returncode == 0, res.stderr
    assert "tome at vision_block 0: 65 merged to 49 vision-tower tokens" in res.stdout
    assert "tome at vision_block 1: 49 merged to 33 vision-tower tokens" in res.stdout
    assert "32 of 64 image tokens reach the decoder" in res.stdout
    (row,) = [line for line in res.stdout.splitlines() if line.startswith("vision tower")]
    assert 0 < float(row.split()[-1]) < 0.8


def test_cli_plan_refuses_other_families(tmp_path):
    text = (ROOT / "recipes/tiny/tome.yml").read_text()
    recipe = tmp_path / "qwen_tome.yml"
    recipe.write_text(text.replace("tiny-random:llava", "tiny-random:qwen2_5_vl").replace("LlavaHf", "Qwen2_5VL"))
    res = _plan(recipe)
    assert res.returncode == 2
    lines = [line for line in (res.stdout + res.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "sparse.vision.special.method" in lines[0]
    assert "ToMe" in lines[0] and "patch merger" in lines[0]


def test_vision_graph_exports_with_static_shapes(tiny_model, adapter, geometry, batch):
    vlm, _ = _vlm(tiny_model, adapter, geometry, r=16, prop_attn=True)
    args = (batch["pixel_values"],)
    ep = export_matching_eager(vlm.vision, args, exact=False)
    ops = assert_no_data_dependent_ops(ep)
    assert not ops & {"argsort", "scatter_reduce"}  # the merge is a one-hot matmul, not ToMe's scatter


@pytest.mark.slow
def test_tiny_recipe_compiles_with_parity(tmp_path):
    # AOTInductor in CI: the demo and Qwen2.5-VL
    res = compile_recipe(ROOT / "recipes/tiny/tome.yml", tmp_path / "out", "--targets", "onnx")
    assert res.returncode == 0, res.stderr + res.stdout
    assert "parity passed" in res.stdout
