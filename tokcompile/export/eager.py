"""The `torch.export` program itself, saved with `torch.export.save` (`<graph>.ep.pt2`).

The runtime's "eager" backend loads it with `torch.export.load` and runs the graph module in eager PyTorch:
no compiler, no model code, the same graph the other targets were built from.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokcompile.errors import ExportError
from tokcompile.export.base import EXPORTERS, Artifact, ExportRequest, Runner


def _load(file: str, input_names: list[str]) -> Callable[[Path], Runner]:
    def loader(root: Path) -> Runner:
        import torch

        module = torch.export.load(str(root / file)).module()

        def run(inputs: dict[str, Any]) -> tuple:
            with torch.no_grad():
                return tuple(module(*[torch.as_tensor(inputs[n]) for n in input_names]))

        return run

    return loader


@EXPORTERS.register("eager")
def export_eager(req: ExportRequest) -> Artifact:
    import torch

    path = req.out_dir / f"{req.graph}.ep.pt2"
    try:
        torch.export.save(req.program, str(path))
    except Exception as e:  # serialization raises many types; report one line
        raise ExportError(f"saving the exported {req.graph} program failed: {str(e).strip().splitlines()[0]}") from e
    loader = _load(path.name, req.input_names)
    return Artifact(target="eager", graph=req.graph, files=[path.name], backend="eager", loader=loader)
