"""The `torch.export` program itself, saved with `torch.export.save` (`<graph>.ep.pt2`).

The runtime's "eager" backend loads it with `torch.export.load` and runs the graph module in eager PyTorch:
no compiler, no model code, the same graph the other targets were built from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from tokcompile.errors import ExportError
from tokcompile.export.base import EXPORTERS, Artifact, Runner


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
def export_eager(
    program: Any,
    example: dict[str, Any],
    out_dir: Path,
    *,
    graph: str,
    input_names: list[str],
    output_names: list[str],
    opset: int | None,
    log: Callable[[str], None],
) -> Artifact:
    import torch

    path = out_dir / f"{graph}.ep.pt2"
    try:
        torch.export.save(program, str(path))
    except Exception as e:  # serialization raises many types; report one line
        raise ExportError(f"saving the exported {graph} program failed: {str(e).strip().splitlines()[0]}") from e
    return Artifact(target="eager", graph=graph, files=[path.name], backend="eager", loader=_load(path.name, input_names))
