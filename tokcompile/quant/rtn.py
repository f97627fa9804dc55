"""RTN — round-to-nearest weight-only fake quantization (the data-free baseline).

Every selected `nn.Linear` weight is replaced by `fake_quantize(W)`: per-channel or per-group scales from the
weight itself, `torch.round` (half to even) onto the grid, then dequantized back to the weight's dtype. No
calibration data, no error feedback; GPTQ (`gptq.py`) uses the same grid and is compared against this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from tokcompile.quant.base import (
    QUANTIZERS,
    Progress,
    QuantConfig,
    WeightQuantConfig,
    register_quant_handler,
    replace_weight_,
)
from tokcompile.quant.primitives import fake_quantize

__all__ = ["RTNConfig"]


@QUANTIZERS.register("rtn")
@dataclass(frozen=True)
class RTNConfig(QuantConfig):
    """Round-to-nearest weight quantization.

    Args:
        weight: grid of every selected weight, e.g. `WeightQuantConfig(bit=4, group_size=128)`.
    """

    method: ClassVar[str] = "rtn"
    weight: WeightQuantConfig


@register_quant_handler(RTNConfig)
def _rtn_transform(
    model: nn.Module, linears: dict[str, nn.Linear], config: RTNConfig, *, progress: Progress
) -> dict[str, float]:
    """Fake-quantize each selected weight independently; returns fqn → relative error."""
    wq = config.weight
    errors: dict[str, float] = {}
    for i, (fqn, linear) in enumerate(linears.items(), start=1):
        try:
            w_hat = fake_quantize(linear.weight, wq.bit, wq.symmetric, wq.group_size, wq.sym_grid)  # (O, I)
        except ValueError as e:
            raise ValueError(f"{fqn}: {e}") from None
        errors[fqn] = replace_weight_(linear, w_hat)
        progress(f"rtn {fqn} [{i}/{len(linears)}] rel_err={errors[fqn]:.4g}")
    return errors
