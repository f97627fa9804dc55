"""Quantization orchestration: config types, layer selection, and the `quantize_` verb.

The split follows torchao: a frozen `<Method>Config` dataclass holds the data, a private handler registered
with `@register_quant_handler(<Method>Config)` holds the behaviour, and one public verb, `quantize_`, dispatches
on `type(config)`. `QUANTIZERS` maps a recipe's `method:` string (the file name, e.g. "rtn") to the config
class. The maths lives in `primitives.py`; nothing here computes a grid.

All quantization is *fake* quantization: each selected `nn.Linear.weight` is overwritten in place with its
dequantized value `Ŵ`, in its own dtype and on its own device, so exported graphs stay plain GEMMs.
"""

from __future__ import annotations

import fnmatch
import logging
import re
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal, Protocol

import torch
from torch import Tensor, nn

from tokcompile.quant.primitives import check_sym_grid, num_groups, qrange, relative_error
from tokcompile.registry import Registry, suggest

__all__ = [
    "WeightQuantConfig",
    "QuantConfig",
    "QuantReport",
    "QuantHandler",
    "QUANTIZERS",
    "register_quant_handler",
    "select_linears",
    "matches",
    "replace_weight_",
    "quantize_",
]

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class WeightQuantConfig:
    """How one weight matrix is put on an integer grid (see `primitives.py` for the exact grids).

    Args:
        bit: bits per weight (2..16 symmetric, 1..16 asymmetric).
        symmetric: signed grid with zero-point 0 (what TensorRT INT4 expects) if True; unsigned grid with a
            per-group zero-point otherwise.
        group_size: None (or -1) for one scale per output channel; otherwise columns per group, which must
            divide every selected layer's `in_features` (checked when the layer is quantized).
        sym_grid: the symmetric scale: "narrow" (`absmax / (2^(b-1) - 1)`, 2^b - 1 levels) or "full"
            (`2 · absmax / (2^b - 1)`, all 2^b levels); "full" needs `symmetric`.
    """

    bit: int
    symmetric: bool = True
    group_size: int | None = None
    sym_grid: Literal["narrow", "full"] = "narrow"

    def __post_init__(self) -> None:
        qrange(self.bit, self.symmetric)  # raises ValueError naming the bad `bit`
        check_sym_grid(self.sym_grid, self.symmetric)
        if self.group_size not in (None, -1):
            num_groups(self.group_size, self.group_size)  # form check only; divisibility is per layer

    @property
    def granularity(self) -> Literal["per_channel", "per_group"]:
        """Either "per_channel" (group_size None/-1) or "per_group"."""
        return "per_channel" if self.group_size in (None, -1) else "per_group"


@dataclass(frozen=True)
class QuantConfig:
    """Base of every method config. Subclasses set `method` to their registry key (= file name)."""

    method: ClassVar[str] = ""


class QuantHandler(Protocol):
    """Behaviour of one config class.

    A handler quantizes every module in `linears` (fqn → module, already untied and in model order), writes
    each weight with `replace_weight_`, and returns fqn → relative weight error. It runs under
    `torch.no_grad()`. `model` is passed for methods that need forward passes (GPTQ calibration); extra
    keyword arguments given to `quantize_` are forwarded unchanged.
    """

    def __call__(
        self, model: nn.Module, linears: dict[str, nn.Linear], config: Any, *, progress: Progress, **kwargs: Any
    ) -> dict[str, float]: ...


QUANTIZERS: Registry[type[QuantConfig]] = Registry("quantization method")
_HANDLERS: dict[type, QuantHandler] = {}  # filled only by `register_quant_handler` at import time


def register_quant_handler(config_cls: type) -> Callable[[QuantHandler], QuantHandler]:
    """Decorator: make `handler` the behaviour of `config_cls` in `quantize_` (torchao style)."""

    def deco(handler: QuantHandler) -> QuantHandler:
        if config_cls in _HANDLERS:
            raise KeyError(f"a quantization handler for {config_cls.__name__} is registered twice")
        _HANDLERS[config_cls] = handler
        return handler

    return deco


# --- layer selection -------------------------------------------------------------------------------------------


def _is_glob(pattern: str) -> bool:
    return "*" in pattern or "?" in pattern


def _contains_segments(name: str, fqn: str) -> bool:
    """True when `name`'s dotted segments appear contiguously among `fqn`'s ("layers.0" in "m.layers.0.q")."""
    want, have = name.split("."), fqn.split(".")
    return any(have[i : i + len(want)] == want for i in range(len(have) - len(want) + 1))


def matches(pattern: str, fqn: str) -> bool:
    """Whether an ignore `pattern` selects the module at `fqn`.

    Pattern forms:
        * `re:<regex>`: `re.search(regex, name)`;
        * a glob containing `*` or `?`: `fnmatch.fnmatchcase(name, glob)`;
        * a plain dotted name: its segments appear as a contiguous run of `fqn`'s segments, so "lm_head"
          matches "lm_head", "vision_tower" matches "model.vision_tower.x.y", "layers.0" matches
          "model.language_model.layers.0.mlp.up_proj"; whole segments only ("proj" does not match "q_proj",
          "layers.1" does not match "layers.10").

    For regex and glob patterns, `name` is `fqn` or any dotted ancestor of it, so a pattern that names a
    module also covers everything beneath it (e.g. `re:^model\\.vision_tower$`).
    """
    if pattern.startswith("re:"):
        regex = re.compile(pattern[3:])
        return any(regex.search(a) for a in _ancestors(fqn))
    if _is_glob(pattern):
        return any(fnmatch.fnmatchcase(a, pattern) for a in _ancestors(fqn))
    return _contains_segments(pattern, fqn)


def _ancestors(fqn: str) -> list[str]:
    """["a", "a.b", "a.b.c"] for "a.b.c": the fqn and every dotted prefix of it."""
    parts = fqn.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _under(include: str, fqn: str) -> bool:
    """Include rule: plain entries are module prefixes; `re:` and glob entries match as in `matches`."""
    if include.startswith("re:") or _is_glob(include):
        return matches(include, fqn)
    return fqn == include or fqn.startswith(include + ".")


def select_linears(model: nn.Module, include: Sequence[str] = (), ignore: Sequence[str] = ()) -> dict[str, nn.Linear]:
    """The `nn.Linear` modules to quantize, by fully qualified name, in model order.

    Args:
        model: the model to search (`named_modules()` order; a module reachable twice is listed once).
        include: module prefixes to search under, e.g. ["model.language_model"]; a plain entry selects that
            module and everything beneath it. `re:` and glob entries are also accepted (see `matches`).
            Empty means the whole model.
        ignore: patterns removing modules from the selection, in any form `matches` accepts, e.g. the LLaVA
            adapter's ("lm_head", "re:.*vision_tower.*", "re:.*multi_modal_projector.*").

    Raises:
        ValueError: if an `include` entry names no module of `model` (with a "did you mean" hint).
    """
    modules = dict(model.named_modules())
    modules.pop("", None)  # the root has an empty fqn; include "" is not meaningful
    for inc in include:
        if not any(_under(inc, fqn) for fqn in modules):
            hint = suggest(inc, list(modules))
            raise ValueError(f"include '{inc}' matches no module of {type(model).__name__}{hint}")
    selected: dict[str, nn.Linear] = {}
    for fqn, module in modules.items():
        if not isinstance(module, nn.Linear):
            continue
        if include and not any(_under(inc, fqn) for inc in include):
            continue
        if any(matches(pat, fqn) for pat in ignore):
            continue
        selected[fqn] = module
    return selected


# --- weight writing ----------------------------------------------------------------------------------------------


def _untie_(model: nn.Module, linears: dict[str, nn.Linear]) -> list[str]:
    """Give each selected Linear whose weight Parameter is shared (e.g. `lm_head` tied to the input
    embedding) its own copy, so quantizing it leaves the other owners unchanged. Returns the untied fqns.

    Note: a later `model.tie_weights()` (HF) would re-tie `lm_head` to the embedding and undo its
    quantization; tokcompile never calls it after quantization.
    """
    owners: dict[int, list[str]] = defaultdict(list)
    for name, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)].append(name)
    untied = []
    for fqn, linear in linears.items():
        w = linear.weight
        sharers = [n for n in owners[id(w)] if n != f"{fqn}.weight"]
        if sharers:
            linear.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
            untied.append(fqn)
            logger.info("untied %s.weight from %s before quantizing it", fqn, ", ".join(sharers))
    return untied


def replace_weight_(linear: nn.Linear, w_hat: Tensor) -> float:
    """Overwrite `linear.weight` in place with `w_hat`, keeping its dtype and device.

    Args:
        linear: the layer; its weight must not be shared (`quantize_` unties first).
        w_hat: (out_features, in_features) fake-quantized weight, any dtype/device.

    Returns:
        The relative error `‖W - Ŵ‖ / ‖W‖` of the old weight against the value actually stored (after the
        cast to the weight's dtype).
    """
    w = linear.weight
    if tuple(w_hat.shape) != tuple(w.shape):
        raise ValueError(f"replacement weight has shape {tuple(w_hat.shape)}, layer weight {tuple(w.shape)}")
    stored = w_hat.detach().to(device=w.device, dtype=w.dtype)  # (O, I)
    err = relative_error(w, stored)
    with torch.no_grad():
        w.copy_(stored)
    return err


# --- report and verb ---------------------------------------------------------------------------------------------


@dataclass
class QuantReport:
    """What one `quantize_` call did.

    Args:
        method: registry key of the config ("rtn", ...).
        config: the config as a plain dict.
        layers: fqns of the quantized Linear modules, in model order.
        rel_errors: fqn → `‖W - Ŵ‖ / ‖W‖` (float32 Frobenius norms).
        untied: fqns whose weight was untied from another module (e.g. tied `lm_head`).
        seconds: wall time of the handler.
    """

    method: str
    config: dict[str, Any]
    layers: tuple[str, ...]
    rel_errors: dict[str, float]
    untied: tuple[str, ...] = ()
    seconds: float = 0.0

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def max_rel_error(self) -> float:
        return max(self.rel_errors.values(), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (plain str/int/float/list/dict values)."""
        return {
            "method": self.method,
            "config": self.config,
            "n_layers": self.n_layers,
            "layers": list(self.layers),
            "rel_errors": dict(self.rel_errors),
            "max_rel_error": self.max_rel_error,
            "untied": list(self.untied),
            "seconds": self.seconds,
        }


def quantize_(
    model: nn.Module,
    config: QuantConfig,
    *,
    include: Sequence[str] = (),
    ignore: Sequence[str] = (),
    progress: Progress | None = None,
    **kwargs: Any,
) -> QuantReport:
    """Fake-quantize the selected `nn.Linear` weights of `model` in place with the method `config` names.

    Args:
        model: the model; only weights of selected Linear modules change (biases never do).
        config: a registered config instance, e.g. `RTNConfig(WeightQuantConfig(bit=4, group_size=128))`.
        include: module prefixes to quantize under (empty = whole model); see `select_linears`.
        ignore: patterns to leave unquantized; see `matches`.
        progress: optional callback receiving one short message per quantized layer.
        **kwargs: forwarded to the handler (e.g. calibration batches for GPTQ).

    Returns:
        A `QuantReport` with per-layer relative errors.

    Raises:
        TypeError: if no handler is registered for `type(config)`.
        ValueError: if the selection is empty, an include names no module, or a layer's shape does not fit
            the config (e.g. `group_size` not dividing `in_features`).
    """
    handler = _HANDLERS.get(type(config))
    if handler is None:
        known = ", ".join(sorted(c.__name__ for c in _HANDLERS))
        raise TypeError(f"no quantization handler registered for {type(config).__name__}; known: {known}")
    linears = select_linears(model, include, ignore)
    if not linears:
        raise ValueError(f"{config.method}: no nn.Linear selected by include={list(include)} ignore={list(ignore)}")
    untied = _untie_(model, linears)
    start = time.perf_counter()
    with torch.no_grad():
        errors = handler(model, linears, config, progress=progress or (lambda _msg: None), **kwargs)
    seconds = time.perf_counter() - start
    report = QuantReport(
        method=config.method,
        config=asdict(config),
        layers=tuple(linears),
        rel_errors={fqn: float(errors[fqn]) for fqn in linears},
        untied=tuple(untied),
        seconds=seconds,
    )
    logger.info(
        "%s: quantized %d layers in %.2fs, max relative error %.4g",
        report.method, report.n_layers, seconds, report.max_rel_error,
    )
    return report
