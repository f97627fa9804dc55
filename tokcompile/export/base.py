"""Exporter interface: each target turns one exported program into files and a runner.

An `Artifact` records what was written (paths relative to the export directory) and how to run it. Its
`load()` returns a callable that takes the graph's inputs as numpy arrays or tensors, by name, and returns
a tuple of torch tensors in the graph's output order, so parity treats every backend alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tokcompile.registry import Registry

Runner = Callable[[dict[str, Any]], tuple]
# (export directory, shared) -> runner. `shared` is one dict per loaded export, the same for all its graphs, where a
# backend may keep what the graphs share (one copy of the weights); None when a graph is loaded alone.
Loader = Callable[[Path, "dict | None"], Runner]


@dataclass
class Artifact:
    target: str
    graph: str
    files: list[str]  # relative to the export directory
    backend: str  # runtime that executes it: "onnxruntime", "aoti"
    meta: dict[str, Any] = field(default_factory=dict)
    loader: Loader | None = field(default=None, repr=False)

    def load(self, root: Path, shared: dict | None = None) -> Runner:
        assert self.loader is not None, f"{self.target} artifact has no loader"
        return self.loader(root, shared)

    @property
    def name(self) -> str:
        return f"{self.graph}.{self.target}"


@dataclass(frozen=True)
class ExportRequest:
    """One graph to write: its `torch.export` program, names, and where the files go."""

    program: Any
    out_dir: Path
    graph: str
    input_names: list[str]
    output_names: list[str]
    opset: int | None = None
    shared: dict = field(default_factory=dict)  # one dict per compile and target, for what its graphs share
    plan: Any = None  # the resolved Plan, for targets that need more than the program (tensorrt: profile ranges)
    labels: dict[str, dict[int, str]] = field(default_factory=dict)  # input name -> {axis: manifest dim name}


def runtime_device(shared: dict | None) -> str:
    """The device a loader puts its graph on: the runtime's `shared["device"]` ("cpu", "cuda", "cuda:N"), the host
    when a graph is loaded alone."""
    return (shared or {}).get("device", "cpu")


class Exporter(Protocol):
    def __call__(self, req: ExportRequest) -> Artifact: ...


EXPORTERS: Registry[Exporter] = Registry("export target")
