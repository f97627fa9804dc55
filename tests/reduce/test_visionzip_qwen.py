"""VisionZip on the Qwen families (LightCompress's Qwen2.5-VL path, at the projector output, scored by the tower's
last block) against the independent reference that runs the HF model with LightCompress's hooks."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import ROOT, compile_recipe, padded_family_case
from tests.references.visionzip_qwen import visionzip_qwen_reference
from tokcompile.errors import RecipeError
from tokcompile.models import ReducedVLM
from tokcompile.reduce.base import Entering
from tokcompile.reduce.schedule import Site
from tokcompile.reduce.visionzip import VisionZipConfig

SETTINGS = [(0.375, 0.125), (0.5, 0.25), (0.0, 0.2), (12, 4)]  # the last: counts, as a LLaVA recipe writes them


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_qwen_visionzip_matches_lightcompress_reference(family):
    f = padded_family_case(family)
    for dominant, contextual in SETTINGS:
        cfg = VisionZipConfig(dominant=dominant, contextual=contextual)
        schedule = cfg.plan(f.geom, "sparse", Entering.start_for(f.geom, f.adapter))
        assert [(s.site, s.n_in) for s in schedule] == [(Site.PROJECTOR_OUT, f.geom.n_image_tokens)]
        vlm = ReducedVLM(f.model, f.adapter, f.geom, schedule, (cfg,), f.image_id).eval()
        with torch.no_grad():
            out = vlm.run({n: f.batch[n] for n in f.adapter.input_names_for(f.geom)})
        for b in range(2):
            sample = f.adapter.sample_inputs(f.batch, b, f.geom)
            logits, assign = visionzip_qwen_reference(f.model, sample, image_token_id=f.image_id,
                                                      dominant=dominant, contextual=contextual)
            assert out["assign_0"][b].tolist() == assign.tolist(), (dominant, contextual, b)
            torch.testing.assert_close(out["logits"][b], logits, atol=1e-5, rtol=1e-5)
        assert int(out["assign_0"].max()) + 1 == schedule[0].n_out


@pytest.mark.parametrize(
    ("params", "key", "text"),
    [
        ({"dominant": 1.5, "contextual": 0.1}, "dominant", "fraction"),
        ({"dominant": 20, "contextual": 10}, "contextual", "exceed"),
        ({"dominant": 0.5, "contextual": 0.6}, "contextual", "exceed"),
        ({"dominant": 0.5, "contextual": 0.1, "prune_only": True}, "prune_only", "always keeps"),
    ],
)
def test_qwen_plan_errors_name_the_key(params, key, text):
    f = padded_family_case("qwen2_5_vl")
    with pytest.raises(RecipeError, match=text) as e:
        VisionZipConfig(**params).plan(f.geom, "sparse", Entering.start_for(f.geom, f.adapter))
    assert e.value.key == f"sparse.{key}"


def test_llava_still_takes_counts():
    f = padded_family_case("llava")
    with pytest.raises(RecipeError, match="integer count") as e:
        VisionZipConfig(dominant=0.5, contextual=0.1).plan(f.geom, "sparse", Entering.start_for(f.geom, f.adapter))
    assert e.value.key == "sparse.dominant"


def test_tiny_recipe_compiles_with_parity(tmp_path):
    res = compile_recipe(ROOT / "recipes" / "tiny" / "visionzip_qwen2_5_vl.yml", tmp_path / "vz", "--targets", "onnx")
    assert res.returncode == 0, res.stderr[-2000:] + res.stdout[-2000:]
    passed = "onnx: vision, prefill and decode parity passed; greedy generation equals eager token for token"
    assert passed in res.stdout
