"""Static VisionZip (CLIP tower output) against the independent LightCompress-style reference, padding and replay,
the reduction itself, plan counts and errors, the family refusal, export, and one full compile."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, assert_no_data_dependent_ops, compile_recipe, export_matching_eager
from tests.references.visionzip import visionzip_reference, visionzip_tokens
from tokcompile.errors import RecipeError
from tokcompile.models import ReducedVLM
from tokcompile.models.geometry import Geometry
from tokcompile.reduce.base import Entering, config_from_params
from tokcompile.reduce.context import VisionContext
from tokcompile.reduce.schedule import Output, Site
from tokcompile.reduce.state import ImageTokens
from tokcompile.reduce.visionzip import VisionZipConfig

KEY = "sparse.vision.special"
PARAMS = [
    {"dominant": 12, "contextual": 4},
    {"dominant": 40, "contextual": 20},
    {"dominant": 0, "contextual": 7},
    {"dominant": 12, "contextual": 4, "merge_only": True},
    {"dominant": 12, "contextual": 4, "prune_only": True},
]
IDS = ["d12_c4", "d40_c20", "d0_c7", "merge_only", "prune_only"]


def _vlm(model, adapter, geometry, **params):
    cfg = VisionZipConfig(**params)
    schedule = cfg.plan(geometry, KEY, Entering.start(geometry))
    return ReducedVLM(model, adapter, geometry, schedule, (cfg,), 4).eval(), schedule


@pytest.mark.parametrize("params", PARAMS, ids=IDS)
def test_static_visionzip_matches_reference(tiny_model, adapter, geometry, batch, params):
    vlm, (step,) = _vlm(tiny_model, adapter, geometry, **params)
    assert not bool(batch["attention_mask"][1].all())  # the batch really is padded
    with torch.no_grad():
        out = vlm(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    (name,) = vlm.layout.step_outputs
    prefix = "kept_" if params.get("prune_only") else "assign_"
    assert name.startswith(prefix) and out[name].dtype == torch.int64
    assert out[name].shape == (2, step.n_out if params.get("prune_only") else step.n_in)
    for b in range(2):
        sample = adapter.sample_inputs(batch, b, geometry)
        ref_logits, ref_index = visionzip_reference(tiny_model, adapter, sample, image_token_id=4, **params)
        assert torch.equal(out[name][b], ref_index)
        torch.testing.assert_close(out["logits"][b], ref_logits, atol=1e-5, rtol=1e-5)


def test_padding_changes_nothing_and_forced_replays(tiny_model, adapter, geometry, batch):
    for params in (PARAMS[0], PARAMS[4]):
        vlm, _ = _vlm(tiny_model, adapter, geometry, **params)
        (name,) = vlm.layout.step_outputs
        with torch.no_grad():
            full = vlm.run(dict(batch))
            assert not torch.equal(full[name][0], full[name][1])  # each sample picks its own tokens
            for b in range(2):
                m = batch["attention_mask"][b].bool()
                one = vlm.run({"input_ids": batch["input_ids"][b : b + 1, m],
                               "attention_mask": batch["attention_mask"][b : b + 1, m],
                               "pixel_values": batch["pixel_values"][b : b + 1]})
                assert torch.equal(one[name][0], full[name][b])
                torch.testing.assert_close(one["logits"][0], full["logits"][b], atol=1e-5, rtol=1e-5)
            replay = vlm.run(dict(batch), forced={name: full[name]})
        assert torch.equal(replay[name], full[name])
        torch.testing.assert_close(replay["logits"], full["logits"], atol=0, rtol=0)


def _apply_one(x, q, k, params, sizes=None):
    """VisionZipConfig.apply on a batch of one: x (t, C), queries/keys (H, t, d)."""
    t = x.shape[0]
    cfg = VisionZipConfig(**params)
    g = Geometry("llava", 1, 8, 8, 1, 1, 8, 8, (8, 8), n_image_tokens=t - 1, vision_layers=1, vision_hidden_size=8,
                 vision_intermediate_size=8, vision_heads=2, vision_tokens=t)
    (step,) = cfg.plan(g, KEY, Entering.start(g))
    state = ImageTokens(x[None], torch.arange(t)[None], None if sizes is None else sizes[None], n_protected=1)
    return cfg.apply(state, VisionContext(0, q[None], k[None]), step)


@pytest.mark.parametrize("t,params,seed", [
    (17, {"dominant": 5, "contextual": 3}, 0), (17, {"dominant": 0, "contextual": 4}, 1),
    (17, {"dominant": 9, "contextual": 7}, 2), (30, {"dominant": 6, "contextual": 5}, 3),
    (17, {"dominant": 5, "contextual": 3, "prune_only": True}, 4),
    (17, {"dominant": 5, "contextual": 3, "merge_only": True}, 5), (17, {"dominant": 15, "contextual": 1}, 6),
    (65, {"dominant": 12, "contextual": 4}, 7), (65, {"dominant": 3, "contextual": 61}, 8),
])
def test_reduction_equals_reference_reduction(t, params, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, 6, generator=g, dtype=torch.float64)
    q = torch.randn(2, t, 4, generator=g, dtype=torch.float64)
    k = torch.randn(2, t, 4, generator=g, dtype=torch.float64)
    k[:, 5] = k[:, 3]  # equal CLS scores and equal keys: ties go to the lower index
    ctx = VisionContext(0, q[None], k[None])
    cls_attn = ctx.attention(torch.tensor([0])).sum(1)[0, 0]  # (t,)
    want_x, want_index = visionzip_tokens(x, cls_attn, ctx.mean_keys()[0], **params)
    got, index = _apply_one(x, q, k, params)
    assert torch.equal(index[0], want_index)
    torch.testing.assert_close(got.hidden[0], want_x)
    if params.get("prune_only"):
        assert torch.equal(got.source[0], want_index)
    else:  # dominant tokens, then each contextual token's target
        n_keep = 1 + (0 if params.get("merge_only") else params["dominant"])
        src = got.source[0].tolist()
        assert src[:n_keep] == [j for j in range(t) if want_index[j] < n_keep]
        assert all(want_index[s] == n_keep + c for c, s in enumerate(src[n_keep:]))
        assert src[n_keep:] == sorted(src[n_keep:])  # targets in original order


def test_hand_example_ties_and_sizes():
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    k = torch.tensor([e1, e1, e2, e1, e2, [2.0, 0.0], [0.0, 3.0]])[None]  # (1, 7, 2): one head
    q = torch.zeros(1, 7, 2)
    q[0, 0] = torch.tensor([0.0, 5.0])  # the CLS row prefers e2 keys: token 6 ([0, 3]) most
    x = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0])[:, None]
    got, assign = _apply_one(x, q, k, {"dominant": 1, "contextual": 2}, sizes=torch.ones(7))
    # dominant = token 6; remaining 1..5 -> targets at positions 0, 2 = tokens 1 and 3 (both e1). Tokens 2 and 4
    # (e2) tie at 0 against both, token 5 ([2, 0]) ties at 1: every tie goes to target 0 (token 1), so token 3
    # stays alone: contextual = [x1 + mean(x2, x4, x5), x3 + 0].
    torch.testing.assert_close(got.hidden[0].flatten(), torch.tensor([0.0, 6.0, 1.0 + 11.0 / 3, 3.0]))
    assert assign[0].tolist() == [0, 2, 2, 3, 2, 2, 1]
    assert got.source[0].tolist() == [0, 6, 1, 3] and got.sizes[0].tolist() == [1.0, 1.0, 4.0, 1.0]


def _llava15() -> Geometry:
    return Geometry("llava", 32, 4096, 11008, 32, 32, 128, 32064, (336, 336), n_image_tokens=576, vision_layers=23,
                    vision_hidden_size=1024, vision_intermediate_size=4096, vision_heads=16, vision_tokens=577)


def test_plan_counts(geometry):
    def steps(g, **p):
        planned = VisionZipConfig(**p).plan(g, KEY, Entering.start(g))
        return [(s.site, s.layer, s.n_in, s.n_out, s.output) for s in planned]

    assert steps(geometry, dominant=12, contextual=4) == [(Site.VISION_OUT, 0, 65, 17, Output.ASSIGN)]
    assert steps(geometry, dominant=12, contextual=4, merge_only=True) == [(Site.VISION_OUT, 0, 65, 5, Output.ASSIGN)]
    assert steps(geometry, dominant=12, contextual=0, prune_only=True) == [(Site.VISION_OUT, 0, 65, 13, Output.KEPT)]
    assert steps(geometry, dominant=60, contextual=4) == [(Site.VISION_OUT, 0, 65, 65, Output.ASSIGN)]
    g = _llava15()
    for d, c in ((54, 10), (108, 20), (162, 30)):
        assert steps(g, dominant=d, contextual=c) == [(Site.VISION_OUT, 0, 577, 1 + d + c, Output.ASSIGN)]
    after_tome = Entering(208, 209, (Site.VISION_BLOCK, 22))  # ToMe r=16 before: 209 tower tokens arrive
    (s,) = VisionZipConfig(54, 10).plan(g, KEY, after_tome)
    assert (s.n_in, s.n_out) == (209, 65)


@pytest.mark.parametrize("params,key,text", [
    ({"dominant": -1, "contextual": 4}, "dominant", "outside 0..64"),
    ({"dominant": 65, "contextual": 4}, "dominant", "outside 0..64"),
    ({"dominant": 60, "contextual": 5}, "contextual", "must fit"),
    ({"dominant": 12, "contextual": 0}, "contextual", "outside 1..52"),
    ({"dominant": 12, "contextual": 65, "merge_only": True}, "contextual", "outside 1..64"),
    ({"dominant": 12, "contextual": 4, "prune_only": True, "merge_only": True}, "merge_only", "cannot both"),
    ({"dominant": 0, "contextual": 4, "prune_only": True}, "dominant", "keeps no image token"),
])
def test_plan_errors_name_the_key(geometry, params, key, text):
    with pytest.raises(RecipeError) as e:
        VisionZipConfig(**params).plan(geometry, KEY, Entering.start(geometry))
    assert e.value.key == f"{KEY}.{key}" and text in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_missing_and_type_errors():
    with pytest.raises(RecipeError) as e:
        config_from_params(VisionZipConfig, {"dominant": 54, "contextual": 10, "prune_onyl": True}, KEY)
    assert e.value.key == f"{KEY}.prune_onyl" and "prune_only" in str(e.value)
    with pytest.raises(RecipeError) as e:
        config_from_params(VisionZipConfig, {"dominant": 54}, KEY)
    assert e.value.key == f"{KEY}.contextual" and "required" in str(e.value)
    with pytest.raises(RecipeError) as e:
        config_from_params(VisionZipConfig, {"dominant": 54, "contextual": 10, "merge_only": "no"}, KEY)
    assert e.value.key == f"{KEY}.merge_only"
    cfg = config_from_params(VisionZipConfig, {"dominant": 162, "contextual": 30, "prune_only": False,
                                               "merge_only": False}, KEY)  # LightCompress's config block
    assert cfg == VisionZipConfig(162, 30)


def _plan(recipe) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "compile.py"), str(recipe), "--plan"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


def test_cli_plan():
    res = _plan(ROOT / "recipes/tiny/visionzip.yml")
    assert res.returncode == 0, res.stderr
    assert ("visionzip at vision_out 0: 65 merged to 17 vision-tower tokens; reports 2 decision score vectors"
            in res.stdout)
    assert "16 of 64 image tokens reach the decoder" in res.stdout
    assert "L0:16 L1:16 L2:16 L3:16" in res.stdout


def test_cli_plan_refuses_llava_next_with_the_reason(tmp_path):
    """LLaVA-NeXT offers neither the tower's output nor its attention at the projector: one line, the reason."""
    text = (ROOT / "recipes/tiny/visionzip.yml").read_text()
    recipe = tmp_path / "next_visionzip.yml"
    recipe.write_text(text.replace("tiny-random:llava", "tiny-random:llava_next").replace("LlavaHf", "LlavaNext"))
    res = _plan(recipe)
    assert res.returncode == 2
    lines = [line for line in (res.stdout + res.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "sparse.vision.special.method" in lines[0]
    assert "does not support" in lines[0] and "anyres packing" in lines[0]


def test_vision_graph_exports_with_static_shapes(tiny_model, adapter, geometry, batch):
    for params in (PARAMS[0], PARAMS[4]):
        vlm, _ = _vlm(tiny_model, adapter, geometry, **params)
        args = (batch["pixel_values"],)
        ep = export_matching_eager(vlm.vision, args, exact=False)
        ops = assert_no_data_dependent_ops(ep)
        assert not ops & {"argsort", "scatter_reduce", "scatter"}


@pytest.mark.slow
def test_tiny_recipe_compiles_with_parity(tmp_path):
    # AOTInductor in CI: the demo and Qwen2.5-VL
    res = compile_recipe(ROOT / "recipes/tiny/visionzip.yml", tmp_path / "out", "--targets", "onnx")
    assert res.returncode == 0, res.stderr + res.stdout
    assert "parity passed" in res.stdout
