"""Contract parts no registered method uses yet: a step inside a decoder layer (between attention and MLP), and
token sizes that bias attention (proportional attention) in prefill and, through the cache's key bias, in decode.

Two toy reducers exercise them: `PairMerge` merges image tokens two by two (size-weighted, sizes summed) before
a decoder layer; `MidDrop` drops the second half of the image tokens inside a decoder layer. Cached decode must
equal the no-cache reference (the whole reduced prompt re-run every step), and one in-process compile to ONNX
must pass parity for the vision, prefill and decode graphs and generate the same tokens as eager.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import yaml

from tests.conftest import make_batch
from tokcompile.generation import GenerationConfig, generate, no_cache_logits
from tokcompile.graphs import build_modules, eager_runners
from tokcompile.pipeline import compile_recipe, plan_recipe
from tokcompile.reduce import REDUCERS
from tokcompile.reduce.ops import gather_tokens, keep_image_tokens_index
from tokcompile.reduce.prune import keep_image_tokens
from tokcompile.reduce.schedule import Output, Site, Step
from tokcompile.reduce.state import TokenState


@dataclass(frozen=True)
class PairMerge:
    pruning_loc: int = 2
    method: ClassVar[str] = "PairMerge"
    sites: ClassVar[frozenset[Site]] = frozenset({Site.DECODER_LAYER})

    def plan(self, geom, key, entering):
        n = entering.image_tokens
        return (Step("pairmerge", Site.DECODER_LAYER, self.pruning_loc, n, n // 2, Output.ASSIGN, sizes=True),)

    def apply(self, state, ctx, step, forced=None):
        B, T, _ = state.hidden.shape
        k = step.n_out
        first = (2 * torch.arange(k))[None].expand(B, k)  # (B, k) the first token of every pair
        src = keep_image_tokens_index(state.image_start, first, step.n_in, T)  # (B, T')
        rel = torch.arange(src.shape[1])[None] - state.image_start[:, None]
        pair = (rel >= 0) & (rel < k)  # (B, T') image slots
        partner = torch.where(pair, src + 1, src)
        sizes = state.sizes if state.sizes is not None else torch.ones(B, T)
        sa = gather_tokens(sizes, src)
        sb = torch.where(pair, gather_tokens(sizes, partner), torch.zeros_like(sa))  # (B, T')
        hidden = (sa[..., None] * gather_tokens(state.hidden, src)
                  + sb[..., None] * gather_tokens(state.hidden, partner)) / (sa + sb)[..., None]
        last = torch.where(state.last >= state.image_start + step.n_in, state.last - (step.n_in - k), state.last)
        new = TokenState(hidden, gather_tokens(state.positions, src), gather_tokens(state.valid, src),
                         state.image_start, k, last, sa + sb)
        assign = (torch.arange(step.n_in) // 2)[None].expand(B, step.n_in)  # (B, N) slot of every token
        return new, assign


@dataclass(frozen=True)
class MidDrop:
    layer: int = 1
    method: ClassVar[str] = "MidDrop"
    sites: ClassVar[frozenset[Site]] = frozenset({Site.DECODER_MID})

    def plan(self, geom, key, entering):
        n = entering.image_tokens
        return (Step("middrop", Site.DECODER_MID, self.layer, n, n // 2),)

    def apply(self, state, ctx, step, forced=None):
        B = state.hidden.shape[0]
        assert ctx.keys_here is not None and ctx.keys_here.shape[2] == state.hidden.shape[1]
        kept = torch.arange(step.n_out)[None].expand(B, step.n_out) if forced is None else forced
        return keep_image_tokens(state, kept, step), kept


@pytest.fixture()
def toys(monkeypatch):
    monkeypatch.setitem(REDUCERS._entries, "pairmerge", PairMerge)
    monkeypatch.setitem(REDUCERS._entries, "middrop", MidDrop)


def _recipe(tmp_path, sparse):
    data = {"base": {"seed": 1}, "model": {"path": "tiny-random:llava"}, "inputs": {"batch_size": 2,
            "max_prompt_len": 128}, "sparse": sparse, "export": {"targets": ["onnx"]},
            "parity": {"samples": 1}}
    path = tmp_path / "toy.yml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("sparse", [
    {"special": {"method": "PairMerge", "pruning_loc": 2}},
    {"special": {"method": "MidDrop", "layer": 1}},
], ids=["sizes-before-layer", "inside-layer"])
def test_cached_decode_equals_no_cache_reference(toys, tmp_path, tiny_model, processor, sparse):
    plan = plan_recipe(_recipe(tmp_path, sparse))
    reduced, decode = build_modules(plan, tiny_model)
    batch = make_batch(processor, ["What is shown here in this picture, in detail?", "Hi?"])
    run = generate(*eager_runners(reduced, decode), batch, layout=reduced.layout,
                   cfg=GenerationConfig(max_new_tokens=5), keep_logits=True)
    ref = no_cache_logits(reduced, batch, run)
    for got, want in zip(run.step_logits, ref):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    lay = reduced.layout
    if "PairMerge" in str(sparse):
        assert lay.groups == ((0, 2), (2, 4)) and lay.biased_groups == (1,)
        assert "cache_bias_1" in lay.prefill.outputs and "attention_bias_1" in lay.decode.inputs
        with torch.no_grad():
            out = reduced.run(batch)
        bias = out["cache_bias_1"]
        assert torch.allclose(bias.exp().sum(1), torch.full((2,), float(bias.shape[1] + 32)))  # 32 pairs of 2
    else:
        assert lay.groups == ((0, 2), (2, 4)) and lay.biased_groups == ()  # layer 1 caches all; layer 2 on: half


def test_key_bias_compiles_to_onnx_with_parity(toys, tmp_path):
    """The size bias crosses the graph boundary: prefill returns it per biased cache group, decode takes it."""
    sparse = {"special": {"method": "PairMerge", "pruning_loc": 2}}
    out = tmp_path / "out"
    logs: list[str] = []
    compile_recipe(_recipe(tmp_path, sparse), out=out, log=logs.append)
    assert any("vision, prefill and decode parity passed" in line for line in logs)
    manifest = yaml.safe_load((out / "manifest.json").read_text())
    assert manifest["layout"]["biased_groups"] == [1]
    assert "attention_bias_1" in manifest["layout"]["decode"]["inputs"]


@dataclass(frozen=True)
class ClsTopK:
    """Keep CLS and the k patches the CLS row attends to most at the selected vision layer (FasterVLM-like)."""

    keep: int = 16
    method: ClassVar[str] = "ClsTopK"
    sites: ClassVar[frozenset[Site]] = frozenset({Site.VISION_OUT})

    def plan(self, geom, key, entering):
        t = entering.vision_tokens
        return (Step("clstopk", Site.VISION_OUT, 0, t, self.keep + 1),)

    def apply(self, tokens, ctx, step, forced=None):
        from dataclasses import replace

        from tokcompile.reduce.ops import topk_sorted

        cls_row = ctx.attention(torch.tensor([0])).sum(1)[:, 0]  # (B, t): summed over heads
        top = topk_sorted(cls_row[:, 1:], self.keep) + 1  # (B, k) patches, ascending
        kept = torch.cat([torch.zeros_like(top[:, :1]), top], dim=1) if forced is None else forced  # CLS first
        return replace(tokens, hidden=gather_tokens(tokens.hidden, kept),
                       source=gather_tokens(tokens.source, kept)), kept


def test_vision_out_site_sees_the_selected_layers_attention(monkeypatch, tmp_path, tiny_model, processor):
    """At `vision_out` the context's CLS row equals HF CLIP's own eager attention of the selected layer."""
    from tokcompile.reference import eager_attention

    monkeypatch.setitem(REDUCERS._entries, "clstopk", ClsTopK)
    plan = plan_recipe(_recipe(tmp_path, {"vision": {"special": {"method": "ClsTopK", "keep": 16}}}))
    assert [(s.site, s.n_in, s.n_out) for s in plan.schedule] == [(Site.VISION_OUT, 65, 17)]
    assert plan.to_dict()["image_tokens_to_decoder"] == 16
    reduced, decode = build_modules(plan, tiny_model)
    batch = make_batch(processor, ["What is shown here in this picture, in detail?", "Hi?"])
    with torch.no_grad():
        out = reduced.run(batch)
        tower = tiny_model.model.vision_tower
        with eager_attention(tiny_model):
            hf = tower(batch["pixel_values"], output_attentions=True)
    layer = plan.geometry.vision_layers - 1  # the selected layer (feature layer -2: the last block that runs)
    cls_row = hf.attentions[layer][:, :, 0].sum(1)  # (B, t)
    want = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long),
                                   1 + sorted_topk(cls_row[b, 1:], 16)]) for b in range(2)])
    assert torch.equal(out["kept_0"], want)
    assert out["image_embeds"].shape[1] == 16 and torch.equal(out["image_source"], want[:, 1:] - 1)
    run = generate(*eager_runners(reduced, decode), batch, layout=reduced.layout,
                   cfg=GenerationConfig(max_new_tokens=4), keep_logits=True)
    for got, ref in zip(run.step_logits, no_cache_logits(reduced, batch, run)):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def sorted_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    order = sorted(range(len(scores)), key=lambda j: (-float(scores[j]), j))  # score desc, index asc
    return torch.tensor(sorted(order[:k]))
