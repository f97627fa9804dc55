"""Recipe schema: typed, frozen sections loaded from LightCompress-style YAML.

`load_recipe(path)` reads a file and `load_recipe_dict(data, name)` a mapping. Each YAML section is a
frozen dataclass whose fields are the YAML keys; a field's metadata holds the check for its value.
Unknown keys, wrong types and out-of-range values raise `RecipeError(key, message)` with the dotted
YAML key and a one-line fix. LightCompress keys that are accepted but not acted on add one-line
entries to `Recipe.warnings`. Token-reduction method parameters are kept as a read-only mapping here;
they are validated elsewhere.
"""

from __future__ import annotations

import copy
import datetime
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from tokcompile.devices import parse_device
from tokcompile.errors import RecipeError
from tokcompile.eval.spec import EvalConfig, parse_eval
from tokcompile.registry import suggest
from tokcompile.yaml_safe import YamlBoundError, load_bounded

Check = Callable[[str, Any], Any]  # (dotted key, YAML value) -> checked value, or raise RecipeError

EXPORT_TARGETS = ("onnx", "aoti", "eager", "torch_compile", "tensorrt")
DEFAULT_TARGETS = ("onnx", "aoti")
TORCH_DTYPES = ("auto", "float32", "float16", "bfloat16")
QUANT_METHODS = ("RTN", "GPTQ")
SYM_GRIDS = ("narrow", "full")  # quant.weight.sym_grid, as in tokcompile.quant.primitives.SYM_GRIDS
LIGHTCOMPRESS_SAVE_FLAGS = ("save_vllm", "save_sgl", "save_lightllm", "save_autoawq", "save_mlcllm",
                            "save_trtllm", "save_lightx2v")
SECTIONS = ("base", "model", "inputs", "quant", "sparse", "eval", "save", "export", "parity")
_FLOAT_TEXT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")  # PyYAML reads 1e-4 as a string


# --------------------------------------------------------------------------------------- value checks
def _show(value: Any) -> str:
    """`str 'four'`-style description of a YAML value, on one line."""
    if value is None:
        return "null"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _int(lo: int | None = None, hi: int | None = None, fix: str = "") -> Check:
    def check(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(key, f"expected an integer, got {_show(value)}")
        if lo is not None and hi is not None and not lo <= value <= hi:
            fix_ = fix or f"use an integer from {lo} to {hi}"
            raise RecipeError(key, f"{value} is outside {lo}..{hi}; {fix_}")
        if lo is not None and value < lo:
            raise RecipeError(key, f"{value} is below the minimum {lo}; {fix or f'use an integer >= {lo}'}")
        return value
    return check


def _float(gt: float | None = None, ge: float | None = None, le: float | None = None,
           fix: str = "") -> Check:
    def check(key: str, value: Any) -> float:
        if isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(key, f"expected a number, got {_show(value)}")
        if not math.isfinite(value):
            raise RecipeError(key, f"expected a finite number, got {value}; {fix}")
        bounds = [(op, b) for op, b in ((">", gt), (">=", ge), ("<=", le)) if b is not None]
        if not all(value > b if op == ">" else value >= b if op == ">=" else value <= b for op, b in bounds):
            limits = " and ".join(f"{op} {b}" for op, b in bounds)
            raise RecipeError(key, f"{value} is out of range (must be {limits}); {fix}")
        return float(value)
    return check


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise RecipeError(key, f"expected true or false, got {_show(value)}")
    return value


def _str(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        got = "an empty string" if isinstance(value, str) else _show(value)
        raise RecipeError(key, f"expected a non-empty string, got {got}")
    return value


def _choice(choices: tuple[str, ...], unsupported: Mapping[str, str] | None = None) -> Check:
    """Match case-insensitively against `choices`; return the canonical spelling."""
    def check(key: str, value: Any) -> str:
        listed = ", ".join(choices)
        if not isinstance(value, str):
            raise RecipeError(key, f"expected one of {listed}, got {_show(value)}")
        lowered = value.strip().lower()
        for choice in choices:
            if choice.lower() == lowered:
                return choice
        if unsupported and lowered in unsupported:
            raise RecipeError(key, unsupported[lowered])
        raise RecipeError(key, f"{value!r} is not supported{suggest(value, choices)}; choose one of {listed}")
    return check


def _nullable(check: Check) -> Check:
    return lambda key, value: None if value is None else check(key, value)


def _mapping(key: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        name = key.rsplit(".", 1)[-1]
        raise RecipeError(key, f"expected a mapping, got {_show(value)}; write it as {name}: {{key: value}}")
    for k in value:
        if not isinstance(k, str):
            raise RecipeError(_join(key, str(k)), f"keys must be strings, got {_show(k)}; quote the key")
    return value


def _image_size(key: str, value: Any) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        n = _int(1, fix="use a positive size such as 336")(key, value)
        return (n, n)
    if isinstance(value, list) and len(value) == 2:
        h, w = (_int(1, fix="use positive sizes such as [336, 336]")(key, v) for v in value)
        return (h, w)
    raise RecipeError(key, f"expected an integer or a list [height, width], got {_show(value)}; "
                           "write e.g. [336, 336]")


def _patterns(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise RecipeError(key, f"expected a list of module-name patterns, got {_show(value)}; "
                               "write e.g. [lm_head]")
    return tuple(_str(key, v) for v in value)


def _targets(key: str, value: Any) -> tuple[str, ...]:
    listed = ", ".join(EXPORT_TARGETS)
    if not isinstance(value, list) or not value:
        got = "an empty list" if isinstance(value, list) else _show(value)
        raise RecipeError(key, f"expected a list of targets such as [{listed}], got {got}; name at least one")
    out: list[str] = []
    for v in value:
        if not isinstance(v, str) or v.strip().lower() not in EXPORT_TARGETS:
            hint = suggest(v, EXPORT_TARGETS) if isinstance(v, str) else ""
            raise RecipeError(key, f"unknown target {v!r}{hint}; choose from {listed}")
        if v.strip().lower() not in out:
            out.append(v.strip().lower())
    return tuple(out)


def _calib_bs(key: str, value: Any) -> int:
    bs = _int()(key, value)
    if bs != -1 and bs < 1:
        raise RecipeError(key, f"{bs} is not a batch size; use -1 (all samples at once) or an integer >= 1")
    return bs


def _opt(default: Any, check: Check) -> Any:
    """An optional YAML key: dataclass field with a default and the check for its value."""
    return field(default=default, metadata={"check": check})


def _req(check: Check, hint: str) -> Any:
    """A required YAML key; `hint` completes the fix `add <key>: <hint>`."""
    return field(metadata={"check": check, "hint": hint})


# ------------------------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class BaseConfig:
    """`base:` run-wide settings."""
    seed: int = _opt(42, _int(0, 2**32 - 1, "use a seed from 0 to 4294967295"))


@dataclass(frozen=True)
class ModelConfig:
    """`model:` the checkpoint, `tiny-random:<family>`, `tiny-trained:<name>` or a directory (existence is checked
    later)."""
    path: str = _req(_str, "tiny-random:<family>, tiny-trained:<name> or a model directory")
    type: str | None = _opt(None, _nullable(_str))
    torch_dtype: str = _opt("auto", _choice(TORCH_DTYPES))
    trust_remote_code: bool = _opt(False, _bool)
    tokenizer_mode: str | None = _opt(None, _nullable(_str))


@dataclass(frozen=True)
class InputsConfig:
    """`inputs:` fixed geometry; `max_prompt_len` counts text tokens only (None = dynamic); `video_frames`
    makes every prompt carry one video of that many frames instead of one image (families with video)."""
    batch_size: int = _opt(1, _int(1))
    image_size: tuple[int, int] | None = _opt(None, _nullable(_image_size))
    video_frames: int | None = _opt(None, _nullable(_int(1, fix="use at least 1 frame, or null for images")))
    max_prompt_len: int | None = _opt(None, _nullable(_int(2, fix="use at least 2, or null for dynamic")))
    max_new_tokens: int = _opt(32, _int(1))


_ONLY_GRANULARITIES = {g: f"{g} is not supported; only per_channel and per_group are supported, so set "
                          "granularity to one of them" for g in ("per_tensor", "per_head", "per_block")}


@dataclass(frozen=True)
class WeightQuantConfig:
    """`quant.weight:` integer weight quantization; `group_size` is -1 for per_channel; `sym_grid` is the
    symmetric scale, narrow `absmax / (2^(b-1) - 1)` (LightCompress's) or full `2·absmax / (2^b - 1)`
    (GPTQModel's and AutoGPTQ's, all 2^b codes)."""
    bit: int = _req(_int(2, 8, "use a bit width from 2 to 8"), "4")
    symmetric: bool = _opt(True, _bool)
    granularity: str = _opt("per_channel", _choice(("per_channel", "per_group"), _ONLY_GRANULARITIES))
    group_size: int = _opt(-1, _int())
    sym_grid: str = _opt("narrow", _choice(SYM_GRIDS))


@dataclass(frozen=True)
class GPTQSpecial:
    """`quant.special:` GPTQ options (RTN ignores them)."""
    actorder: bool = _opt(False, _bool)
    static_groups: bool = _opt(False, _bool)
    percdamp: float = _opt(0.01, _float(gt=0, le=1, fix="use a damping in (0, 1] such as 0.01"))
    blocksize: int = _opt(128, _int(1))
    true_sequential: bool = _opt(True, _bool)
    owq: bool = _opt(False, _bool)  # True is rejected: OWQ is not supported


@dataclass(frozen=True)
class CalibConfig:
    """`quant.calib:` calibration data; `bs` -1 means all samples in one batch."""
    name: str = _opt("synthetic", _str)
    n_samples: int = _opt(32, _int(1))
    seq_len: int | None = _opt(None, _nullable(_int(1)))
    bs: int = _opt(-1, _calib_bs)
    path: str | None = _opt(None, _nullable(_str))
    with_reduction: bool = _opt(False, _bool)


@dataclass(frozen=True)
class TokenReductionSpec:
    """A token reduction: method name, read-only parameters, and the YAML keys they came from."""
    method: str
    params: Mapping[str, Any]
    key: str
    method_key: str

    def to_dict(self) -> dict[str, Any]:
        """The `quant.token_reduction` YAML form: {method, special}."""
        return {"method": self.method, "special": _plain(self.params)}


@dataclass(frozen=True)
class QuantConfig:
    """`quant:` fake weight quantization, optionally with a token reduction."""
    method: str = _req(_choice(QUANT_METHODS), "RTN or GPTQ")
    weight: WeightQuantConfig  # required; parsed as a sub-section
    special: GPTQSpecial = field(default_factory=GPTQSpecial)
    quant_out: bool = _opt(False, _bool)
    ignore: tuple[str, ...] | None = _opt(None, _nullable(_patterns))  # None: the model's default
    token_reduction: TokenReductionSpec | None = None
    calib: CalibConfig = field(default_factory=CalibConfig)


@dataclass(frozen=True)
class SparseConfig:
    """`sparse:` token reductions given LightCompress's way: `special: {method, **params}` for the decoder
    side, and a `vision:` block of the same form for vision-side methods (`language:` is accepted as a block
    for the decoder side too). Both may be given; they compose in data order."""
    special: TokenReductionSpec | None = None
    vision: TokenReductionSpec | None = None
    method: str = _opt("TokenReduction", _choice(("TokenReduction",)))

    def to_dict(self) -> dict[str, Any]:
        """The `sparse` YAML form: {method, special: {method, **params}, vision: {method, special}}."""
        out: dict[str, Any] = {"method": self.method}
        if self.special is not None:
            out["special"] = {"method": self.special.method, **_plain(self.special.params)}
        if self.vision is not None:
            out["vision"] = {"method": "TokenReduction",
                             "special": {"method": self.vision.method, **_plain(self.vision.params)}}
        return out


@dataclass(frozen=True)
class SaveConfig:
    """`save:` where the export goes."""
    save_path: str | None = _opt(None, _nullable(_str))
    save_fake: bool = _opt(False, _bool)
    save_trans: bool = _opt(False, _bool)


EXPORT_DTYPES = ("float32", "float16", "bfloat16")


def _min_opt_max(key: str, value: Any) -> tuple[int, int, int]:
    if not isinstance(value, list) or len(value) != 3:
        raise RecipeError(key, f"expected [min, opt, max], got {_show(value)}; write e.g. [1, 1, 4]")
    lo, opt, hi = (_int(1, fix="use positive sizes such as [1, 1, 4]")(key, v) for v in value)
    if not lo <= opt <= hi:
        raise RecipeError(key, f"{value} is not ordered; write [min, opt, max] with min <= opt <= max")
    return (lo, opt, hi)


@dataclass(frozen=True)
class TensorRTConfig:
    """`export.tensorrt:` the engines' optimization profile, [min, opt, max] per dynamic dimension (null: from the
    plan), and `strip_weights` (weight-stripped engines, refitted from the ONNX weights at load)."""
    batch: tuple[int, int, int] | None = _opt(None, _nullable(_min_opt_max))
    prompt_len: tuple[int, int, int] | None = _opt(None, _nullable(_min_opt_max))
    cache_len: tuple[int, int, int] | None = _opt(None, _nullable(_min_opt_max))
    strip_weights: bool = _opt(True, _bool)


def _tensorrt(key: str, value: Any) -> TensorRTConfig:
    return TensorRTConfig(**_Block(value, key, [], TensorRTConfig).kw)


@dataclass(frozen=True)
class ExportConfig:
    """`export:` backends and export options; `weight_format: int4` also writes ONNX graphs with INT4 weights.
    `dtype` is the graphs' precision; where the recipe does not write it, the plan takes a `model.torch_dtype` the
    recipe writes (`auto`: the checkpoint config's dtype), else float32 (`plan.resolve_export_dtype`)."""
    targets: tuple[str, ...] = _opt(DEFAULT_TARGETS, _targets)
    dtype: str = _opt("float32", _choice(EXPORT_DTYPES))
    opset: int | None = _opt(None, _nullable(_int(18, fix="use opset 18 or newer, or null for the default")))
    weight_format: str = _opt("float", _choice(("float", "int4")))
    tensorrt: TensorRTConfig = _opt(TensorRTConfig(), _tensorrt)


@dataclass(frozen=True)
class ParityConfig:
    """`parity:` tolerances and samples for the artifact-vs-eager checks; `reference` runs eager."""
    atol: float = _opt(1e-4, _float(gt=0, fix="use a tolerance such as 1.0e-4"))
    rtol: float = _opt(1e-3, _float(ge=0, fix="use a tolerance such as 1.0e-3"))
    samples: int = _opt(3, _int(1))
    reference: bool = _opt(True, _bool)
    device: str = _opt("cpu", parse_device)  # where the graphs are traced, compiled and checked (`--device`)


@dataclass(frozen=True)
class Recipe:
    """A validated recipe; build it with `load_recipe` or `load_recipe_dict`, which do the checking."""
    name: str
    source: str
    base: BaseConfig
    model: ModelConfig
    inputs: InputsConfig
    quant: QuantConfig | None
    sparse: SparseConfig | None
    eval: EvalConfig | None  # tokcompile.eval.spec
    save: SaveConfig
    export: ExportConfig
    parity: ParityConfig
    warnings: tuple[str, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def reductions(self) -> tuple[TokenReductionSpec, ...]:
        """The token reductions in data order: `sparse.vision`, then `sparse.special` (or
        `quant.token_reduction`)."""
        if self.sparse is not None:
            return tuple(r for r in (self.sparse.vision, self.sparse.special) if r is not None)
        red = self.quant.token_reduction if self.quant is not None else None
        return (red,) if red is not None else ()

    @property
    def reduction(self) -> TokenReductionSpec | None:
        """The one token reduction of a single-method recipe (the decoder-side one when both are given)."""
        reds = self.reductions
        return reds[-1] if reds else None

    def to_dict(self) -> dict[str, Any]:
        """All sections resolved, defaults filled, JSON-serialisable; `load_recipe_dict` reads it back."""
        return {s: _plain(getattr(self, s)) for s in SECTIONS}


def _plain(obj: Any) -> Any:
    """Sections, mappings, tuples and dates as JSON-friendly builtins."""
    if is_dataclass(obj):
        if hasattr(obj, "to_dict"):
            return obj.to_dict()
        return {f.name: _plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, datetime.date):
        return obj.isoformat()
    return obj if obj is None or isinstance(obj, (bool, int, float, str)) else str(obj)


# -------------------------------------------------------------------------------------------- parsing
class _Block:
    """One YAML mapping at `path`. Rejects unknown keys, notes `passive` keys (accepted, not acted on)
    and, given a section class `cls`, reads its checked fields into `kw`."""

    def __init__(self, value: Any, path: str, notes: list[str], cls: type | None = None,
                 extra: tuple[str, ...] = (), passive: tuple[str, ...] = (),
                 rejected: Mapping[str, str] | None = None):
        self.path, self.notes = path, notes
        self.data = _mapping(path, value)
        names = tuple(f.name for f in fields(cls)) if cls is not None else ()
        known = names + tuple(k for k in extra + passive if k not in names)
        for k in self.data:
            if rejected and k in rejected:
                raise RecipeError(self.key(k), rejected[k])
            if k not in known:
                listed = ", ".join(known)
                raise RecipeError(self.key(k), f"unknown key{suggest(k, known)}; known keys: {listed}")
        for k in passive:
            self.note(k)
        self.kw: dict[str, Any] = {}
        for f in fields(cls) if cls is not None else ():
            if f.name in self.data and "check" in f.metadata:
                self.kw[f.name] = f.metadata["check"](self.key(f.name), self.data[f.name])
            elif "hint" in f.metadata:
                raise RecipeError(self.key(f.name), f"missing; add {f.name}: {f.metadata['hint']}")

    def key(self, k: str) -> str:
        return _join(self.path, k)

    def get(self, k: str, check: Check, default: Any = None) -> Any:
        return check(self.key(k), self.data[k]) if k in self.data else default

    def note(self, k: str, why: str = "accepted but not acted on", when: Any = MISSING) -> None:
        """Warn that `k` is not acted on when set (non-null, and equal to `when` if given)."""
        if self.data.get(k) is not None and (when is MISSING or self.data[k] == when):
            self.notes.append(f"{self.key(k)} is {why}")


def _simple(cls: type, path: str, passive: tuple[str, ...] = ()) -> Callable[[Any, list[str]], Any]:
    """Parser for a section that needs no cross-field checks."""
    return lambda value, notes: cls(**_Block(value, path, notes, cls, passive=passive).kw)


def _weight(value: Any, notes: list[str]) -> WeightQuantConfig:
    b = _Block(value, "quant.weight", notes, WeightQuantConfig, ("calib_algo", "quant_type", "need_pack"))
    granularity, group_size = b.kw.get("granularity", "per_channel"), b.kw.get("group_size", -1)
    if granularity == "per_group" and group_size <= 0:
        raise RecipeError(b.key("group_size"), f"per_group needs a positive group_size, got {group_size}; "
                                               "add group_size: 128 (or another positive size)")
    if granularity == "per_channel" and group_size != -1:
        raise RecipeError(b.key("group_size"), f"group_size {group_size} needs granularity: per_group; "
                                               "set quant.weight.granularity: per_group or drop group_size")
    if b.kw.get("sym_grid") == "full" and not b.kw.get("symmetric", True):
        raise RecipeError(b.key("sym_grid"), "full is a symmetric grid; set symmetric: true or sym_grid: narrow")
    b.get("calib_algo", _choice(("minmax",)))
    b.get("quant_type", _choice(("int-quant",)))
    b.get("need_pack", _bool)
    b.note("need_pack", "accepted but not acted on (weights are fake-quantized)", when=True)
    return WeightQuantConfig(**b.kw)


def _quant_reduction(key: str, value: Any) -> TokenReductionSpec:
    b = _Block(value, key, [], extra=("method", "special"))
    if "method" not in b.data:
        raise RecipeError(b.key("method"), "missing; add method: <reduction name, e.g. FastV>")
    params = b.get("special", _mapping, {})
    if "method" in params:
        raise RecipeError(b.key("special.method"), "the method name belongs at quant.token_reduction.method; "
                                                   "remove it from special")
    return TokenReductionSpec(b.get("method", _str), MappingProxyType(copy.deepcopy(params)),
                              b.key("special"), b.key("method"))


_calib = _simple(CalibConfig, "quant.calib",
                 passive=("preproc", "padding", "apply_chat_template", "add_answer"))


def _quant(value: Any, notes: list[str]) -> QuantConfig:
    flat = "per-modality blocks are not supported; put the fields (method, weight, ...) directly under quant"
    rejected = {"vision": flat, "language": flat}
    rejected.update({k: f"activation/KV-cache quantization is not supported; remove quant.{k}"
                     for k in ("act", "kvcache")})
    b = _Block(value, "quant", notes, QuantConfig, rejected=rejected)
    if "weight" not in b.data:
        raise RecipeError(b.key("weight"), "missing; add weight: {bit: 4, granularity: per_group, "
                                           "group_size: 128}")
    kw = {**b.kw, "weight": _weight(b.data["weight"], notes), "calib": _calib(b.data.get("calib"), notes),
          "token_reduction": b.get("token_reduction", _nullable(_quant_reduction))}
    if "special" in b.data:
        kw["special"] = _simple(GPTQSpecial, "quant.special")(b.data["special"], notes)
        if kw["special"].owq:
            raise RecipeError("quant.special.owq", "OWQ is not supported; set owq: false or remove it")
        if kw["method"] == "RTN":
            notes.append("quant.special is GPTQ-only; RTN ignores it")
    b.note("quant_out", when=True)
    return QuantConfig(**kw)


def _reduction_block(b: _Block, path: str) -> TokenReductionSpec:
    """The block's `special: {method: <name>, **params}` (at `path`) -> a spec."""
    special = b.get("special", _mapping, {})
    if "method" not in special:
        raise RecipeError(f"{path}.method", f"missing; add {path}.method: <reduction name, e.g. FastV>")
    params = {k: copy.deepcopy(v) for k, v in special.items() if k != "method"}
    name = _str(f"{path}.method", special["method"])
    return TokenReductionSpec(name, MappingProxyType(params), path, f"{path}.method")


def _sub_block(value: Any, path: str, notes: list[str]) -> TokenReductionSpec:
    """`sparse.vision` / `sparse.language`: {method: TokenReduction, special: {method, **params}}."""
    b = _Block(value, path, notes, extra=("method", "special"))
    if "method" in b.data:
        b.get("method", _choice(("TokenReduction",)))
    if "special" not in b.data:
        raise RecipeError(f"{path}.special", "missing; add special: {method: <reduction name, e.g. ToMe>, ...}")
    return _reduction_block(b, f"{path}.special")


def _sparse(value: Any, notes: list[str]) -> SparseConfig:
    b = _Block(value, "sparse", notes, SparseConfig, extra=("language",))
    special = _reduction_block(b, b.key("special")) if "special" in b.data else None
    if "language" in b.data:
        if special is not None:
            raise RecipeError("sparse.language", "give the decoder-side method once: under sparse.special or "
                                                 "sparse.language, not both")
        special = _sub_block(b.data["language"], "sparse.language", notes)
    vision = _sub_block(b.data["vision"], "sparse.vision", notes) if "vision" in b.data else None
    if special is None and vision is None:
        raise RecipeError("sparse.special.method", "missing; add sparse.special.method: <reduction name, e.g. "
                                                   "FastV>, or a sparse.vision block")
    kw = {k: v for k, v in b.kw.items() if k not in ("special", "vision")}
    return SparseConfig(special, vision, **kw)


def _save(value: Any, notes: list[str]) -> SaveConfig:
    b = _Block(value, "save", notes, SaveConfig, ("trtllm_cfg",) + LIGHTCOMPRESS_SAVE_FLAGS)
    unsupported = "not supported (ignored); choose backends with export.targets"
    for flag in LIGHTCOMPRESS_SAVE_FLAGS:
        b.get(flag, _bool)
        b.note(flag, unsupported, when=True)
    b.get("trtllm_cfg", _mapping)
    b.note("trtllm_cfg", unsupported)
    b.note("save_trans", "accepted but not acted on (no transformed checkpoint is written)", when=True)
    return SaveConfig(**b.kw)


_PARSERS: Mapping[str, Callable[[Any, list[str]], Any]] = MappingProxyType({
    "base": _simple(BaseConfig, "base"), "model": _simple(ModelConfig, "model", passive=("tokenizer_mode",)),
    "inputs": _simple(InputsConfig, "inputs"), "quant": _quant, "sparse": _sparse, "save": _save,
    "export": _simple(ExportConfig, "export"), "parity": _simple(ParityConfig, "parity"),
})


# -------------------------------------------------------------------------------------------- loading
def load_recipe_dict(data: dict[str, Any], name: str, source: str = "<dict>") -> Recipe:
    """Validate a recipe mapping (as loaded from YAML) and return the typed `Recipe`."""
    if not isinstance(data, dict):
        raise RecipeError(source, f"a recipe must be a mapping of sections ({', '.join(SECTIONS)}), "
                                  f"got {_show(data)}; start it with model: {{path: ...}}")
    notes: list[str] = []
    calib = "move this section under quant (as quant.calib)"
    top = _Block(data, "", notes, extra=SECTIONS, rejected={"calib": calib})
    if "model" not in top.data:
        raise RecipeError("model", "missing section; add model: {path: ...}")
    optional = ("quant", "sparse")  # an empty `quant:` means no quantization
    parsed = {s: None if s in optional and top.data.get(s) is None else parse(top.data.get(s), notes)
              for s, parse in _PARSERS.items()}
    eval_section = top.get("eval", _nullable(_mapping))
    if eval_section is not None:
        eval_section = parse_eval(eval_section, notes)
    quant = parsed["quant"]
    if parsed["sparse"] is not None and quant is not None and quant.token_reduction is not None:
        raise RecipeError("quant.token_reduction", "sparse.special and quant.token_reduction both name a "
                                                   "token reduction; give one of the two")
    return Recipe(name=name, source=source, eval=eval_section, warnings=tuple(notes),
                  raw=copy.deepcopy(data), **parsed)


def load_recipe(path: str | Path) -> Recipe:
    """Read a YAML recipe with safe-load semantics and size bounds (`yaml_safe`); the name is the file stem."""
    p, key = Path(path), str(path)
    if not p.exists():
        raise RecipeError(key, "file does not exist; check the path")
    if not p.is_file():
        raise RecipeError(key, "is not a file; pass the path of a .yml recipe")
    try:
        data = load_bounded(p.read_text(encoding="utf-8"))
    except YamlBoundError as err:
        raise RecipeError(key, f"{err}") from None
    except OSError as err:
        raise RecipeError(key, f"could not be read ({err.strerror or err}); check the file's permissions") from None
    except UnicodeDecodeError as err:
        raise RecipeError(key, f"is not UTF-8 text ({err.reason}); save the recipe as UTF-8") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise RecipeError(key, f"not valid YAML ({where}{problem}); fix the syntax") from None
    if data is None:
        raise RecipeError(key, "the file is empty; a recipe needs at least model: {path: ...}")
    return load_recipe_dict(data, p.stem, key)
