"""Layer selection, the `quantize_` verb and the RTN handler."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from tokcompile.quant import (
    QUANTIZERS,
    QuantReport,
    RTNConfig,
    WeightQuantConfig,
    fake_quantize,
    matches,
    quantize_,
    select_linears,
)
from tokcompile.quant.base import _HANDLERS

D, V = 16, 32
LLAVA_IGNORE = ("lm_head", "re:.*vision_tower.*", "re:.*multi_modal_projector.*")  # the adapter's default
LM_LINEARS = [
    f"model.language_model.layers.{i}.{p}"
    for i in range(2)
    for p in ("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj", "mlp.down_proj")
]


def _block(names: tuple[str, ...]) -> nn.Module:
    """A container with nested Linear children, e.g. ("self_attn.q_proj", "mlp.up_proj")."""
    root = nn.Module()
    for name in names:
        parent_name, leaf = name.split(".")
        if not hasattr(root, parent_name):
            root.add_module(parent_name, nn.Module())
        getattr(root, parent_name).add_module(leaf, nn.Linear(D, D, bias=True))
    return root


class ToyLlava(nn.Module):
    """Module tree named like transformers' LlavaForConditionalGeneration (no forward needed)."""

    def __init__(self, tie: bool = False):
        super().__init__()
        self.model = nn.Module()
        self.model.vision_tower = nn.Module()
        self.model.vision_tower.encoder = nn.Module()
        self.model.vision_tower.encoder.layers = nn.ModuleList([_block(("self_attn.q_proj", "mlp.fc1"))])
        self.model.multi_modal_projector = nn.Module()
        self.model.multi_modal_projector.linear_1 = nn.Linear(D, D)
        self.model.multi_modal_projector.linear_2 = nn.Linear(D, D)
        self.model.language_model = nn.Module()
        self.model.language_model.embed_tokens = nn.Embedding(V, D)
        self.model.language_model.layers = nn.ModuleList(
            [_block(("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj", "mlp.down_proj")) for _ in range(2)]
        )
        self.model.language_model.norm = nn.LayerNorm(D)
        self.lm_head = nn.Linear(D, V, bias=False)
        if tie:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight


@pytest.fixture
def toy() -> ToyLlava:
    torch.manual_seed(0)
    return ToyLlava()


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- config and registry -------------------------------------------------------------------------------------------


def test_weight_config() -> None:
    assert WeightQuantConfig(8).granularity == "per_channel"
    assert WeightQuantConfig(4, group_size=-1).granularity == "per_channel"
    assert WeightQuantConfig(4, group_size=128).granularity == "per_group"
    with pytest.raises(dataclasses.FrozenInstanceError):
        WeightQuantConfig(4).bit = 8  # type: ignore[misc]
    with pytest.raises(ValueError, match="bit=1"):
        WeightQuantConfig(1)
    assert WeightQuantConfig(1, symmetric=False).bit == 1
    with pytest.raises(ValueError, match="group_size=0"):
        WeightQuantConfig(4, group_size=0)


def test_registry_contract() -> None:
    assert QUANTIZERS.get("RTN") is RTNConfig  # a recipe's `method: RTN` finds the class
    for key in QUANTIZERS:
        cls = QUANTIZERS.get(key)
        assert cls.method == key  # registry key == file name == config.method
        assert cls in _HANDLERS
    with pytest.raises(KeyError, match="did you mean 'rtn'"):
        QUANTIZERS.get("rnt")


# --- select_linears ------------------------------------------------------------------------------------------------


def test_include_language_model(toy: ToyLlava) -> None:
    assert list(select_linears(toy, ["model.language_model"], ())) == LM_LINEARS


def test_whole_model_minus_adapter_ignores(toy: ToyLlava) -> None:
    everything = select_linears(toy, (), ())
    assert len(everything) == 2 + 2 + len(LM_LINEARS) + 1
    assert list(select_linears(toy, (), LLAVA_IGNORE)) == LM_LINEARS
    # plain names match whole dotted segments anywhere in the fqn
    assert list(select_linears(toy, (), ("lm_head", "vision_tower", "multi_modal_projector"))) == LM_LINEARS


def test_ignore_forms(toy: ToyLlava) -> None:
    lm = ["model.language_model"]
    assert list(select_linears(toy, lm, ["re:q_proj$"])) == [n for n in LM_LINEARS if not n.endswith("q_proj")]
    assert list(select_linears(toy, lm, ["*.mlp.*"])) == [n for n in LM_LINEARS if ".mlp." not in n]
    assert list(select_linears(toy, lm, ["layers.0"])) == [n for n in LM_LINEARS if ".layers.1." in n]
    assert list(select_linears(toy, lm, ["self_attn.k_proj"])) == [n for n in LM_LINEARS if "k_proj" not in n]
    # glob and regex naming a parent cover its children
    assert list(select_linears(toy, lm, ["*.layers.1"])) == [n for n in LM_LINEARS if ".layers.0." in n]
    assert list(select_linears(toy, lm, [r"re:^model\.language_model\.layers\.1$"])) == LM_LINEARS[:4]


def test_plain_names_are_whole_segments() -> None:
    assert matches("lm_head", "lm_head")
    assert matches("vision_tower", "model.vision_tower.encoder.layers.0.mlp.fc1")
    assert matches("layers.1", "m.layers.1.q")
    assert not matches("layers.1", "m.layers.10.q")
    assert not matches("proj", "m.q_proj")
    assert not matches("layer", "m.layers.0.q")


def test_include_forms_and_typo(toy: ToyLlava) -> None:
    assert list(select_linears(toy, ["lm_head"], ())) == ["lm_head"]
    assert list(select_linears(toy, ["re:multi_modal"], ())) == [
        "model.multi_modal_projector.linear_1",
        "model.multi_modal_projector.linear_2",
    ]
    # a prefix is a module path, not a string prefix
    with pytest.raises(ValueError, match="include 'model.language' matches no module"):
        select_linears(toy, ["model.language"], ())
    with pytest.raises(ValueError, match="did you mean 'model.language_model'"):
        select_linears(toy, ["model.langauge_model"], ())


# --- quantize_ -----------------------------------------------------------------------------------------------------


def test_rtn_quantizes_selected_only(toy: ToyLlava) -> None:
    before = _snapshot(toy)
    cfg = RTNConfig(WeightQuantConfig(bit=4, group_size=8))
    messages: list[str] = []
    report = quantize_(toy, cfg, include=["model.language_model"], ignore=["re:down_proj"], progress=messages.append)
    selected = [n for n in LM_LINEARS if "down_proj" not in n]
    assert list(report.layers) == selected and report.n_layers == len(selected) == len(messages)
    after = toy.state_dict()
    for key, old in before.items():
        module = key.rsplit(".", 1)[0]
        if module in selected and key.endswith(".weight"):
            assert not torch.equal(after[key], old), key
            assert torch.equal(after[key], fake_quantize(old, 4, True, 8)), key
        else:  # ignored layers, biases, embeddings, norms: bitwise unchanged
            assert torch.equal(after[key], old), key


def test_report(toy: ToyLlava) -> None:
    report = quantize_(toy, RTNConfig(WeightQuantConfig(bit=4)), include=["model.language_model"])
    assert isinstance(report, QuantReport)
    assert report.method == "rtn" and report.untied == ()
    assert all(0 < e < 0.2 for e in report.rel_errors.values())
    assert report.seconds >= 0
    d = json.loads(json.dumps(report.to_dict()))
    assert d["n_layers"] == len(LM_LINEARS) and d["layers"] == LM_LINEARS
    assert d["config"] == {"weight": {"bit": 4, "symmetric": True, "group_size": None, "sym_grid": "narrow"}}
    assert d["max_rel_error"] == max(d["rel_errors"].values())


def test_more_bits_less_error_through_quantize_() -> None:
    errs = []
    for bit in (4, 8):
        torch.manual_seed(0)
        errs.append(quantize_(ToyLlava(), RTNConfig(WeightQuantConfig(bit)), include=["model.language_model"]))
    assert errs[1].max_rel_error < errs[0].max_rel_error


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_preserved(toy: ToyLlava, dtype: torch.dtype) -> None:
    toy.to(dtype)
    name = LM_LINEARS[0]
    old = toy.get_submodule(name).weight.detach().clone()
    param = toy.get_submodule(name).weight
    quantize_(toy, RTNConfig(WeightQuantConfig(bit=4, symmetric=False, group_size=4)), include=[name])
    new = toy.get_submodule(name).weight
    assert new is param  # replaced in place, same Parameter
    assert new.dtype == dtype and new.device == old.device
    assert torch.equal(new, fake_quantize(old, 4, False, 4))


def test_tied_lm_head_is_untied_and_embedding_unchanged() -> None:
    torch.manual_seed(0)
    toy = ToyLlava(tie=True)
    embed = toy.model.language_model.embed_tokens
    assert toy.lm_head.weight is embed.weight
    old = embed.weight.detach().clone()
    report = quantize_(toy, RTNConfig(WeightQuantConfig(bit=4)), ignore=("vision_tower", "multi_modal_projector"))
    assert "lm_head" in report.layers and report.untied == ("lm_head",)
    assert toy.lm_head.weight is not embed.weight
    assert torch.equal(embed.weight, old)  # embedding keeps full precision
    assert torch.equal(toy.lm_head.weight, fake_quantize(old, 4, True, None))
    assert toy.lm_head.weight.requires_grad == embed.weight.requires_grad


def test_tied_lm_head_left_alone_when_ignored() -> None:
    toy = ToyLlava(tie=True)
    old = toy.lm_head.weight.detach().clone()
    report = quantize_(toy, RTNConfig(WeightQuantConfig(bit=4)), ignore=LLAVA_IGNORE)
    assert report.untied == ()
    assert toy.lm_head.weight is toy.model.language_model.embed_tokens.weight
    assert torch.equal(toy.lm_head.weight, old)


def test_group_size_mismatch_names_layer(toy: ToyLlava) -> None:
    with pytest.raises(ValueError, match=r"lm_head: group_size=5 does not divide in_features=16"):
        quantize_(toy, RTNConfig(WeightQuantConfig(bit=4, group_size=5)), include=["lm_head"])


def test_empty_selection_and_unknown_config(toy: ToyLlava) -> None:
    with pytest.raises(ValueError, match="no nn.Linear selected"):
        quantize_(toy, RTNConfig(WeightQuantConfig(bit=4)), include=["model.language_model"], ignore=["layers"])

    @dataclasses.dataclass(frozen=True)
    class NotRegistered:
        bit: int = 4

    with pytest.raises(TypeError, match="no quantization handler registered for NotRegistered"):
        quantize_(toy, NotRegistered(), include=["lm_head"])  # type: ignore[arg-type]


def test_tiny_hf_llava_tied() -> None:
    """The fqns and tying of a real (tiny, randomly initialised) transformers LLaVA."""
    transformers = pytest.importorskip("transformers")
    vision = transformers.CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4
    )
    text = transformers.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=64,
    )
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    embed = model.get_input_embeddings()
    assert model.lm_head.weight is embed.weight
    old_embed = embed.weight.detach().clone()
    ids = torch.randint(0, 32, (1, 5))
    report = quantize_(model, RTNConfig(WeightQuantConfig(bit=8)), ignore=LLAVA_IGNORE[1:])
    assert report.layers[-1] == "lm_head" and report.untied == ("lm_head",)
    assert all(n.startswith("model.language_model.") for n in report.layers[:-1])
    assert report.n_layers == 7 + 1  # q, k, v, o, gate, up, down + lm_head
    assert torch.equal(embed.weight, old_embed)
    with torch.no_grad():
        logits = model(input_ids=ids).logits  # (1, 5, V): still runs after quantization
    assert logits.shape == (1, 5, 64) and bool(torch.isfinite(logits).all())
