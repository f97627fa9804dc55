"""`torch.compile` over the saved `torch.export` programs: the same files as the `eager` target
(`<graph>.ep.pt2` and the export's one `weights.safetensors`), run through `torch.compile` at load.

The runtime's "torch_compile" backend opens an export's torch_compile artifacts, or its eager ones (the same
files), binds each program to the weights read once for all graphs (`eager.load_module`) and wraps the module in
`torch.compile(dynamic=True)`. Recompiles are what make it slow, so inputs are made densely contiguous (dynamo
guards on strides, and cached outputs come in other layouts) and tracing runs with `backed_size_oblivious` (a
batch of 1 does not specialise the graph) and without duck shapes (two lengths equal by chance are not merged).
Each graph then compiles on its first call and never again for new prompt or cache lengths; a batch of 1 after a
batch of 2 or more (or the reverse) compiles it once more (inductor's kernels and the decoder's reshapes guard on
it). A compile costs about 40 s per graph on 2 CPU cores with an empty inductor cache (README: Generating).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokcompile.export.base import EXPORTERS, Artifact, ExportRequest, Loader, Runner, runtime_device
from tokcompile.export.eager import load_module, write_program

SETTINGS = {"backend": "inductor", "mode": "default"}  # torch.compile's: generated kernels


def tracing_settings() -> Any:
    """Shape settings while dynamo traces: sizes 0/1 not specialised, no duck shapes; undone on exit."""
    import torch.fx.experimental._config as fx_config

    return fx_config.patch(backed_size_oblivious=True, use_duck_shape=False)


def dense(t: Any) -> Any:
    """`t` with the strides of a fresh contiguous tensor (even along size-1 dimensions), copied only if needed."""
    import torch

    want, step = [], 1
    for size in reversed(t.shape):  # row-major strides, innermost first
        want.append(step)
        step *= size
    return t if tuple(reversed(want)) == t.stride() else t.clone(memory_format=torch.contiguous_format)


def _load(files: list[str], input_names: list[str], graph: str = "") -> Loader:
    def loader(root: Path, shared: dict | None = None) -> Runner:
        import torch

        module = torch.compile(load_module(root, files[0], files[1], shared, graph), dynamic=True, **SETTINGS)
        device = runtime_device(shared)

        def run(inputs: dict[str, Any]) -> tuple:
            args = [dense(torch.as_tensor(inputs[n]).to(device)) for n in input_names]
            with torch.no_grad(), tracing_settings():
                return tuple(module(*args))

        return run

    return loader


@EXPORTERS.register("torch_compile")
def export_torch_compile(req: ExportRequest) -> Artifact:
    files = write_program(req)  # the eager target's files: written again (identical) when both are targets
    return Artifact(target="torch_compile", graph=req.graph, files=files, backend="torch_compile",
                    loader=_load(files, req.input_names, req.graph))
