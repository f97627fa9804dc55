"""AOTInductor package (`.pt2`): the `torch.export` program compiled ahead of time to a shared library.

Loaded with `torch._inductor.aoti_load_package`; runs without the Python model code.
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

        runner = torch._inductor.aoti_load_package(str(root / file))

        def run(inputs: dict[str, Any]) -> tuple:
            # The compiled code assumes the example's (contiguous) strides; cached outputs may not be.
            args = [torch.as_tensor(inputs[n]).contiguous() for n in input_names]
            with torch.no_grad():
                return tuple(runner(*args))

        return run

    return loader


@EXPORTERS.register("aoti")
def export_aoti(req: ExportRequest) -> Artifact:
    import torch

    path = req.out_dir / f"{req.graph}.pt2"
    try:
        torch._inductor.aoti_compile_and_package(req.program, package_path=str(path))
    except Exception as e:  # inductor raises many types; report one line
        first = str(e).strip().splitlines()[0]
        raise ExportError(f"AOTInductor compile of the {req.graph} graph failed: {first}") from e
    loader = _load(path.name, req.input_names)
    return Artifact(target="aoti", graph=req.graph, files=[path.name], backend="aoti", loader=loader)
