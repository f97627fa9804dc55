"""Calibration activations between decoder layers, for the layer-by-layer GPTQ driver (`sequential.py`).

Per calibration batch the driver keeps the tokens entering the current layer, the sequence that entered
layer 0, the previous layer's tokens and keys (for steps that score with them), and this layer's unquantized
outputs. `ActivationStore` holds them on the host, in memory or, with `spill_dir`, as one file per batch and
kind in a fresh directory of its own under it (read back one batch at a time, so only the batch being computed
is in memory), and hands each one to the
device the current layer computes on (`device`: e.g. "cuda"; the host's tensors stay on the host).

Spilled files are the driver's own, written and read in this process (`torch.save` of plain tensors, read with
`weights_only=True`), and removed by `close()`.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tokcompile.reduce.state import TokenState

_STATE = "__token_state__"


def move(value: Any, device: torch.device | str) -> Any:
    """`value` (a tensor, a TokenState, or tuples, lists and dicts of them) with every tensor on `device`."""
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, TokenState):
        return dataclasses.replace(value, **{f.name: move(getattr(value, f.name), device)
                                             for f in dataclasses.fields(value)})
    if isinstance(value, tuple):
        return tuple(move(v, device) for v in value)
    if isinstance(value, list):
        return [move(v, device) for v in value]
    if isinstance(value, dict):
        return {k: move(v, device) for k, v in value.items()}
    return value


def _pack(value: Any) -> Any:
    """Plain containers only (what `torch.load(weights_only=True)` reads back)."""
    if isinstance(value, TokenState):
        return {_STATE: {f.name: _pack(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, tuple):
        return tuple(_pack(v) for v in value)
    return value


def _unpack(value: Any) -> Any:
    if isinstance(value, dict) and _STATE in value:
        return TokenState(**{k: _unpack(v) for k, v in value[_STATE].items()})
    if isinstance(value, tuple):
        return tuple(_unpack(v) for v in value)
    return value


class ActivationStore:
    """Values by (kind, batch): in memory, or spilled to `spill_dir`; handed out on `device`."""

    def __init__(self, device: str | None = None, spill_dir: Path | None = None):
        self.device = torch.device(device) if device is not None else None
        self.spill_dir = None
        if spill_dir is not None:  # a fresh directory of its own inside it, removed by close()
            Path(spill_dir).mkdir(parents=True, exist_ok=True)
            self.spill_dir = Path(tempfile.mkdtemp(prefix="activations-", dir=spill_dir))
        self._memory: dict[tuple[str, int], Any] = {}
        self.files_written = 0

    @property
    def off_host(self) -> bool:
        return self.device is not None and self.device.type != "cpu"

    def to_compute(self, value: Any) -> Any:
        """A host value (a calibration batch) on the compute device."""
        return move(value, self.device) if self.off_host else value

    def _file(self, kind: str, b: int) -> Path:
        assert self.spill_dir is not None
        return self.spill_dir / f"{kind}-{b}.pt"

    def put(self, kind: str, b: int, value: Any) -> None:
        if self.off_host:
            value = move(value, "cpu")
        if self.spill_dir is None:
            self._memory[(kind, b)] = value
            return
        torch.save(_pack(value), self._file(kind, b))
        self.files_written += 1

    def get(self, kind: str, b: int) -> Any:
        if self.spill_dir is None:
            value = self._memory[(kind, b)]
        else:
            value = _unpack(torch.load(self._file(kind, b), weights_only=True))
        return self.to_compute(value)

    def rename(self, src: str, dst: str, n: int) -> None:
        """Batches 0..n-1 of `src` become `dst` (replacing what `dst` held)."""
        for b in range(n):
            if self.spill_dir is None:
                self._memory[(dst, b)] = self._memory.pop((src, b))
            else:
                self._file(src, b).replace(self._file(dst, b))

    def drop(self, kind: str, n: int) -> None:
        for b in range(n):
            if self.spill_dir is None:
                self._memory.pop((kind, b), None)
            else:
                self._file(kind, b).unlink(missing_ok=True)

    def close(self) -> None:
        self._memory.clear()
        if self.spill_dir is not None:
            shutil.rmtree(self.spill_dir, ignore_errors=True)
