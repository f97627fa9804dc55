"""Hand-computed grids and properties of `tokcompile.quant.primitives`."""

from __future__ import annotations

import pytest
import torch

from tokcompile.quant.primitives import (
    compute_qparams,
    dequantize,
    fake_quantize,
    num_groups,
    qrange,
    quantize,
    quantize_column,
    relative_error,
)

GRIDS = [  # (bit, symmetric, group_size)
    (2, True, None),
    (3, True, 8),
    (4, True, None),
    (4, True, 16),
    (8, True, -1),
    (1, False, None),
    (3, False, 8),
    (4, False, None),
    (4, False, 16),
    (8, False, 32),
]


def _w(out: int = 12, inp: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g) * torch.rand(out, 1, generator=g) * 3  # rows of varied range


# --- conventions ---------------------------------------------------------------------------------------------------


def test_torch_round_is_half_to_even() -> None:
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -3.5])
    assert torch.round(x).tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, -4.0]


def test_qrange() -> None:
    assert qrange(4, True) == (-8, 7)
    assert qrange(8, True) == (-128, 127)
    assert qrange(4, False) == (0, 15)
    assert qrange(1, False) == (0, 1)
    for bad in (1, 0, 17):
        with pytest.raises(ValueError, match="bit="):
            qrange(bad, True)


# --- hand-computed -------------------------------------------------------------------------------------------------


def test_symmetric_4bit_by_hand() -> None:
    # absmax = 2 → scale = 2/7. Quotients w/scale = [1.75, -3.5, 0.875, 7] mathematically, but float32(2/7) is
    # 0.28571430 > 2/7, so the float32 quotient for -1.0 is -3.4999998 and rounds to -3, not to the tie's -4.
    w = torch.tensor([[0.5, -1.0, 0.25, 2.0]])
    scale, zero = compute_qparams(w, 4, True, None)
    assert scale.shape == zero.shape == (1, 1)
    assert scale.dtype == zero.dtype == torch.float32
    assert scale.item() == pytest.approx(2 / 7, rel=1e-7)
    assert zero.item() == 0.0
    codes = quantize(w, scale, zero, 4, True, None)
    assert codes.dtype == torch.int32
    assert codes.tolist() == [[2, -3, 1, 7]]
    w_hat = fake_quantize(w, 4, True, None)
    torch.testing.assert_close(w_hat, torch.tensor([[4 / 7, -6 / 7, 2 / 7, 2.0]]))


def test_symmetric_half_to_even_on_exact_ties() -> None:
    # absmax = 7 → scale = 1 exactly, so the quotients 0.5, -3.5, 2.5 are true ties: half to even.
    w = torch.tensor([[0.5, -3.5, 2.5, 7.0]])
    scale, zero = compute_qparams(w, 4, True, None)
    assert scale.item() == 1.0
    assert quantize(w, scale, zero, 4, True, None).tolist() == [[0, -4, 2, 7]]
    assert fake_quantize(w, 4, True, None).tolist() == [[0.0, -4.0, 2.0, 7.0]]


def test_asymmetric_2bit_by_hand() -> None:
    # xmin = -1, xmax = 2, qmax = 3 → scale = 1, zero = round(1) = 1.
    # q = clamp(round([-1, 0, 0.5, 2]) + 1, 0, 3) = [0, 1, 0 + 1 (0.5 → 0, half to even), 3].
    w = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    scale, zero = compute_qparams(w, 2, False, None)
    assert scale.tolist() == [[1.0]] and zero.tolist() == [[1.0]]
    codes = quantize(w, scale, zero, 2, False, None)
    assert codes.tolist() == [[0, 1, 1, 3]]
    assert dequantize(codes, scale, zero, None).tolist() == [[-1.0, 0.0, 0.0, 2.0]]


def test_asymmetric_min_is_clamped_to_zero() -> None:
    # All positive: xmin = min(0.1, 0) = 0, xmax = 1.5, qmax = 15 → scale = 0.1, zero = 0, codes [1, 4, 7, 15].
    w = torch.tensor([[0.1, 0.4, 0.7, 1.5]])
    scale, zero = compute_qparams(w, 4, False, None)
    assert scale.item() == pytest.approx(0.1, rel=1e-6)
    assert zero.item() == 0.0
    assert quantize(w, scale, zero, 4, False, None).tolist() == [[1, 4, 7, 15]]
    torch.testing.assert_close(fake_quantize(w, 4, False, None), w)


def test_per_group_3bit_by_hand() -> None:
    # 3-bit symmetric: qmax = 3. group_size 2 → 2 groups per row; scales are powers of two, so ties are exact.
    w = torch.tensor(
        [
            [3.0, -1.5, 0.75, -0.375],  # g0 absmax 3 → scale 1; g1 absmax 0.75 → scale 0.25
            [-6.0, 2.0, 0.0, 0.0],  # g0 absmax 6 → scale 2;  g1 all zero → scale 1 (not 0)
        ]
    )
    scale, zero = compute_qparams(w, 3, True, 2)
    assert scale.tolist() == [[1.0, 0.25], [2.0, 1.0]]
    assert zero.tolist() == [[0.0, 0.0], [0.0, 0.0]]
    codes = quantize(w, scale, zero, 3, True, 2)
    # row 0: [3, round(-1.5) = -2 | 3, round(-1.5) = -2]; row 1: [-3, 1 | 0, 0]
    assert codes.tolist() == [[3, -2, 3, -2], [-3, 1, 0, 0]]
    w_hat = dequantize(codes, scale, zero, 2)
    assert w_hat.tolist() == [[3.0, -2.0, 0.75, -0.5], [-6.0, 2.0, 0.0, 0.0]]
    assert torch.equal(fake_quantize(w, 3, True, 2), w_hat)


def test_all_zero_weight_gets_unit_scale() -> None:
    w = torch.zeros(3, 8)
    for symmetric in (True, False):
        scale, zero = compute_qparams(w, 4, symmetric, 4)
        assert torch.equal(scale, torch.ones(3, 2))
        assert torch.equal(zero, torch.zeros(3, 2))
        assert torch.equal(fake_quantize(w, 4, symmetric, 4), w)


# --- properties ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("bit", "symmetric", "group_size"), GRIDS)
def test_codes_in_range_and_error_within_half_step(bit: int, symmetric: bool, group_size: int | None) -> None:
    w = _w()
    qmin, qmax = qrange(bit, symmetric)
    scale, zero = compute_qparams(w, bit, symmetric, group_size)
    n_groups, g = num_groups(w.shape[1], group_size)
    assert scale.shape == zero.shape == (w.shape[0], n_groups)
    assert bool((scale > 0).all())
    assert torch.equal(zero, torch.round(zero))
    codes = quantize(w, scale, zero, bit, symmetric, group_size)
    assert codes.shape == w.shape and codes.dtype == torch.int32
    assert int(codes.min()) >= qmin and int(codes.max()) <= qmax
    w_hat = dequantize(codes, scale, zero, group_size)
    step = scale.repeat_interleave(g, dim=1)  # (O, I)
    assert bool(((w - w_hat).abs() <= step / 2 * (1 + 1e-5) + 1e-7).all())
    assert torch.equal(fake_quantize(w, bit, symmetric, group_size), w_hat)


@pytest.mark.parametrize("bit", [2, 3, 4, 8])
def test_symmetric_zero_is_zero(bit: int) -> None:
    _, zero = compute_qparams(_w(), bit, True, 16)
    assert bool((zero == 0).all())


@pytest.mark.parametrize(("symmetric", "group_size"), [(True, None), (True, 16), (False, None), (False, 16)])
def test_more_bits_less_error(symmetric: bool, group_size: int | None) -> None:
    w = _w(seed=1)
    errs = [relative_error(w, fake_quantize(w, b, symmetric, group_size)) for b in (3, 4, 8)]
    assert errs[0] > errs[1] > errs[2] > 0
    assert errs[2] < 0.01


def test_smaller_groups_less_error() -> None:
    w = _w(seed=2)
    per_channel = relative_error(w, fake_quantize(w, 4, True, None))
    per_group = relative_error(w, fake_quantize(w, 4, True, 8))
    assert per_group < per_channel


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fake_quantize_keeps_dtype(dtype: torch.dtype) -> None:
    w = _w().to(dtype)
    w_hat = fake_quantize(w, 4, True, 16)
    assert w_hat.dtype == dtype and w_hat.shape == w.shape
    expected = fake_quantize(w.float(), 4, True, 16).to(dtype)  # computed in float32, cast once
    assert torch.equal(w_hat, expected)


@pytest.mark.parametrize(("bit", "symmetric", "group_size"), GRIDS)
def test_column_path_matches_fake_quantize(bit: int, symmetric: bool, group_size: int | None) -> None:
    """GPTQ's path: qparams of each group's column slice (per-channel call), then `quantize_column`."""
    w = _w()
    expected = fake_quantize(w, bit, symmetric, group_size)
    _, g = num_groups(w.shape[1], group_size)
    got = torch.empty_like(w)
    for j in range(w.shape[1]):
        if j % g == 0:
            scale, zero = compute_qparams(w[:, j : j + g], bit, symmetric, None)  # (O, 1) each
        got[:, j] = quantize_column(w[:, j], scale[:, 0], zero[:, 0], bit, symmetric)
    assert torch.equal(got, expected)


def test_quantize_column_keeps_dtype() -> None:
    x = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float16)
    out = quantize_column(x, torch.full((3,), 0.5), torch.zeros(3), 4, True)
    assert out.dtype == torch.float16
    assert out.tolist() == [0.5, -1.0, 2.0]


# --- errors --------------------------------------------------------------------------------------------------------


def test_group_size_must_divide_in_features() -> None:
    w = torch.randn(4, 10)
    with pytest.raises(ValueError, match=r"group_size=4 does not divide in_features=10"):
        fake_quantize(w, 4, True, 4)
    with pytest.raises(ValueError, match="group_size=3"):
        compute_qparams(w, 4, True, 3)


@pytest.mark.parametrize("group_size", [0, -2, 2.0, True])
def test_bad_group_size_form(group_size: object) -> None:
    with pytest.raises(ValueError, match="group_size"):
        num_groups(8, group_size)  # type: ignore[arg-type]


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="2-D"):
        fake_quantize(torch.randn(8), 4, True, None)
    w = torch.randn(4, 8)
    scale, zero = compute_qparams(w, 4, True, None)
    with pytest.raises(ValueError, match="qparams must have shape"):
        quantize(w, scale, zero, 4, True, 4)  # qparams are (4, 1), group_size 4 needs (4, 2)
    with pytest.raises(ValueError, match="1-D column"):
        quantize_column(w[:, 0], scale, zero, 4, True)


def test_relative_error() -> None:
    w = torch.tensor([[3.0, 4.0]])
    assert relative_error(w, torch.tensor([[3.0, 3.0]])) == pytest.approx(0.2)
    assert relative_error(torch.zeros(2, 2), torch.ones(2, 2)) == 0.0
