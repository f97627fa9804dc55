"""Where graphs run: `cpu`, `cuda` or `cuda:N`, for the compile (`parity.device`, `--device`) and the runtime
(`load(..., device=)`, `generate --device`).

The convention every runner follows: it takes its inputs on any device, runs on its own, and returns its
outputs where it ran. Loops that chain graphs (generation) follow the device of the outputs they get, and what
they hand back to callers (tokens, kept indices, logits) is on the host.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from tokcompile.errors import RecipeError

DEVICE_FORMS = "cpu, cuda or cuda:N"
_DEVICE = re.compile(r"^(cpu|cuda)(:(\d+))?$")


def parse_device(key: str, value: Any) -> str:
    """The device named by `value`, spelled canonically ("cpu", "cuda", "cuda:1"); one line naming `key` if it is
    not one."""
    text = value.strip().lower() if isinstance(value, str) else None
    match = _DEVICE.match(text) if text else None
    if match is None or (match.group(1) == "cpu" and match.group(2)):
        raise RecipeError(key, f"{value!r} is not a device; use {DEVICE_FORMS}")
    return text


def check_available(key: str, device: str) -> None:
    """Refuse a CUDA device this machine does not have, before any weights load."""
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise RecipeError(key, f"{device} was asked for, but CUDA is not available here (torch.cuda.is_available() "
                               "is False: no GPU, or a CPU build of PyTorch); use cpu, or run on a CUDA machine")
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise RecipeError(key, f"{device} was asked for, but this machine has {torch.cuda.device_count()} CUDA "
                               f"device(s); use cuda:0 to cuda:{torch.cuda.device_count() - 1}")


def usable(key: str, value: Any) -> str:
    """`parse_device` then `check_available`: the canonical name of a device this machine has."""
    device = parse_device(key, value)
    check_available(key, device)
    return device


def kind(device: Any) -> str:
    """"cpu" or "cuda": what a compiled artifact is built for, whatever the index."""
    return str(device).split(":")[0]


def to_device(tree: Any, device: Any) -> Any:
    """Every tensor of a mapping (a processor's output too), list or tuple moved to `device` (a tensor there
    already is not copied); mappings come back as dicts."""
    import torch

    if isinstance(tree, torch.Tensor):
        return tree.to(device)
    if isinstance(tree, Mapping):
        return {k: to_device(v, device) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_device(v, device) for v in tree)
    return tree


def module_device(module: Any) -> Any:
    """The device of a module's first parameter (or buffer); the host when it has none."""
    import torch

    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")
