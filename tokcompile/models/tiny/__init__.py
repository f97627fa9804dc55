"""Built-in models for demos, tests and benchmarks: `model.path: tiny-random:<family>[@size]` (random weights)
and `tiny-trained:<name>` (weights shipped with the package, `tiny.trained`).

Every family's config, tokenizer and image processor are built in code (nothing is downloaded), one module
per family in this package: `build_config(family, size)`, `build_processor(family, size)` and
`model_class(family)`, plus `SIZES`. "tiny" serves the tests and demos; "medium" (about 150-300M parameters
with the family's real image-token count at a common resolution) serves the benchmarks. The tokenizers are
byte-level BPEs (`tiny.tokenizer`), so any text round-trips.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Any

from tokcompile.models.tiny import trained

TINY_PREFIX = "tiny-random:"

# family (HF model_type) -> module of this package that builds it
_MODULES = {
    "llava": "llava",
    "llava_next": "llava_next",
    "llava_onevision": "llava_onevision",
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_vl",
    "qwen3_vl": "qwen3_vl",
}


def _available(module: str) -> bool:
    return importlib.util.find_spec(f"{__name__}.{module}") is not None


FAMILIES: tuple[str, ...] = tuple(f for f, m in _MODULES.items() if _available(m))


def _module(family: str) -> ModuleType:
    if family not in FAMILIES:
        raise KeyError(family)
    return importlib.import_module(f"{__name__}.{_MODULES[family]}")


def is_tiny(path: str) -> bool:
    """A built-in model: random (`tiny-random:`) or trained (`tiny-trained:`)."""
    return path.startswith(TINY_PREFIX) or trained.is_trained(path)


def tiny_family(path: str) -> str:
    """"tiny-random:llava" -> "llava"; a size suffix ("tiny-random:llava@medium") is dropped;
    "tiny-trained:shapes" -> "llava" (its architecture's family)."""
    if trained.is_trained(path):
        return trained.family_and_size(path)[0]
    return path[len(TINY_PREFIX) :].split("@", 1)[0]


def tiny_size(path: str) -> str:
    """"tiny-random:llava@medium" -> "medium" (benchmark size); default "tiny"."""
    if trained.is_trained(path):
        return trained.family_and_size(path)[1]
    rest = path[len(TINY_PREFIX) :]
    return rest.split("@", 1)[1] if "@" in rest else "tiny"


def sizes(family: str) -> tuple[str, ...]:
    return tuple(_module(family).SIZES)


def build_config(family: str, size: str = "tiny") -> Any:
    return _module(family).build_config(family, size)


def build_processor(family: str, size: str = "tiny") -> Any:
    return _module(family).build_processor(family, size)


def build_model(family: str, seed: int = 0, size: str = "tiny") -> Any:
    """A random-weight model with SDPA attention in eval mode, deterministic for a given seed."""
    import torch

    config = build_config(family, size)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = _module(family).model_class(family)(config)
    return model.eval()


def build_from_path(path: str, seed: int = 0) -> Any:
    """The built-in model `path` names: `tiny-random:<family>[@size]` with random weights from `seed`, or
    `tiny-trained:<name>` with its shipped weights (checked against their SHA-256)."""
    model = build_model(tiny_family(path), seed=seed, size=tiny_size(path))
    if trained.is_trained(path):
        model.load_state_dict(trained.load_state_dict(trained.trained_name(path)), strict=True)
    return model
