"""The reduction contract, for every registered reducer against every family's tiny model.

Each reducer's tiny recipe (`recipes/tiny/<registry name>.yml`) supplies its parameters; its `sparse` section is
grafted onto each family's tiny recipe. The plan must either refuse the family at `--plan` with the adapter's
reason (a site the family lacks) or resolve, and then one eager forward at batch 2 (padded) must produce every
step's parity output with the planned shape, the planned number of image tokens at the decoder, finite logits,
and the same per-sample results as each sample alone. A method registered without a tiny recipe fails here.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import ROOT
from tokcompile.errors import RecipeError
from tokcompile.models import ADAPTERS, ReducedVLM, tiny
from tokcompile.parity import make_inputs
from tokcompile.plan import resolve
from tokcompile.question import for_plan
from tokcompile.recipe import load_recipe_dict
from tokcompile.reduce import REDUCERS
from tokcompile.reduce.base import FAMILY_NEEDS, missing_needs
from tokcompile.reduce.schedule import Output, Site, decoder_image_tokens_in

# family case -> the tiny recipe that fixes its resolution (and media)
FAMILY_RECIPES = {
    "llava": "recipes/demo.yml",
    "llava_next": "recipes/tiny/llava_next.yml",
    "llava_onevision": "recipes/tiny/llava_onevision.yml",
    "llava_onevision_video": "recipes/tiny/llava_onevision_video.yml",
    "qwen2_vl": "recipes/tiny/qwen2_vl.yml",
    "qwen2_5_vl": "recipes/tiny/qwen2_5_vl.yml",
    "qwen3_vl": "recipes/tiny/qwen3_vl.yml",
}


def _load(path: str | Path) -> dict:
    return yaml.safe_load((ROOT / path).read_text())


def _recipe(method: str, case: str) -> dict:
    data = copy.deepcopy(_load(FAMILY_RECIPES[case]))
    method_recipe = ROOT / "recipes" / "tiny" / f"{method}.yml"
    assert method_recipe.is_file(), f"registered reducer '{method}' has no tiny recipe at {method_recipe}"
    data["sparse"] = _load(method_recipe)["sparse"]
    data.pop("quant", None)
    data["model"].pop("type", None)
    return data


@pytest.fixture(scope="module")
def family_models():
    cache: dict = {}

    def get(family: str):
        if family not in cache:
            cache[family] = (tiny.build_model(family, seed=0), tiny.build_processor(family))
        return cache[family]

    return get


CASES = [(m, c) for m in REDUCERS.keys() for c in FAMILY_RECIPES]


def _site_follows_family(cls, data: dict) -> bool:
    """The reducer names no mandatory site (`sites_used()` empty): its plan picks the site the family offers."""
    from tokcompile.reduce.base import config_from_params

    section = data["sparse"].get("vision", data["sparse"])
    params = {k: v for k, v in section.get("special", {}).items() if k != "method"}
    cfg = config_from_params(cls, params, "sparse")
    return hasattr(cfg, "sites_used") and not cfg.sites_used()


def test_every_family_case_is_covered():
    assert set(tiny.FAMILIES) <= {c.removesuffix("_video") for c in FAMILY_RECIPES}


@pytest.mark.parametrize(("method", "case"), CASES, ids=[f"{m}-{c}" for m, c in CASES])
def test_reducer_against_family(method, case, family_models):
    data = _recipe(method, case)
    recipe = load_recipe_dict(data, f"{method}-{case}")
    cls = REDUCERS.get(method)
    family = tiny.tiny_family(data["model"]["path"])
    adapter = ADAPTERS.get(family)()
    missing = cls.sites - adapter.sites
    # a method whose site follows the family (VisionZip, VisPruner: the tower's output, else the tower's attention
    # at the projector output) needs one of them
    either = _site_follows_family(cls, data) and (Site.VISION_OUT in adapter.sites or adapter.tower_at_projector)
    if missing and not either:
        with pytest.raises(RecipeError) as e:
            resolve(recipe)
        msg = str(e.value)
        assert msg.startswith(f"{recipe.reductions[-1].method_key}: ") and "does not support" in msg
        assert adapter.site_refusals[next(iter(missing))] in msg
        return
    needs = missing_needs(cls, adapter)
    if needs:  # more than a site: what the family's adapter would have to hand the method
        with pytest.raises(RecipeError) as e:
            resolve(recipe)
        msg = str(e.value)
        assert msg.startswith(f"{recipe.reductions[-1].method_key}: ") and FAMILY_NEEDS[needs[0]] in msg
        return
    side = ADAPTERS.get(family)().geometry(tiny.build_config(family), None).side_streams
    if side:  # DeepStack: a merge before the last layer that adds side features must be refused
        twin = load_recipe_dict({**data, "model": {"path": "tiny-random:qwen2_5_vl"},
                                 "inputs": {**data["inputs"], "image_size": [64, 96]}}, f"{method}-twin")
        merges = [s for s in resolve(twin).schedule  # the same method on the family without side streams
                  if s.output is not Output.KEPT and (s.site.in_vision_graph or s.layer < side)]
        if merges:
            with pytest.raises(RecipeError) as e:
                resolve(recipe)
            assert "side features" in str(e.value) and str(e.value).startswith(f"{recipe.reductions[-1].key}")
            return
    plan = resolve(recipe)
    g = plan.geometry
    assert plan.schedule and all(s.method == method for s in plan.schedule)
    model, processor = family_models(family)
    batch = make_inputs(processor, plan.adapter, g, 2, 1, seed=3, max_len=10_000, question=for_plan(plan))[0].batch
    vlm = ReducedVLM(model, plan.adapter, g, plan.schedule, plan.reducers, plan.image_token_id).eval()
    with torch.no_grad():
        out = vlm.run(batch)
        vision = vlm.vision.run({n: batch[n] for n in vlm.layout.vision.inputs})
    assert out["logits"].shape == (2, g.vocab_size) and torch.isfinite(out["logits"]).all()
    n_dec = decoder_image_tokens_in(g.n_image_tokens, plan.schedule, g.vision_tokens)
    assert vision["image_embeds"].shape[:2] == (2, n_dec) == vision["image_source"].shape
    for name, step in zip(vlm.layout.step_outputs, plan.schedule):
        want = (2, step.n_out) if step.output is Output.KEPT else (2, step.n_in)
        assert tuple(out[name].shape) == want, name
        assert out[name].dtype == torch.int64
    # Every sample keeps its own tokens: alone, unpadded, it gives the same outputs as its row in the batch.
    for b in range(2):
        with torch.no_grad():
            alone = vlm.run(plan.adapter.sample_inputs(batch, b, g))
        for name in vlm.layout.step_outputs:
            assert torch.equal(alone[name][0], out[name][b]), name
        torch.testing.assert_close(alone["logits"][0], out["logits"][b], atol=1e-5, rtol=1e-5)
