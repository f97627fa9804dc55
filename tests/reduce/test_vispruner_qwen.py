"""VisPruner on the Qwen families (LightCompress's Qwen2.5-VL path, at the projector output) against the
independent reference that runs the HF model with LightCompress's hooks."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import ROOT, compile_recipe, padded_family_case
from tests.references.vispruner_qwen import vispruner_qwen_reference
from tokcompile.errors import RecipeError
from tokcompile.models import ReducedVLM
from tokcompile.reduce.base import Entering
from tokcompile.reduce.schedule import Site
from tokcompile.reduce.vispruner import VisPrunerConfig

SETTINGS = [(0.5, 0.5), (0.25, 0.25), (0.5, 0.0), (0.5, 1.0), (0.55, 1.0)]  # the last: 11 kept, 12 important


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_qwen_vispruner_matches_lightcompress_reference(family):
    f = padded_family_case(family)
    for prune_ratio, important_ratio in SETTINGS:
        cfg = VisPrunerConfig(prune_ratio=prune_ratio, important_ratio=important_ratio)
        schedule = cfg.plan(f.geom, "sparse", Entering.start_for(f.geom, f.adapter))
        assert [(s.site, s.n_in) for s in schedule] == [(Site.PROJECTOR_OUT, f.geom.n_image_tokens)]
        vlm = ReducedVLM(f.model, f.adapter, f.geom, schedule, (cfg,), f.image_id).eval()
        with torch.no_grad():
            out = vlm.run({n: f.batch[n] for n in f.adapter.input_names_for(f.geom)})
        for b in range(2):
            sample = f.adapter.sample_inputs(f.batch, b, f.geom)
            logits, kept = vispruner_qwen_reference(f.model, sample, image_token_id=f.image_id,
                                                    prune_ratio=prune_ratio, important_ratio=important_ratio)
            assert out["kept_0"][b].tolist() == kept.tolist(), (prune_ratio, important_ratio, b)
            torch.testing.assert_close(out["logits"][b], logits, atol=1e-5, rtol=1e-5)


def test_qwen_budget_the_pairing_cannot_run_names_the_key_and_working_ratios():
    """24 tokens, 10 kept, 6 important: the second round would drop 6 of 10 candidates, more than half, where
    LightCompress's indexing fails. The suggested ratios plan."""
    f = padded_family_case("qwen2_5_vl")
    start = Entering.start_for(f.geom, f.adapter)
    with pytest.raises(RecipeError, match="cannot split") as e:
        VisPrunerConfig(prune_ratio=0.6, important_ratio=0.5).plan(f.geom, "sparse", start)
    assert e.value.key == "sparse.important_ratio"
    hints = [float(v) for v in str(e.value).split("(e.g. ")[1].rstrip(")").split(" or ")]
    assert hints and all(0 <= v <= 1 for v in hints)
    for v in hints:
        assert VisPrunerConfig(prune_ratio=0.6, important_ratio=v).plan(f.geom, "sparse", start)[0].n_out == 10


def test_tiny_recipe_compiles_with_parity(tmp_path):
    res = compile_recipe(ROOT / "recipes" / "tiny" / "vispruner_qwen2_5_vl.yml", tmp_path / "vp", "--targets", "onnx")
    assert res.returncode == 0, res.stderr[-2000:] + res.stdout[-2000:]
    passed = "onnx: vision, prefill and decode parity passed; greedy generation equals eager token for token"
    assert passed in res.stdout
