from __future__ import annotations

import json
from dataclasses import replace

import pytest

from tokcompile.flops import (
    exact_layer_flops,
    fastv_layer_flops,
    format_flops,
    format_table,
    prefill_flops,
    vision_layer_flops,
)
from tokcompile.models.geometry import Geometry
from tokcompile.reduce.schedule import Site, Step

LLAVA_7B = Geometry(
    family="llava", n_layers=32, hidden_size=4096, intermediate_size=11008, n_heads=32, n_kv_heads=32,
    head_dim=128, vocab_size=32064, image_size=(336, 336), n_image_tokens=576, vision_layers=23,
    vision_hidden_size=1024, vision_intermediate_size=4096, vision_heads=16, vision_tokens=577,
)
TINY = Geometry(
    family="tiny", n_layers=4, hidden_size=8, intermediate_size=16, n_heads=2, n_kv_heads=1, head_dim=4,
    vocab_size=50, image_size=(28, 28), n_image_tokens=6, vision_layers=2, vision_hidden_size=4,
    vision_intermediate_size=8, vision_heads=1, vision_tokens=7,
)
N_TEXT = 35 + 40  # worked example: 35 system + 40 question tokens around 576 image tokens


def fastv_step(keep: int, layer: int = 3, n_in: int = 576) -> Step:
    return Step(method="fastv", site=Site.DECODER_LAYER, layer=layer, n_in=n_in, n_out=keep)


def test_fastv_layer_by_hand() -> None:
    # n=10, d=8, m=16: 4*10*64 = 2560; 2*100*8 = 1600; 2*10*8*16 = 2560
    assert fastv_layer_flops(10, 8, 16) == 2560 + 1600 + 2560 == 6720


def test_exact_layer_by_hand() -> None:
    # n=10, d=8, m=16, dq = 2*4 = 8, dkv = 1*4 = 4
    q = o = 2 * 10 * 8 * 8  # 1280 each
    k = v = 2 * 10 * 8 * 4  # 640 each
    qk = pv = 2 * 100 * 8  # 1600 each
    ffn = 6 * 10 * 8 * 16  # 7680
    assert q + o + k + v + qk + pv + ffn == 2560 + 1280 + 3200 + 7680 == 14720
    assert exact_layer_flops(10, TINY) == 14720


def test_vision_layer_by_hand() -> None:
    # n=7, dv=4, mv=8: 8*7*16 = 896; 4*49*4 = 784; 4*7*4*8 = 896
    assert vision_layer_flops(7, TINY) == 896 + 784 + 896


def test_negative_tokens_rejected() -> None:
    with pytest.raises(ValueError):
        fastv_layer_flops(-1, 8, 16)


def test_worked_example_llava_7b() -> None:
    # ALGORITHMS.md §0.6 item 6: T = 651 gives ~3.39 T (FastV convention, 32 layers) and ~8.65 T exact.
    assert 32 * fastv_layer_flops(651, 4096, 11008) == pytest.approx(3.39e12, rel=0.01)
    res = prefill_flops(LLAVA_7B, (), N_TEXT)
    assert res["tokens_per_layer"]["dense"] == [651] * 32
    assert res["conventions"]["fastv"]["dense"] == pytest.approx(3.39e12, rel=0.01)
    assert res["conventions"]["exact"]["dense"] == pytest.approx(8.65e12, rel=0.01)
    for n_img, expect in ((192, 1.36e12), (128, 1.03e12), (64, 0.71e12)):
        assert 32 * fastv_layer_flops(N_TEXT + n_img, 4096, 11008) == pytest.approx(expect, rel=0.02)
        step = Step(method="pool", site=Site.PROJECTOR_OUT, layer=0, n_in=576, n_out=n_img)
        res = prefill_flops(LLAVA_7B, (step,), N_TEXT)
        assert res["tokens_per_layer"]["reduced"] == [N_TEXT + n_img] * 32
        assert res["conventions"]["fastv"]["reduced"] == pytest.approx(expect, rel=0.02)
        assert res["scoring_overhead"] == 0


def test_fastv_schedule_k3_half() -> None:
    res = prefill_flops(LLAVA_7B, (fastv_step(288),), N_TEXT)
    reduced, dense = res["tokens_per_layer"]["reduced"], res["tokens_per_layer"]["dense"]
    assert reduced[:3] == dense[:3] == [651] * 3
    assert reduced[3:] == [N_TEXT + 288] * 29
    assert res["image_tokens_per_layer"] == [576] * 3 + [288] * 29
    for conv in ("fastv", "exact"):
        entry = res["conventions"][conv]
        assert entry["ratio"] < 1
        assert entry["reduction"] == pytest.approx(1 - entry["ratio"])
    # FastV convention with the full prompt length: ~41 % reduction (ALGORITHMS.md §0.6 item 1).
    assert res["conventions"]["fastv"]["reduction"] == pytest.approx(0.41, abs=0.01)
    dq = 32 * 128
    assert res["scoring_overhead"] == 2 * 4096 * dq + 2 * 651 * dq
    assert res["total_exact"]["ratio"] < 1


def test_nothing_pruned_ratio_one_with_overhead() -> None:
    res = prefill_flops(LLAVA_7B, (fastv_step(576),), N_TEXT)
    assert res["tokens_per_layer"]["reduced"] == res["tokens_per_layer"]["dense"]
    for conv in ("fastv", "exact"):
        assert res["conventions"][conv]["ratio"] == 1.0
        assert res["conventions"][conv]["reduction"] == 0.0
    dq = 32 * 128
    overhead = 2 * 4096 * dq + 2 * 651 * dq
    assert res["scoring_overhead"] == overhead > 0
    total = res["total_exact"]
    assert total["reduced"] == total["dense"] + overhead
    assert total["ratio"] > 1


def test_total_exact_composition() -> None:
    res = prefill_flops(TINY, (), 3)
    n = 3 + 6
    vision = 2 * vision_layer_flops(7, TINY)
    assert {k: res["vision"][k] for k in ("dense", "reduced", "ratio")} == {"dense": vision, "reduced": vision,
                                                                            "ratio": 1.0}
    assert res["lm_head"] == 2 * 8 * 50
    assert res["total_exact"]["dense"] == vision + 4 * exact_layer_flops(n, TINY) + 2 * 8 * 50
    assert res["total_exact"]["reduced"] == res["total_exact"]["dense"]


def test_step_at_layer_zero_overhead() -> None:
    res = prefill_flops(TINY, (fastv_step(2, layer=0, n_in=6),), 3)
    assert res["tokens_per_layer"]["reduced"] == [5] * 4
    assert res["scoring_overhead"] == 2 * 8 * 8 + 2 * (3 + 6) * 8


def test_gqa_saves_exactly_kv_projections() -> None:
    mha = replace(TINY, n_kv_heads=2)
    n, d, hd = 10, 8, 4
    diff = 2 * (2 * n * d * (2 * hd)) - 2 * (2 * n * d * (1 * hd))  # k and v projections, MHA minus GQA
    assert exact_layer_flops(n, mha) - exact_layer_flops(n, TINY) == diff == 2 * 1280 - 2 * 640 == 1280
    gqa7b = replace(LLAVA_7B, n_kv_heads=8)
    kv_diff = 2 * (2 * 651 * 4096 * (32 - 8) * 128)
    assert exact_layer_flops(651, LLAVA_7B) - exact_layer_flops(651, gqa7b) == kv_diff


def test_vision_block_step_shrinks_the_tower_and_the_decoder() -> None:
    step = Step(method="tome", site=Site.VISION_BLOCK, layer=4, n_in=577, n_out=400)
    res = prefill_flops(LLAVA_7B, (step,), N_TEXT)
    g = LLAVA_7B
    dv, mv = g.vision_hidden_size, g.vision_intermediate_size
    block = 8 * 577 * dv * dv + 4 * 577 * 577 * dv + 4 * 400 * dv * mv  # attention on 577, MLP on 400
    want = 4 * vision_layer_flops(577, g) + block + (g.vision_layers - 5) * vision_layer_flops(400, g)
    assert res["vision"]["reduced"] == want
    assert res["vision"]["tokens_per_block"][4] == [577, 400] and res["vision"]["tokens_per_block"][5] == [400, 400]
    # CLS is dropped by LLaVA's feature selection: 399 image tokens reach every decoder layer.
    assert res["tokens_per_layer"]["reduced"] == [N_TEXT + 399] * 32


def test_json_serialisable() -> None:
    res = prefill_flops(LLAVA_7B, (fastv_step(288),), N_TEXT)
    assert json.loads(json.dumps(res)) == res
    assert set(res["conventions"]["exact"]) == {"dense", "reduced", "ratio", "reduction", "formula"}
    assert res["conventions"]["fastv"]["formula"] == "4nd^2+2n^2d+2ndm per layer"


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (3_394_000_000_000, "3.39 TFLOPs"),
        (12_500_000_000, "12.5 GFLOPs"),
        (840_000_000, "840 MFLOPs"),
        (999_700_000_000, "1 TFLOPs"),
        (1_000, "1 KFLOPs"),
        (12, "12 FLOPs"),
        (0, "0 FLOPs"),
    ],
)
def test_format_flops(n: int, text: str) -> None:
    assert format_flops(n) == text


def test_format_table() -> None:
    table = format_table(prefill_flops(LLAVA_7B, (fastv_step(288),), N_TEXT))
    lines = table.splitlines()
    assert 4 <= len(lines) <= 10
    assert "fastv" in table and "exact" in table and "total exact" in table
    assert "3.39 TFLOPs" in table
