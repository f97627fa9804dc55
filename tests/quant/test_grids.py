"""The two symmetric grids (`sym_grid`): "narrow" `absmax / (2^(b-1) - 1)` and "full" `2·absmax / (2^b - 1)`,
through the primitives, RTN, GPTQ and the plan; the full grid against an independent unsigned-form reference."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from tokcompile.quant import RTNConfig, WeightQuantConfig, quantize_
from tokcompile.quant.gptq import GPTQConfig, add_to_hessian, gptq_quantize
from tokcompile.quant.primitives import (
    compute_qparams,
    dequantize,
    fake_quantize,
    num_groups,
    quantize,
    quantize_column,
    relative_error,
)


def _gaussian(seed: int, rows: int = 256, cols: int = 512) -> Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))  # (O, I)


def _reference_full(w: Tensor, bit: int, group_size: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """The symmetric grid of GPTQModel/AutoGPTQ (`Quantizer.find_params`, `sym=True`, no MSE search), in their
    unsigned form: `maxq = 2^b - 1`, range widened to contain 0, `xmin = -xmax` when negative, `zero =
    (maxq + 1) / 2`, `q = clamp(round(w / scale) + zero, 0, maxq)`. Returns unsigned codes (O, I), scale and
    zero (O, G)."""
    maxq = 2**bit - 1
    n_groups, g = num_groups(w.shape[1], group_size)
    x = w.float().reshape(w.shape[0], n_groups, g)  # (O, G, g)
    zeros = torch.zeros(x.shape[:2])  # (O, G)
    xmin = torch.minimum(x.amin(-1), zeros)
    xmax = torch.maximum(x.amax(-1), zeros)
    xmax = torch.maximum(xmin.abs(), xmax)
    xmin = torch.where(xmin < 0, -xmax, xmin)  # a group with no negative weight keeps xmin = 0
    empty = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(empty, -1.0, xmin), torch.where(empty, 1.0, xmax)
    scale = (xmax - xmin) / maxq  # (O, G)
    zero = torch.full_like(scale, (maxq + 1) / 2)  # (O, G)
    q = torch.clamp(torch.round(x / scale[..., None]) + zero[..., None], 0, maxq)  # (O, G, g)
    return q.reshape(w.shape).to(torch.int32), scale, zero


# --- the full grid -------------------------------------------------------------------------------------------------


def test_full_grid_by_hand() -> None:
    # absmax = 7.5 → scale = 15 / 15 = 1. Quotients -7.5 → -8 (half to even), 7.5 → 8 → clipped to 7.
    w = torch.tensor([[-7.5, 7.5, 0.5, 1.5, -2.5, 3.0]])
    scale, zero = compute_qparams(w, 4, True, None, "full")
    assert scale.tolist() == [[1.0]] and zero.tolist() == [[0.0]]
    codes = quantize(w, scale, zero, 4, True, None)
    assert codes.tolist() == [[-8, 7, 0, 2, -2, 3]]
    assert fake_quantize(w, 4, True, None, "full").tolist() == [[-8.0, 7.0, 0.0, 2.0, -2.0, 3.0]]
    w_hat = fake_quantize(w, 4, True, None, "full")
    assert compute_qparams(w_hat, 4, True, None, "full")[0].item() == pytest.approx(16 / 15)  # not idempotent
    narrow, _ = compute_qparams(w, 4, True, None)
    assert narrow.item() == pytest.approx(7.5 / 7)  # the default grid is unchanged


@pytest.mark.parametrize("group_size", [128, None])
def test_full_grid_uses_every_code(group_size: int | None) -> None:
    w = _gaussian(0)
    scale, zero = compute_qparams(w, 4, True, group_size, "full")  # (O, G)
    assert torch.equal(zero, torch.zeros_like(zero))
    torch.testing.assert_close(scale, 2 * w.abs().reshape(256, scale.shape[1], -1).amax(-1) / 15, rtol=0, atol=0)
    codes = quantize(w, scale, zero, 4, True, group_size)  # (O, I)
    assert int(codes.min()) == -8 and int(codes.max()) == 7
    assert torch.unique(codes).tolist() == list(range(-8, 8))  # all 16 levels
    per_col = scale.repeat_interleave(w.shape[1] // scale.shape[1], dim=1)  # (O, I)
    w_hat = dequantize(codes, scale, zero, group_size)
    assert torch.equal(w_hat, codes.float() * per_col)  # exactly codes · scale
    assert torch.equal(fake_quantize(w, 4, True, group_size, "full"), w_hat)
    assert bool(((w - w_hat).abs() <= per_col / 2 * (1 + 1e-5)).all())  # within scale / 2 up to float32 ulps
    narrow = quantize(w, *compute_qparams(w, 4, True, group_size), 4, True, group_size)
    assert int(narrow.min()) == -7  # the default grid never reaches -8


@pytest.mark.parametrize("group_size", [128, None])
def test_full_grid_has_lower_rtn_error(group_size: int | None) -> None:
    narrow, full = [], []
    for seed in range(4):
        w = _gaussian(seed)
        narrow.append(relative_error(w, fake_quantize(w, 4, True, group_size)))
        full.append(relative_error(w, fake_quantize(w, 4, True, group_size, "full")))
    ratio = sum(full) / sum(narrow)
    print(f"4-bit RTN, group {group_size or 'per-channel'}: relative error narrow {sum(narrow) / 4:.4f}, "
          f"full {sum(full) / 4:.4f}, ratio {ratio:.3f}")
    assert ratio < 0.97


@pytest.mark.parametrize("bit", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [128, None])
def test_full_grid_matches_unsigned_reference(bit: int, group_size: int | None) -> None:
    w = _gaussian(bit)
    w[3] = 0  # an all-zero row: both give code 0 (with different but irrelevant scales)
    ref_q, ref_scale, ref_zero = _reference_full(w, bit, group_size)
    scale, zero = compute_qparams(w, bit, True, group_size, "full")
    codes = quantize(w, scale, zero, bit, True, group_size)
    assert torch.equal(ref_zero, torch.full_like(ref_zero, 2 ** (bit - 1)))  # (maxq + 1) / 2, an exact integer
    assert torch.equal(codes + 2 ** (bit - 1), ref_q)  # bit-identical codes
    live = torch.ones_like(scale, dtype=torch.bool)
    live[3] = False
    assert torch.equal(scale[live], ref_scale[live])  # bit-identical scales
    ref_w = (ref_q.float() - ref_zero.repeat_interleave(ref_q.shape[1] // ref_zero.shape[1], 1)) * (
        ref_scale.repeat_interleave(ref_q.shape[1] // ref_scale.shape[1], 1))  # (O, I)
    assert torch.equal(fake_quantize(w, bit, True, group_size, "full"), ref_w)


def test_reference_zero_point_is_set_not_rounded() -> None:
    # With xmin = -absmax the ideal zero -xmin / scale is (2^b - 1) / 2 = 7.5; in float32 the quotient lands on
    # either side of the tie, so the asymmetric rule round(-xmin / scale) would give 7 for some groups. Both
    # the reference and the signed form (q' = q + 8) rely on the exact (maxq + 1) / 2 = 8.
    w = _gaussian(0)
    _, scale, zero = _reference_full(w, 4, 128)
    absmax = w.abs().reshape(256, 4, 128).amax(-1)  # (O, G)
    rounded = torch.round(absmax / scale)
    assert set(rounded.unique().tolist()) == {7.0, 8.0}
    assert torch.equal(zero, torch.full_like(zero, 8.0))


def test_groups_without_negatives_differ_from_reference() -> None:
    # The one documented difference: the reference keeps xmin = 0 for an all-positive group (scale absmax/15),
    # clipping its upper half; this grid always uses 2·absmax/15, so every weight stays within scale / 2.
    w = _gaussian(1, 8, 256)
    w[0, :128] = w[0, :128].abs() + 0.01  # row 0, group 0: no negative weight
    ref_q, ref_scale, _ = _reference_full(w, 4, 128)
    scale, zero = compute_qparams(w, 4, True, 128, "full")
    codes = quantize(w, scale, zero, 4, True, 128)
    same = (codes + 8 == ref_q).reshape(8, 2, 128).all(-1)  # (O, G)
    assert not same[0, 0] and same.sum() == same.numel() - 1
    assert scale[0, 0] == 2 * ref_scale[0, 0]
    w_hat = fake_quantize(w, 4, True, 128, "full")
    assert float((w - w_hat)[0, :128].abs().max()) <= float(scale[0, 0]) / 2 * (1 + 1e-5)


def test_column_path_matches_full_grid() -> None:
    w = _gaussian(2, 16, 64)
    scale, zero = compute_qparams(w, 4, True, 16, "full")  # (O, 4)
    expected = fake_quantize(w, 4, True, 16, "full")
    for j in range(64):
        col = quantize_column(w[:, j], scale[:, j // 16], zero[:, j // 16], 4, True)
        assert torch.equal(col, expected[:, j])


def test_sym_grid_validation() -> None:
    from tokcompile.quant.primitives import SYM_GRIDS
    from tokcompile.recipe import SYM_GRIDS as RECIPE_SYM_GRIDS

    assert RECIPE_SYM_GRIDS == SYM_GRIDS  # the recipe keeps its own copy to stay free of torch
    assert WeightQuantConfig(4).sym_grid == "narrow"
    assert WeightQuantConfig(4, sym_grid="full").sym_grid == "full"
    assert WeightQuantConfig(4, symmetric=False, sym_grid="narrow").symmetric is False
    with pytest.raises(ValueError, match="sym_grid='wide'"):
        WeightQuantConfig(4, sym_grid="wide")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="symmetric"):
        WeightQuantConfig(4, symmetric=False, sym_grid="full")
    with pytest.raises(ValueError, match="symmetric"):
        compute_qparams(torch.ones(2, 4), 4, False, None, "full")


# --- RTN and GPTQ --------------------------------------------------------------------------------------------------


def test_rtn_full_grid() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 64), nn.Linear(64, 32))
    before = [m.weight.detach().clone() for m in model]
    report = quantize_(model, RTNConfig(WeightQuantConfig(4, group_size=64, sym_grid="full")))
    assert report.config["weight"]["sym_grid"] == "full"  # the report (and so the manifest) records the grid
    for m, w in zip(model, before):
        assert torch.equal(m.weight, fake_quantize(w, 4, True, 64, "full"))


def _hessian(seed: int, cols: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(1024, cols, generator=g) @ (torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols))
    return add_to_hessian(None, 0, X)[0]  # (I, I)


@pytest.mark.parametrize(("group_size", "actorder", "static_groups"), [(None, False, False), (64, False, False),
                                                                        (64, True, True)])
def test_gptq_full_grid_on_grid(group_size: int | None, actorder: bool, static_groups: bool) -> None:
    W, H = _gaussian(5, 64, 256), _hessian(5, 256)
    res = gptq_quantize(W, H, bit=4, symmetric=True, group_size=group_size, actorder=actorder,
                        static_groups=static_groups, sym_grid="full")
    assert int(res.codes.min()) == -8 and int(res.codes.max()) == 7
    assert torch.equal(res.weight, res.dequantize())  # every column on its group's grid
    assert torch.all(res.zero == 0)
    narrow = gptq_quantize(W, H, bit=4, symmetric=True, group_size=group_size, actorder=actorder,
                           static_groups=static_groups)
    assert not torch.equal(res.scale, narrow.scale)


@pytest.mark.parametrize("group_size", [None, 32])
def test_gptq_identity_hessian_equals_rtn_full(group_size: int | None) -> None:
    W = _gaussian(6, 32, 128)
    res = gptq_quantize(W, torch.eye(128), bit=4, symmetric=True, group_size=group_size, blocksize=64,
                        sym_grid="full")  # diagonal Hinv: no error feedback
    assert torch.equal(res.weight, fake_quantize(W, 4, True, group_size, "full"))
    s, z = compute_qparams(W, 4, True, group_size, "full")
    assert torch.equal(res.scale, s) and torch.equal(res.zero, z)


def test_gptq_handler_passes_the_grid() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 32))
    w = model[0].weight.detach().clone()
    cfg = GPTQConfig(WeightQuantConfig(4, group_size=32, sym_grid="full"))
    quantize_(model, cfg, hessians={"0": torch.eye(128)})
    assert torch.equal(model[0].weight, fake_quantize(w, 4, True, 32, "full"))


# --- recipe to plan ------------------------------------------------------------------------------------------------


def test_plan_threads_the_grid() -> None:
    from tokcompile.plan import format_plan, resolve
    from tokcompile.recipe import load_recipe_dict

    data = {"model": {"path": "tiny-random:llava"},
            "quant": {"method": "RTN", "weight": {"bit": 4, "sym_grid": "full"}}}
    plan = resolve(load_recipe_dict(data, "t"))
    assert plan.quant.weight.sym_grid == "full"
    assert "w4 sym full per channel" in format_plan(plan)
    del data["quant"]["weight"]["sym_grid"]
    plan = resolve(load_recipe_dict(data, "t"))
    assert plan.quant.weight.sym_grid == "narrow" and "w4 sym per channel" in format_plan(plan)
