"""GPTQ — weight quantization with second-order error feedback (the pure maths; no model code).

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", arXiv:2210.17323. Semantics follow the reference `IST-DASLab/gptq` `gptq.py` @ 2d65066 (see
DEPLOY_NOTES §4.2); the grid is RTN's (`primitives.py`), so RTN and GPTQ differ only in the error feedback.

For a Linear `y = x Wᵀ` with calibration inputs X (n × I), GPTQ minimises ‖XWᵀ − XŴᵀ‖² column by column:

1. Hessian `H = (2/n) XᵀX` (I × I, fp32), accumulated as a running mean (`add_to_hessian`).
2. Dead columns (`H[i,i] == 0`): `H[i,i] = 1`, `W[:, i] = 0`.
3. Optional act-order: columns sorted by `diag(H)` descending (undone at the end); optional static groups:
   each group's qparams taken up front from the unpermuted W.
4. Damping `H += percdamp·mean(diag H)·I`; `Hinv = chol(chol⁻¹(H), upper)`, the upper Cholesky factor of H⁻¹
   (raised ×10 up to 5 times when a factorisation fails).
5. Lazy blocks of `blocksize` columns: quantize column i, `err = (w − q)/Hinv[i,i]`, spread it over the rest
   of the block with row i of Hinv; after the block, one rank-B update `W[:, i2:] -= Err @ Hinv[i1:i2, i2:]`.

Shapes: O out_features, I in_features, G groups, g = group size, B = block width.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from tokcompile.quant.base import (
    QUANTIZERS,
    Progress,
    QuantConfig,
    WeightQuantConfig,
    register_quant_handler,
    replace_weight_,
)
from tokcompile.quant.primitives import compute_qparams, num_groups, quantize, quantize_column

__all__ = ["GPTQConfig", "GPTQResult", "add_to_hessian", "gptq_quantize"]

MAX_DAMP_RETRIES = 5


def add_to_hessian(H: Tensor | None, n_seen: int, x: Tensor) -> tuple[Tensor, int]:
    """Fold a batch of layer inputs into the running Hessian `H = (2/n) Σ x xᵀ`.

    Args:
        H: (I, I) fp32 running Hessian, updated in place; None to start a new one.
        n_seen: rows folded into `H` so far.
        x: (..., I) inputs of the Linear; all leading dims are rows (tokens), so m = x.numel() / I.

    Returns:
        `(H, n_seen + m)`.

    Note: the reference counts `inp.shape[0]` (sequences) instead of tokens; that only rescales H, which GPTQ's
    update is invariant to (only `GPTQResult.loss` changes scale).
    """
    x = x.detach().reshape(-1, x.shape[-1])  # (m, I)
    m, cols = x.shape
    if H is None:
        H = torch.zeros(cols, cols, dtype=torch.float32, device=x.device)
    elif tuple(H.shape) != (cols, cols):
        raise ValueError(f"Hessian has shape {tuple(H.shape)} but inputs have {cols} features")
    if m == 0:
        return H, n_seen
    n = n_seen + m
    H.mul_(n_seen / n)
    xs = math.sqrt(2.0 / n) * x.to(device=H.device, dtype=torch.float32)  # (m, I)
    H.addmm_(xs.T, xs)
    return H, n


@dataclass
class GPTQResult:
    """Output of `gptq_quantize`, all in the ORIGINAL column order.

    Args:
        weight: (O, I) float32 dequantized Ŵ; `weight == dequantize()` exactly.
        codes: (O, I) int32 grid codes (`[-2^(b-1), 2^(b-1)-1]` symmetric, `[0, 2^b-1]` asymmetric).
        scale: (O, G) float32, column j uses `scale[:, g_idx[j]]` (G = 1 per-channel).
        zero: (O, G) float32 integer zero-points (0 when symmetric).
        g_idx: (I,) int64 group of each column; `j // g` unless act-order without static groups, where group k
            is the k-th run of g columns in act-order (`g_idx[perm[j]] = j // g`).
        perm: (I,) act-order permutation (permuted position → original column), None without act-order.
        loss: the reference objective Σ (w − q)² / d² / 2.
        damp: damping added to diag(H) (absolute value).
        retries: how many times percdamp was raised ×10 before the Cholesky factorisations succeeded.
    """

    weight: Tensor
    codes: Tensor
    scale: Tensor
    zero: Tensor
    g_idx: Tensor
    perm: Tensor | None
    loss: float
    damp: float
    retries: int

    def dequantize(self) -> Tensor:
        """(O, I) float32 `(codes − zero[:, g_idx]) · scale[:, g_idx]`."""
        return (self.codes.float() - self.zero[:, self.g_idx]) * self.scale[:, self.g_idx]


def _damped_inverse_factor(H: Tensor, percdamp: float) -> tuple[Tensor, float, int]:
    """Upper Cholesky factor of (H + damp·I)⁻¹, raising percdamp ×10 on failure. Returns (Hinv, damp, retries).

    H (I, I) is the caller's working copy: it is damped in place and released once factorised, so at most two
    I×I matrices are alive at a time (11008² in float32 is 485 MB for a 7B model's down_proj). Should the
    inverse fail to factorise (rare: the inverse of a positive definite matrix), H is rebuilt from it for the
    retry, with its diagonal restored exactly."""
    mean_diag = torch.diag(H).mean().item()
    undamped = H.diagonal().clone()  # (I,)
    for retry in range(MAX_DAMP_RETRIES + 1):
        damp = percdamp * mean_diag
        H.diagonal().copy_(undamped + damp)
        try:
            L = torch.linalg.cholesky(H)  # (I, I) lower
        except torch.linalg.LinAlgError:
            L = None
        if L is not None:
            H.set_()  # drops the working copy's storage (the caller's reference too): the factor replaces it
            inverse = torch.cholesky_inverse(L)  # (I, I) = (H + damp·I)⁻¹
            del L
            try:
                Hinv = torch.linalg.cholesky(inverse, upper=True)  # (I, I) upper factor U, Uᵀ U = H⁻¹
                if torch.isfinite(Hinv.sum()):  # a NaN or inf anywhere makes the sum one (no I×I mask)
                    return Hinv, damp, retry
            except torch.linalg.LinAlgError:
                pass
            H = torch.linalg.inv(inverse)  # back to H + damp·I for the next try
            del inverse
        if retry < MAX_DAMP_RETRIES:
            percdamp *= 10
            warnings.warn(
                f"GPTQ: Hessian is not positive definite after damping; raising percdamp to {percdamp:g} "
                f"(damp={percdamp * mean_diag:.4g})",
                stacklevel=3,
            )
    raise ValueError(
        f"GPTQ: Cholesky factorisation of the damped Hessian failed even with percdamp={percdamp:g} after "
        f"{MAX_DAMP_RETRIES} retries; the Hessian is likely corrupt (too few or degenerate calibration samples)"
    )


def gptq_quantize(
    W: Tensor,
    H: Tensor,
    *,
    bit: int,
    symmetric: bool,
    group_size: int | None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    actorder: bool = False,
    static_groups: bool = False,
    sym_grid: str = "narrow",
    overwrite_h: bool = False,
) -> GPTQResult:
    """Quantize one weight with GPTQ given its calibration Hessian (inputs are not modified, except H with
    `overwrite_h`).

    Args:
        W: (O, I) weight, any float dtype (computed in float32).
        H: (I, I) Hessian from `add_to_hessian`.
        bit, symmetric, group_size: the grid, as in `WeightQuantConfig` (group_size None/-1 = per-channel).
        blocksize: columns per lazy-update block (B).
        percdamp: damping as a fraction of mean(diag H).
        actorder: process columns by descending diag(H).
        static_groups: with groups, take every group's qparams from the unpermuted W before any update.
        sym_grid: symmetric scale, "narrow" or "full" (see `primitives.compute_qparams`); it sets only the
            scales, and every column is then rounded onto `qrange(bit, symmetric)` as with "narrow".
        overwrite_h: use H (float32) as the working copy instead of cloning it (the caller is done with it):
            one I×I matrix less in memory.

    Raises:
        ValueError: bad shapes, group_size not dividing I, non-finite H, or a Hessian that stays
            non-positive-definite after all damping retries.
    """
    if W.ndim != 2 or tuple(H.shape) != (W.shape[1], W.shape[1]):
        raise ValueError(f"expected W (O, I) and H (I, I), got W {tuple(W.shape)} and H {tuple(H.shape)}")
    if blocksize < 1 or not percdamp > 0:
        raise ValueError(f"blocksize={blocksize} must be >= 1 and percdamp={percdamp} > 0")
    if not torch.isfinite(H).all():
        raise ValueError("GPTQ: the Hessian contains NaN/inf (non-finite calibration activations?)")
    rows, cols = W.shape
    n_groups, g = num_groups(cols, group_size)  # raises if group_size does not divide I
    grouped = n_groups > 1 or group_size not in (None, -1)
    W = W.detach().clone().float()  # (O, I)
    H = H.detach().to(device=W.device, dtype=torch.float32)  # (I, I)
    if not overwrite_h:
        H = H.clone()

    # Per-channel qparams: like the reference, from W before dead columns are zeroed.
    scale, zero = compute_qparams(W, bit, symmetric, None, sym_grid)  # (O, 1) each
    dead = torch.diag(H) == 0  # (I,)
    H[dead, dead] = 1
    W[:, dead] = 0
    if grouped and static_groups:
        scale, zero = compute_qparams(W, bit, symmetric, group_size, sym_grid)  # (O, G), original group order
    elif grouped:
        scale, zero = torch.empty(rows, n_groups, device=W.device), torch.empty(rows, n_groups, device=W.device)

    perm = None
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)  # (I,) permuted position → original column
        W = W[:, perm]
        H = H.index_select(0, perm)  # two steps: two I×I matrices at a time, not three
        H = H.index_select(1, perm)
    Hinv, damp, retries = _damped_inverse_factor(H, percdamp)  # (I, I) upper triangular
    del H

    Q = torch.zeros_like(W)  # (O, I), permuted order
    codes = torch.zeros(rows, cols, dtype=torch.int32, device=W.device)  # (O, I), permuted order
    losses = torch.zeros(rows, device=W.device)  # (O,)
    col_group = torch.zeros(cols, dtype=torch.long, device=W.device)  # (I,) group of each permuted position
    s, z = scale[:, 0], zero[:, 0]  # (O,) current qparams
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()  # (O, B)
        Err1 = torch.zeros_like(W1)  # (O, B)
        Hinv1 = Hinv[i1:i2, i1:i2]  # (B, B)
        for i in range(i2 - i1):
            col = i1 + i
            if grouped and static_groups:
                k = (int(perm[col]) if perm is not None else col) // g
                s, z = scale[:, k], zero[:, k]
            elif grouped:
                k = col // g
                if col % g == 0:
                    # Reference: qparams from W (updated up to this block's start, not by in-block feedback).
                    sk, zk = compute_qparams(W[:, col : col + g], bit, symmetric, None, sym_grid)  # (O, 1)
                    scale[:, k], zero[:, k] = sk[:, 0], zk[:, 0]
                s, z = scale[:, k], zero[:, k]
            else:
                k = 0
            col_group[col] = k
            w = W1[:, i]  # (O,)
            q = quantize_column(w, s, z, bit, symmetric)  # (O,)
            codes[:, col] = quantize(w[:, None], s[:, None], z[:, None], bit, symmetric, None)[:, 0]
            Q[:, col] = q
            d = Hinv1[i, i]
            losses += (w - q) ** 2 / d**2 / 2
            err = (w - q) / d  # (O,)
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]  # (O, B - i)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # (O, I - i2) lazy rank-B update

    g_idx = col_group
    if perm is not None:
        invperm = torch.argsort(perm)
        Q, codes, g_idx = Q[:, invperm], codes[:, invperm], col_group[invperm]
    return GPTQResult(
        weight=Q,
        codes=codes,
        scale=scale,
        zero=zero,
        g_idx=g_idx,
        perm=perm,
        loss=float(losses.sum()),
        damp=float(damp),
        retries=retries,
    )


@QUANTIZERS.register("gptq")
@dataclass(frozen=True)
class GPTQConfig(QuantConfig):
    """GPTQ weight quantization (the grid is RTN's; calibration is done by the caller).

    Args:
        weight: grid of every selected weight, e.g. `WeightQuantConfig(bit=4, group_size=128)`.
        blocksize: columns per lazy-update block.
        percdamp: damping as a fraction of mean(diag H) (reference 0.01; GPT-QModel 7 uses 0.05).
        actorder: quantize columns in descending diag(H) order (a.k.a. desc_act).
        static_groups: with act-order, fix each group's qparams from the unpermuted weight (no g_idx needed).
        true_sequential: for the layer driver: quantize sub-layers in order, re-running the block between them.
    """

    method: ClassVar[str] = "gptq"
    weight: WeightQuantConfig
    blocksize: int = 128
    percdamp: float = 0.01
    actorder: bool = False
    static_groups: bool = False
    true_sequential: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.blocksize, bool) or not isinstance(self.blocksize, int) or self.blocksize < 1:
            raise ValueError(f"blocksize={self.blocksize!r} must be a positive int")
        if not (isinstance(self.percdamp, (int, float)) and 0 < self.percdamp < math.inf):
            raise ValueError(f"percdamp={self.percdamp!r} must be a positive finite number")


@register_quant_handler(GPTQConfig)
def _gptq_transform(
    model: nn.Module,
    linears: dict[str, nn.Linear],
    config: GPTQConfig,
    *,
    progress: Progress,
    hessians: dict[str, Tensor] | None = None,
    results: dict[str, GPTQResult] | None = None,
) -> dict[str, float]:
    """GPTQ each selected weight with its precomputed Hessian (`hessians[fqn]`); returns fqn → relative error.

    If `results` is given, `results[fqn]` receives the layer's `GPTQResult` (codes, scales, g_idx).
    """
    hessians = hessians or {}
    missing = [fqn for fqn in linears if fqn not in hessians]
    if missing:
        raise ValueError(
            f"gptq: no Hessian for layer '{missing[0]}' ({len(missing)} missing); pass hessians={{fqn: H}} "
            "accumulated with add_to_hessian from that layer's inputs"
        )
    wq = config.weight
    errors: dict[str, float] = {}
    for i, (fqn, linear) in enumerate(linears.items(), start=1):
        try:
            res = gptq_quantize(
                linear.weight, hessians[fqn], bit=wq.bit, symmetric=wq.symmetric, group_size=wq.group_size,
                blocksize=config.blocksize, percdamp=config.percdamp, actorder=config.actorder,
                static_groups=config.static_groups, sym_grid=wq.sym_grid,
            )
        except ValueError as e:
            raise ValueError(f"{fqn}: {e}") from None
        errors[fqn] = replace_weight_(linear, res.weight)
        if results is not None:
            results[fqn] = res
        progress(f"gptq {fqn} [{i}/{len(linears)}] rel_err={errors[fqn]:.4g} loss={res.loss:.4g}")
    return errors
