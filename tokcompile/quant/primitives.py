"""Pure integer-grid maths for weight fake quantization: tensors in, tensors out, no module lookups.

Legend for shape comments: O out_features (rows of an `nn.Linear` weight), I in_features (columns),
G groups per row, g columns per group (`G * g == I`).

Grid conventions (b = `bit`):

* **Symmetric** (what TensorRT INT4/INT8 weight-only needs: zero-point 0). `qmin = -2^(b-1)`,
  `qmax = 2^(b-1) - 1`, `zero = 0`, `q = clamp(round(w / scale), qmin, qmax)`, `ŵ = q · scale`, with `absmax`
  taken over the group and one of two scales (`sym_grid`):

  - `"narrow"` (the default, LightCompress's): `scale = absmax / qmax`. Since `|w| ≤ absmax = qmax · scale`,
    no value is ever clipped and `qmin` is never reached: 2^b - 1 levels (15 for 4 bits).
  - `"full"` (GPTQModel's and AutoGPTQ's): `scale = 2 · absmax / (2^b - 1)`, so `w / scale` spans
    `[-(2^b - 1)/2, (2^b - 1)/2]` and all 2^b codes are used; the one quotient `+(2^b - 1)/2` (w = +absmax)
    rounds to `2^(b-1)` and is clipped to `qmax`, an error of `scale / 2`. Those tools compute it as an
    unsigned grid, `maxq = 2^b - 1`, `xmin = -absmax`, `scale = (absmax - xmin) / maxq`, `zero = (maxq + 1) / 2`,
    `q' = clamp(round(w / scale) + zero, 0, maxq)`: the same float32 scale and `q' = q + 2^(b-1)`. One
    difference: for a group with no negative weight they keep `xmin = 0` (half the scale, clipping above
    `absmax / 2`); here every group uses `2 · absmax`. Unlike "narrow", "full" is not idempotent: `ŵ`'s
    absmax is `7 · scale` or `8 · scale` (4 bits), so quantizing `ŵ` again picks a new scale.
* **Asymmetric** (as in the GPTQ reference `quant.py`). `qmin = 0`, `qmax = 2^b - 1`; the range is widened to
  contain 0, `xmin = min(w.min(), 0)`, `xmax = max(w.max(), 0)`; `scale = (xmax - xmin) / qmax`,
  `zero = round(-xmin / scale)` (an integer in `[0, qmax]`, stored as float32),
  `q = clamp(round(w / scale) + zero, 0, qmax)`, `ŵ = (q - zero) · scale`.
* A group whose scale would be 0 (all zeros) gets `scale = 1`, so nothing divides by zero; its codes are
  `zero` and it dequantizes to exact zeros.
* Rounding is `torch.round`, i.e. round half to even (`0.5 → 0`, `1.5 → 2`, `-3.5 → -4`). Ties are decided on
  the float32 quotient `w / scale`, so a "mathematical" tie may not be one after float32 rounding of `scale`.

Both grids use the same formulas with `zero = 0` for the symmetric one, so `quantize`/`dequantize` take the
grid only through `(qmin, qmax)`, and the two symmetric grids differ only in `compute_qparams`'s scale. With
any grid, every weight is reproduced to within `scale / 2`.

Granularity: `group_size=None` (or -1) is per-channel, one group spanning all I columns of a row; otherwise
`I % group_size == 0` is required and column `j` belongs to group `j // group_size`.

GPTQ (`quant/gptq.py`) reuses these pieces column by column: at the first column of each group it calls
`compute_qparams(W[:, j:j + g], bit, symmetric, None, sym_grid)` to get `(O, 1)` qparams for that slice,
then `quantize_column(W[:, j], scale[:, 0], zero[:, 0], bit, symmetric)` for each column of the group.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "SYM_GRIDS",
    "check_sym_grid",
    "qrange",
    "num_groups",
    "compute_qparams",
    "quantize",
    "dequantize",
    "fake_quantize",
    "quantize_column",
    "relative_error",
]

MAX_BIT = 16  # codes are int32 and the float32 quotient is exact well beyond this; 16 is a sanity cap
SYM_GRIDS = ("narrow", "full")  # symmetric scales: absmax / (2^(b-1) - 1), or 2 · absmax / (2^b - 1)


def check_sym_grid(sym_grid: str, symmetric: bool) -> None:
    """Raise ValueError unless `sym_grid` is one of `SYM_GRIDS` and, when "full", the grid is symmetric."""
    if sym_grid not in SYM_GRIDS:
        raise ValueError(f"sym_grid={sym_grid!r} is not a symmetric grid; use one of {', '.join(SYM_GRIDS)}")
    if sym_grid == "full" and not symmetric:
        raise ValueError("sym_grid='full' is a symmetric grid; use symmetric=True or sym_grid='narrow'")


def qrange(bit: int, symmetric: bool) -> tuple[int, int]:
    """Integer grid `(qmin, qmax)` for `bit` bits.

    Args:
        bit: bits per weight; 2..16 for symmetric, 1..16 for asymmetric.
        symmetric: signed grid with zero-point 0 if True, unsigned grid with a zero-point otherwise.

    Raises:
        ValueError: if `bit` is out of range (a 1-bit symmetric grid has `qmax = 0`, so no scale exists).
    """
    low = 2 if symmetric else 1
    if isinstance(bit, bool) or not isinstance(bit, int) or not low <= bit <= MAX_BIT:
        kind = "symmetric" if symmetric else "asymmetric"
        raise ValueError(f"bit={bit!r} is not supported for {kind} quantization; use an int in [{low}, {MAX_BIT}]")
    if symmetric:
        return -(2 ** (bit - 1)), 2 ** (bit - 1) - 1
    return 0, 2**bit - 1


def num_groups(in_features: int, group_size: int | None) -> tuple[int, int]:
    """Return `(G, g)`: groups per row and columns per group.

    Args:
        in_features: I, columns of the weight.
        group_size: None or -1 for per-channel (`G = 1`, `g = I`), else a positive divisor of I.

    Raises:
        ValueError: if `group_size` is not None/-1/positive, or does not divide `in_features`.
    """
    if group_size is None or group_size == -1:
        return 1, in_features
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size={group_size!r} must be a positive int, or None/-1 for per-channel")
    if in_features % group_size != 0:
        raise ValueError(
            f"group_size={group_size} does not divide in_features={in_features}; "
            f"pick a divisor of {in_features} or use per-channel (group_size None)"
        )
    return in_features // group_size, group_size


def _check_weight(w: Tensor) -> None:
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D (out_features, in_features) weight, got shape {tuple(w.shape)}")


def _per_column(p: Tensor, g: int) -> Tensor:
    """Broadcast per-group qparams (O, G) to per-column (O, G * g)."""
    return p.repeat_interleave(g, dim=1)  # (O, I)


def compute_qparams(
    w: Tensor, bit: int, symmetric: bool, group_size: int | None, sym_grid: str = "narrow"
) -> tuple[Tensor, Tensor]:
    """Scale and zero-point of every (row, group) of `w`, following the grid conventions above.

    Args:
        w: (O, I) weight, any float dtype (computed in float32).
        bit: bits per weight.
        symmetric: symmetric (zero = 0) or asymmetric grid.
        group_size: None/-1 for per-channel, else columns per group (must divide I).
        sym_grid: symmetric scale, "narrow" (`absmax / (2^(b-1) - 1)`) or "full" (`2 · absmax / (2^b - 1)`);
            only "narrow" with an asymmetric grid, where it is ignored.

    Returns:
        `(scale, zero)`, each (O, G) float32 on `w`'s device; `zero` holds integers (all 0 if symmetric).
    """
    _check_weight(w)
    check_sym_grid(sym_grid, symmetric)
    _, qmax = qrange(bit, symmetric)
    n_groups, g = num_groups(w.shape[1], group_size)
    x = w.detach().float().reshape(w.shape[0], n_groups, g)  # (O, G, g)
    if symmetric:
        absmax = x.abs().amax(dim=-1)  # (O, G)
        scale = absmax / qmax if sym_grid == "narrow" else 2 * absmax / (2**bit - 1)  # (O, G)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zero = torch.zeros_like(scale)
    else:
        xmin = x.amin(dim=-1).clamp(max=0)  # (O, G), the grid must contain 0
        xmax = x.amax(dim=-1).clamp(min=0)  # (O, G)
        scale = (xmax - xmin) / qmax
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zero = torch.round(-xmin / scale)  # (O, G), in [0, qmax]
    return scale, zero


def quantize(
    w: Tensor, scale: Tensor, zero: Tensor, bit: int, symmetric: bool, group_size: int | None
) -> Tensor:
    """Integer codes of `w` on the grid given by `(scale, zero)`.

    Args:
        w: (O, I) weight.
        scale: (O, G) float scales from `compute_qparams`.
        zero: (O, G) integer-valued zero-points (0 for symmetric).
        bit: bits per weight.
        symmetric: selects `(qmin, qmax)`.
        group_size: None/-1 for per-channel, else columns per group.

    Returns:
        (O, I) int32 codes in `[qmin, qmax]`.
    """
    _check_weight(w)
    qmin, qmax = qrange(bit, symmetric)
    n_groups, g = num_groups(w.shape[1], group_size)
    _check_qparams(w.shape[0], n_groups, scale, zero)
    s = _per_column(scale.float(), g)  # (O, I)
    z = _per_column(zero.float(), g)  # (O, I)
    q = torch.clamp(torch.round(w.detach().float() / s) + z, qmin, qmax)  # (O, I)
    return q.to(torch.int32)


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor, group_size: int | None) -> Tensor:
    """Map integer codes back to float: `ŵ = (q - zero) · scale`.

    Args:
        codes: (O, I) integer codes.
        scale: (O, G) scales.
        zero: (O, G) zero-points.
        group_size: None/-1 for per-channel, else columns per group.

    Returns:
        (O, I) float32 tensor.
    """
    _check_weight(codes)
    n_groups, g = num_groups(codes.shape[1], group_size)
    _check_qparams(codes.shape[0], n_groups, scale, zero)
    s = _per_column(scale.float(), g)  # (O, I)
    z = _per_column(zero.float(), g)  # (O, I)
    return (codes.float() - z) * s


def fake_quantize(w: Tensor, bit: int, symmetric: bool, group_size: int | None, sym_grid: str = "narrow") -> Tensor:
    """Quantize then dequantize `w` with round-to-nearest (the RTN weight).

    Args:
        w: (O, I) weight, any float dtype.
        bit: bits per weight.
        symmetric: symmetric (zero = 0) or asymmetric grid.
        group_size: None/-1 for per-channel, else columns per group.
        sym_grid: symmetric scale, "narrow" or "full" (see `compute_qparams`).

    Returns:
        (O, I) `ŵ` in `w`'s dtype and device; computed in float32 and cast once at the end.
    """
    scale, zero = compute_qparams(w, bit, symmetric, group_size, sym_grid)  # (O, G) each
    codes = quantize(w, scale, zero, bit, symmetric, group_size)  # (O, I)
    return dequantize(codes, scale, zero, group_size).to(w.dtype)


def quantize_column(x_col: Tensor, scale_col: Tensor, zero_col: Tensor, bit: int, symmetric: bool) -> Tensor:
    """Fake-quantize one weight column with given per-row qparams (GPTQ's inner loop).

    Args:
        x_col: (O,) one column of the weight (possibly already updated by GPTQ's error feedback).
        scale_col: (O,) scales of the group this column belongs to.
        zero_col: (O,) zero-points of that group.
        bit: bits per weight.
        symmetric: selects `(qmin, qmax)`.

    Returns:
        (O,) `ŵ` column in `x_col`'s dtype, equal to the matching column of `fake_quantize` when the qparams
        are the ones `compute_qparams` gives for its group (with either `sym_grid`: the grids share
        `(qmin, qmax)` and differ only in the scale passed in).
    """
    if x_col.ndim != 1 or scale_col.shape != x_col.shape or zero_col.shape != x_col.shape:
        raise ValueError(
            f"expected 1-D column and qparams of equal length, got x_col {tuple(x_col.shape)}, "
            f"scale_col {tuple(scale_col.shape)}, zero_col {tuple(zero_col.shape)}"
        )
    qmin, qmax = qrange(bit, symmetric)
    s, z = scale_col.float(), zero_col.float()  # (O,)
    q = torch.clamp(torch.round(x_col.float() / s) + z, qmin, qmax)  # (O,)
    return ((q - z) * s).to(x_col.dtype)


def relative_error(w: Tensor, w_hat: Tensor) -> float:
    """Relative Frobenius error `‖W - Ŵ‖ / ‖W‖` in float32; 0.0 when `W` is all zeros."""
    w32 = w.detach().float()
    norm = torch.linalg.vector_norm(w32)
    if norm == 0:
        return 0.0
    return (torch.linalg.vector_norm(w32 - w_hat.detach().float()) / norm).item()


def _check_qparams(n_rows: int, n_groups: int, scale: Tensor, zero: Tensor) -> None:
    expected = (n_rows, n_groups)
    if tuple(scale.shape) != expected or tuple(zero.shape) != expected:
        raise ValueError(
            f"qparams must have shape (out_features, n_groups)={expected}, "
            f"got scale {tuple(scale.shape)} and zero {tuple(zero.shape)}"
        )
