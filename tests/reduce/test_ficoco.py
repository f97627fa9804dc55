"""Static FiCoCo-V against the independent reference (tiny LLaVA, padded batch of two; one block at the
full LLaVA-1.5 size with two targets per discarded token), batching, plan counts and errors, export, and one
full compile."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import ROOT, assert_no_data_dependent_ops, compile_recipe, export_matching_eager, padded_family_case
from tests.references.ficoco import ficoco_block, ficoco_reference
from tokcompile.errors import RecipeError
from tokcompile.models import ReducedVLM
from tokcompile.reduce.base import Entering, config_from_params
from tokcompile.reduce.ficoco import FiCoCoConfig
from tokcompile.reduce.ficoco_v import fan_out, ficoco_merge
from tokcompile.reduce.schedule import Output, Site

KEY = "sparse.vision.special"


@pytest.fixture(scope="module")
def case():
    return padded_family_case("llava")


def _vlm(case, r: int, control_encoding_layer: int = 0) -> ReducedVLM:
    cfg = FiCoCoConfig(r=r, control_encoding_layer=control_encoding_layer)
    schedule = cfg.plan(case.geom, KEY, Entering.start(case.geom))
    return ReducedVLM(case.model, case.adapter, case.geom, schedule, (cfg,), case.image_id).eval()


def _run(vlm: ReducedVLM, inputs: dict):
    with torch.no_grad():
        return vlm(*[inputs[n] for n in vlm.input_names])


@pytest.mark.parametrize("r", [24, 8, 60])
def test_static_ficoco_equals_the_reference(case, r):
    out = _run(_vlm(case, r), case.batch)
    assert out["kept_0"].shape == (2, 65 - r)
    worst = 0.0
    for b in range(2):
        sample = case.adapter.sample_inputs(case.batch, b, case.geom)
        ref_logits, ref_kept, ks = ficoco_reference(case.model, case.adapter, sample, image_token_id=case.image_id,
                                                    r=r, control_encoding_layer=0)
        assert ks == [fan_out(65)]  # the official per-row quantile count equals the plan's k(t)
        assert torch.equal(out["kept_0"][b], ref_kept[0])
        torch.testing.assert_close(out["logits"][b], ref_logits, atol=1e-5, rtol=1e-5)
        worst = max(worst, (out["logits"][b] - ref_logits).abs().max().item())
    print(f"r {r}: max |dlogit| vs reference {worst:.2e}")


def test_one_block_at_llava_size_with_two_targets():
    """577 tokens on a 24x24 grid (144 windows), as LLaVA-1.5's block 12 sees them: k = 2."""
    torch.manual_seed(0)
    t, r = 577, 42
    x = torch.randn(2, t, 16)
    logits = torch.randn(2, t, t) * 3
    patch = torch.arange(t - 1)[None].expand(2, -1)
    hidden, kept = ficoco_merge(x, logits, patch, 24, r, fan_out(t))
    assert fan_out(t) == 2
    for b in range(2):
        want, want_kept, k = ficoco_block(x[b], logits[b], list(range(t - 1)), 24, r)
        assert k == 2 and kept[b].tolist() == want_kept
        torch.testing.assert_close(hidden[b], want, atol=1e-5, rtol=1e-5)


def test_discards_and_targets_follow_the_scores_decide_returns():
    """Each block hands `ctx.decision` its keep scores before the penalty (t-1 values), then its discarded rows'
    logits (r rows of t), all finite, and decides on what it gets back: a replay that makes another kept token a
    discarded token's best target changes the merged features and not the kept set (a decision that shows only
    in the numbers), and one that raises a discarded token's keep score keeps it."""
    g = torch.Generator().manual_seed(4)
    t, r, side = 17, 5, 4
    x, logits = torch.randn(2, t, 8, generator=g), torch.randn(2, t, t, generator=g)
    patch = torch.arange(t - 1)[None].expand(2, -1)
    seen = []
    base, kept = ficoco_merge(x, logits, patch, side, r, 1, decide=lambda s: seen.append(s) or s)
    assert [v.shape for v in seen] == [(2, t - 1), (2, r, t)] and all(bool(v.isfinite().all()) for v in seen)
    assert torch.equal(base, ficoco_merge(x, logits, patch, side, r, 1)[0])
    dropped = sorted(set(range(1, t)) - set(kept[0].tolist()))
    rows = seen[1]
    target = int(rows[0, 0].masked_fill(~(torch.arange(t)[None] == kept[0][:, None]).any(0), -1e9).argmax())
    other = next(int(j) for j in kept[0] if int(j) != target)

    def retarget(s):  # leaves the keep scores; the first discarded token's row now prefers `other`
        if s.shape == (2, t - 1):
            return s
        s = s.clone()
        s[0, 0, other] = s.max() + 1
        return s

    moved, kept_moved = ficoco_merge(x, logits, patch, side, r, 1, decide=retarget)
    assert torch.equal(kept_moved, kept) and not torch.allclose(moved[0], base[0]) and torch.equal(moved[1], base[1])

    def rescue(s):  # the keep scores, with the first discarded token made the best of all
        if s.shape == (2, t - 1):
            s = s.clone()
            s[0, dropped[0] - 1] = s.abs().max() * 10
        return s

    _, kept_rescued = ficoco_merge(x, logits, patch, side, r, 1, decide=rescue)
    assert dropped[0] in kept_rescued[0].tolist()


def test_samples_pick_their_own_tokens_and_padding_changes_nothing(case):
    vlm = _vlm(case, 24)
    out = _run(vlm, case.batch)
    assert not torch.equal(out["kept_0"][0], out["kept_0"][1])
    for b in range(2):
        one = _run(vlm, case.adapter.sample_inputs(case.batch, b, case.geom))
        assert torch.equal(one["kept_0"][0], out["kept_0"][b])
        torch.testing.assert_close(one["logits"][0], out["logits"][b], atol=1e-5, rtol=1e-5)


def test_plan_counts(geometry):
    (step,) = FiCoCoConfig(r=24, control_encoding_layer=0).plan(geometry, KEY, Entering.start(geometry))
    assert (step.method, step.site, step.layer, step.n_in, step.n_out, step.output) == (
        "ficoco", Site.VISION_BLOCK, 1, 65, 41, Output.KEPT)
    assert [fan_out(t) for t in (65, 501, 502, 577)] == [1, 1, 2, 2]


@pytest.mark.parametrize("params, key, text", [
    ({"AT": True, "control_encoding_layer": 0, "llm_r": 100, "llm_control_encoding_layer": 0}, "llm_r",
     "leaves no image token"),
    ({"faithful": True, "control_encoding_layer": 0}, "faithful", "no static"),
    ({"merge_visual": False, "control_encoding_layer": 0}, "merge_visual", "nothing to do"),
    ({"control_encoding_layer": 1}, "control_encoding_layer", "leaves no vision block"),
    ({"r": 64, "control_encoding_layer": 0}, "r", "leaves no image token"),
    ({"r": 0, "control_encoding_layer": 0}, "r", "discards nothing"),
    ({"r": "many", "control_encoding_layer": 0}, "r", "expected an integer"),
    ({"ratio": 0.5}, "ratio", "unknown parameter for FiCoCo"),
])
def test_plan_errors_name_the_key(geometry, params, key, text):
    with pytest.raises(RecipeError) as e:
        config_from_params(FiCoCoConfig, params, KEY).plan(geometry, KEY, Entering.start(geometry))
    assert e.value.key == f"{KEY}.{key}" and text in str(e.value)


def test_vision_graph_exports_with_no_data_dependent_ops(case):
    vlm = _vlm(case, 24)
    args = tuple(case.batch[n] for n in vlm.vision.input_names)
    ep = export_matching_eager(vlm.vision, args)
    ops = assert_no_data_dependent_ops(ep)
    assert "gather" in ops


@pytest.mark.slow
def test_tiny_recipe_compiles_to_onnx_with_parity(tmp_path):
    # ONNX only, for CI time: AOTInductor at this site is compiled by the tests of vision_block (ToMe).
    res = compile_recipe(ROOT / "recipes/tiny/ficoco.yml", tmp_path / "out", "--targets", "onnx")
    assert res.returncode == 0, res.stderr + res.stdout
    assert "parity passed" in res.stdout
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [(s["method"], s["site"], s["n_in"], s["n_out"]) for s in manifest["schedule"]] == [
        ("ficoco", "vision_block", 65, 41)]
    assert manifest["parity"]["passed"] is True
