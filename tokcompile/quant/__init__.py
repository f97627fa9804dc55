"""Weight fake quantization: `quantize_(model, RTNConfig(...), include=..., ignore=...)`.

Methods register themselves by explicit import below: each `quant/<method>.py` defines a frozen
`<Method>Config` (registered in `QUANTIZERS` under the file name) and a private handler
(`@register_quant_handler(<Method>Config)`).
"""

from __future__ import annotations

from tokcompile.quant.base import (
    QUANTIZERS,
    QuantConfig,
    QuantHandler,
    QuantReport,
    WeightQuantConfig,
    matches,
    quantize_,
    register_quant_handler,
    replace_weight_,
    select_linears,
)
from tokcompile.quant.gptq import GPTQConfig
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
from tokcompile.quant.rtn import RTNConfig

__all__ = [
    "GPTQConfig",
    "QUANTIZERS",
    "QuantConfig",
    "QuantHandler",
    "QuantReport",
    "RTNConfig",
    "WeightQuantConfig",
    "compute_qparams",
    "dequantize",
    "fake_quantize",
    "matches",
    "num_groups",
    "qrange",
    "quantize",
    "quantize_",
    "quantize_column",
    "register_quant_handler",
    "relative_error",
    "replace_weight_",
    "select_linears",
]
