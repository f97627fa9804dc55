"""Static FiCoCo-L (and FiCoCo-VL) against the independent reference written the official way (tiny LLaVA-1.5
and tiny Qwen2.5-VL), padding, plan errors and one full compile."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import ROOT, compile_recipe, padded_family_case
from tests.references.ficoco_l import ficoco_l_reference, head_mean_logits
from tokcompile.errors import RecipeError
from tokcompile.models import ReducedVLM
from tokcompile.models.reduced import LayerOps
from tokcompile.reduce.base import Entering
from tokcompile.reduce.context import DecoderContext
from tokcompile.reduce.ficoco import FiCoCoConfig
from tokcompile.reduce.ficoco_v import fan_out
from tokcompile.reduce.schedule import Positions, Site


@pytest.fixture(scope="module", params=["llava", "qwen2_5_vl"])
def fam(request) -> SimpleNamespace:
    return padded_family_case(request.param)


def _vlm(f, **kw):
    cfg = FiCoCoConfig(merge_visual=False, AT=True, **kw)
    schedule = cfg.plan(f.geom, "sparse.special", Entering.start(f.geom))
    return ReducedVLM(f.model, f.adapter, f.geom, schedule, (cfg,) * len(schedule), f.image_id).eval(), schedule


def _run(f, vlm, batch):
    with torch.no_grad():
        return vlm.run({n: batch[n] for n in f.adapter.input_names_for(f.geom)})


@pytest.mark.parametrize("share,control", [(0.25, 0), (0.14, 1), (0.47, 2)])
def test_static_ficoco_l_matches_reference(fam, share, control):
    r = int(fam.geom.n_image_tokens * share)  # tokens merged per layer
    vlm, schedule = _vlm(fam, r=r, control_encoding_layer=control)
    out = _run(fam, vlm, fam.batch)
    worst = 0.0
    for b in range(2):
        sample = fam.adapter.sample_inputs(fam.batch, b, fam.geom)
        ref_logits, ref_kept = ficoco_l_reference(fam.model, fam.adapter, sample, image_token_id=fam.image_id,
                                                  r=r, control_encoding_layer=control)
        assert len(ref_kept) == len(schedule) == fam.geom.n_layers - control - 1
        for j, (step, kept_ref) in enumerate(zip(schedule, ref_kept)):
            assert out[f"kept_{j}"].shape == (2, step.n_out)
            assert torch.equal(out[f"kept_{j}"][b], kept_ref), (b, j)
        torch.testing.assert_close(out["logits"][b], ref_logits, atol=1e-5, rtol=1e-5)
        worst = max(worst, float((out["logits"][b] - ref_logits).abs().max()))
    print(f"{fam.family} r={r} control={control}: max |dlogit| vs reference {worst:.2e}")


def test_faithful_renumbers_positions_as_the_official_prefill():
    f = padded_family_case("llava")
    vlm, schedule = _vlm(f, r=16, control_encoding_layer=0, faithful=True)
    assert {s.positions for s in schedule} == {Positions.RENUMBER}
    out = _run(f, vlm, f.batch)
    for b in range(2):
        sample = f.adapter.sample_inputs(f.batch, b, f.geom)
        ref_logits, ref_kept = ficoco_l_reference(f.model, f.adapter, sample, image_token_id=f.image_id, r=16,
                                                  control_encoding_layer=0, renumber_positions=True)
        for j, kept_ref in enumerate(ref_kept):
            assert torch.equal(out[f"kept_{j}"][b], kept_ref)
        torch.testing.assert_close(out["logits"][b], ref_logits, atol=1e-5, rtol=1e-5)
    p1, _ = _vlm(f, r=16, control_encoding_layer=0)
    assert not torch.allclose(_run(f, p1, f.batch)["logits"], out["logits"], atol=1e-4)  # the positions matter


def test_head_mean_logits_are_the_references(fam):
    """The context's unmasked head-mean logits at the mid-layer site equal the reference's (layer 2's own norm,
    q/k projections, RoPE and GQA mapping, on the tokens that entered its attention)."""
    sample = fam.adapter.sample_inputs(fam.batch, 0, fam.geom)
    vlm, _ = _vlm(fam, r=4, control_encoding_layer=0)
    lm = fam.adapter.language_model(fam.model)
    with torch.no_grad():
        state = vlm.initial_state(sample)
        h = fam.model(**sample, output_hidden_states=True).hidden_states[2]  # (1, T, D) entering layer 2
        state = type(state)(h, state.positions, state.valid, state.image_start, state.n_image, state.last)
        ops = LayerOps(fam.adapter, fam.model)
        ctx = DecoderContext(2, ops, state, None, None, keys_here=ops.keys(2, h, state.positions), state_in=state)
        ours = ctx.head_mean_logits()[0]  # (T, T)
        ref = head_mean_logits(lm.layers[2], lm.rotary_emb, h, fam.adapter.hf_position_ids(fam.model, sample))
    assert fam.geom.n_kv_heads < fam.geom.n_heads  # GQA is exercised
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_padding_changes_nothing_and_samples_keep_their_own(fam):
    vlm, schedule = _vlm(fam, r=fam.geom.n_image_tokens // 4, control_encoding_layer=0)
    out = _run(fam, vlm, fam.batch)
    assert not torch.equal(out["kept_0"][0], out["kept_0"][1])
    for b in range(2):
        one = _run(fam, vlm, fam.adapter.sample_inputs(fam.batch, b, fam.geom))
        for j in range(len(schedule)):
            assert torch.equal(one[f"kept_{j}"][0], out[f"kept_{j}"][b])
        torch.testing.assert_close(one["logits"][0], out["logits"][b], atol=1e-5, rtol=1e-5)


def test_plan_counts_sites_and_fan_out():
    f = padded_family_case("llava")
    N, L = f.geom.n_image_tokens, f.geom.n_layers
    steps = FiCoCoConfig(merge_visual=False, AT=True, r=16, control_encoding_layer=0).plan(
        f.geom, "k", Entering.start(f.geom))
    assert [(s.site, s.layer, s.n_in, s.n_out) for s in steps] == [
        (Site.DECODER_MID, layer, N - 16 * (layer - 1), N - 16 * layer) for layer in range(1, L)]
    assert {s.positions for s in steps} == {Positions.KEEP}
    # the official defaults: r 14 from layer 5 on (control layer 4)
    default = FiCoCoConfig(merge_visual=False, AT=True)
    assert (default._decoder_params()[:2]) == (14, 4)
    # k on distinct values as torch.quantile places the 0.998 quantile: 1 below ~501 entries, then 2
    assert fan_out(64) == 1 and fan_out(576) == 2 and fan_out(562) == 2 and fan_out(400) == 1


def test_ficoco_vl_composes_the_tower_and_the_decoder():
    """merge_visual and AT: FiCoCo-V's blocks, then FiCoCo-L's layers on what reaches the decoder; the decoder
    stage takes llm_r and llm_control_encoding_layer."""
    f = padded_family_case("llava")
    cfg = FiCoCoConfig(merge_visual=True, AT=True, r=8, control_encoding_layer=0, llm_r=10,
                       llm_control_encoding_layer=1)
    steps = cfg.plan(f.geom, "k", Entering.start(f.geom))
    vision = [s for s in steps if s.site is Site.VISION_BLOCK]
    decoder = [s for s in steps if s.site is Site.DECODER_MID]
    assert vision and decoder
    reaching = vision[-1].n_out - 1  # LLaVA drops CLS
    assert decoder[0].n_in == reaching and [s.layer for s in decoder] == list(range(2, f.geom.n_layers))
    assert all(s.n_in - s.n_out == 10 for s in decoder)
    vlm = ReducedVLM(f.model, f.adapter, f.geom, steps, (cfg,) * len(steps), f.image_id).eval()
    out = _run(f, vlm, f.batch)
    assert out[f"kept_{len(steps) - 1}"].shape == (2, decoder[-1].n_out)
    assert torch.isfinite(out["logits"]).all()


@pytest.mark.parametrize(
    "kwargs,key,text",
    [
        ({"AT": True, "merge_visual": False, "control_encoding_layer": 3}, "control_encoding_layer",
         "leaves no decoder layer"),
        ({"AT": True, "merge_visual": False, "r": 0, "control_encoding_layer": 0}, "r", "discards nothing"),
        ({"AT": True, "merge_visual": False, "r": 40, "control_encoding_layer": 0}, "r", "leaves no image token"),
        ({"AT": True, "merge_visual": False, "llm_r": 4}, "llm_r", "use r"),
        ({"AT": False, "merge_visual": False}, "merge_visual", "leaves nothing to do"),
        ({"AT": True, "merge_visual": True, "faithful": True}, "faithful", "applies to FiCoCo-L alone"),
        ({"AT": "yes"}, "AT", "true or false"),
    ],
)
def test_plan_errors_name_the_key(kwargs, key, text):
    f = padded_family_case("llava")
    with pytest.raises(RecipeError, match=text) as e:
        FiCoCoConfig(**kwargs).plan(f.geom, "sparse.special", Entering.start(f.geom))
    assert e.value.key == f"sparse.special.{key}"


def test_faithful_is_refused_on_m_rope():
    f = padded_family_case("qwen2_5_vl")
    with pytest.raises(RecipeError, match="M-RoPE keeps its ids"):
        FiCoCoConfig(merge_visual=False, AT=True, r=4, control_encoding_layer=0, faithful=True).plan(
            f.geom, "k", Entering.start(f.geom))


def test_tiny_recipe_compiles_with_parity(tmp_path):
    """The tiny recipe end to end (ONNX in CI, as every method but two): parity, and greedy generation equal to
    eager over one cache group per merging layer."""
    out = tmp_path / "ficoco_l"
    res = compile_recipe(ROOT / "recipes" / "tiny" / "ficoco_l.yml", out, "--targets", "onnx")
    assert res.returncode == 0, res.stderr + res.stdout
    assert "onnx: vision, prefill and decode parity passed; greedy generation equals eager" in res.stdout
    assert "eager generation with KV cache equals the no-cache reference" in res.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    steps = manifest["plan"]["schedule"]
    assert [s["n_out"] for s in steps] == [48, 32, 16] and {s["site"] for s in steps} == {"decoder_mid"}


def test_two_targets_per_token_at_llava_scale():
    """576 image tokens (LLaVA-1.5): k = 2 targets per merged token, on random logits and features, with the
    image span after a 5-token prefix and 7 text tokens after it: the merge equals the reference's."""
    from tests.references.ficoco_l import merge_span
    from tokcompile.reduce.ficoco_l import ficoco_l_merge

    g = torch.Generator().manual_seed(0)
    start, n, text, r, D = 5, 576, 7, 14, 16
    T = start + n + text
    x = torch.randn(1, T, D, generator=g)
    logits = torch.randn(1, T, T, generator=g)
    span = torch.arange(start, start + n)[None]
    after = torch.arange(T)[None] >= start + n
    merged, kept = ficoco_l_merge(x, logits, span, after, r, fan_out(n))
    assert fan_out(n) == 2
    ref_x, ref_kept = merge_span(x, logits[0], start, n, r)
    assert torch.equal(kept[0], ref_kept)
    keep_idx = torch.cat([torch.arange(start), start + kept[0], torch.arange(start + n, T)])
    torch.testing.assert_close(merged[0, keep_idx], ref_x[0], atol=1e-5, rtol=1e-5)


def test_discards_and_targets_follow_the_scores_decide_returns():
    """FiCoCo-L hands `ctx.decision` the redundancy (n values), then the discarded rows of C (r rows of n, finite: the
    −∞ diagonal is never a kept target), and decides on what it gets back: a replay that gives a discarded
    token another best target moves its content and leaves the kept set."""
    from tokcompile.reduce.ficoco_l import ficoco_l_merge

    g = torch.Generator().manual_seed(5)
    start, n, text, r, D = 3, 12, 4, 3, 8
    T = start + n + text
    x, logits = torch.randn(1, T, D, generator=g), torch.randn(1, T, T, generator=g)
    span, after = torch.arange(start, start + n)[None], torch.arange(T)[None] >= start + n
    seen = []
    base, kept = ficoco_l_merge(x, logits, span, after, r, 1, decide=lambda s: seen.append(s) or s)
    assert [v.shape for v in seen] == [(1, n), (1, r, n)] and all(bool(v.isfinite().all()) for v in seen)
    assert torch.equal(base, ficoco_l_merge(x, logits, span, after, r, 1)[0])
    rows = seen[1]
    is_kept = (torch.arange(n)[None] == kept[0][:, None]).any(0)  # (n,)
    target = int(rows[0, 0].masked_fill(~is_kept, -1e9).argmax())
    other = next(int(j) for j in kept[0] if int(j) != target)
    calls = iter(range(2))

    def retarget(s):  # leaves the redundancy; the first discarded row now prefers `other`
        if next(calls) == 0:
            return s
        s = s.clone()
        s[0, 0, other] = s.max() + 1
        return s

    moved, kept_moved = ficoco_l_merge(x, logits, span, after, r, 1, decide=retarget)
    assert torch.equal(kept_moved, kept)
    assert not torch.allclose(moved[0, start + other], base[0, start + other])  # it receives the content now


def test_families_need_only_the_sites_the_parameters_use(tmp_path):
    """FiCoCo-L plans on Qwen2.5-VL (the decoder's mid-layer site); FiCoCo-V there is still refused."""
    from tokcompile.pipeline import plan_recipe

    text = (ROOT / "recipes" / "tiny" / "ficoco_l.yml").read_text()
    text = text.replace("type: LlavaHf, ", "").replace("tiny-random:llava", "tiny-random:qwen2_5_vl")
    decoder = tmp_path / "qwen_l.yml"
    decoder.write_text(text.replace("r: 16", "r: 6"))
    plan = plan_recipe(decoder, out=tmp_path / "out")
    assert [s.n_out for s in plan.schedule] == [18, 12, 6]
    both = tmp_path / "qwen_vl.yml"
    both.write_text(text.replace("merge_visual: false", "merge_visual: true"))
    with pytest.raises(RecipeError, match="runs inside the vision blocks, which qwen2_5_vl does not support"):
        plan_recipe(both, out=tmp_path / "out2")
