"""AOTInductor: every graph compiled ahead of time to a shared library, all of them in one package (`aoti.pt2`,
one model per graph: "vision", "prefill", "decode"), the weights outside it in the export's one
`weights.safetensors` (`torch_weights.py`).

Each graph is compiled with `aot_inductor.package_constants_in_so=False`, so its library holds code only, and the
package is rewritten with every graph compiled so far. At run time each graph opens its model of the package,
the weights are read once per loaded export, and each runner gets the tensors it names
(`load_constants(..., user_managed=True)`: the runner uses the caller's tensors, it copies nothing), so the
vision, prefill and decode graphs share one copy of the weights. Runs without the Python model code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tokcompile.errors import ExportError
from tokcompile.export.base import EXPORTERS, Artifact, ExportRequest, Loader, Runner, runtime_device
from tokcompile.export.torch_weights import pick, program_tensors, shared_tensors, weight_file

PACKAGE = "aoti.pt2"
OPTIONS = {"aot_inductor.package": True, "aot_inductor.package_constants_in_so": False}


def _load(files: list[str], input_names: list[str], graph: str = "") -> Loader:
    def loader(root: Path, shared: dict | None = None) -> Runner:
        import torch

        device = torch.device(runtime_device(shared))  # the package was compiled for its kind
        index = device.index if device.index is not None else -1  # -1: the current device
        bound: dict[str, Any] = {}  # the tensors the runner reads: user-managed, so `run` holds them
        if len(files) == 1:  # an export written before the weights were shared: one package per graph
            runner = torch._inductor.aoti_load_package(str(root / files[0]), device_index=index)
        else:
            from torch._inductor.package import load_package

            runner = load_package(str(root / files[0]), model_name=graph, device_index=index)
            tensors = shared_tensors(root, shared, files[1])
            bound = pick(tensors, runner.get_constant_fqns(), root / files[1], graph)
            runner.load_constants(bound, check_full_update=True, user_managed=True)  # no copy: keep them alive

        def run(inputs: dict[str, Any], _weights: dict = bound) -> tuple:
            # The compiled code assumes the example's (contiguous) strides; cached outputs may not be.
            args = [torch.as_tensor(inputs[n]).to(device).contiguous() for n in input_names]
            with torch.no_grad():
                return tuple(runner(*args))

        return run

    return loader


def _compile(program: Any) -> list:
    """The graph's AOTInductor files (library without weights, sources, metadata) in inductor's cache."""
    import torch

    module = program.module(check_guards=False)
    buffers = dict(module.named_buffers())
    for name in program.constants:  # lifted constants come back as plain attributes, which inductor's trace would
        value = getattr(module, name, None)  # rename `_tensor_constant<i>`; as buffers they keep their names, the
        if "." not in name and isinstance(value, torch.Tensor) and name not in buffers:  # weight file's
            delattr(module, name)
            module.register_buffer(name, value, persistent=False)
    args, kwargs = program.example_inputs
    return torch._inductor.aot_compile(module, args, kwargs, options=dict(OPTIONS))


def _package(out_dir: Path, models: dict[str, list]) -> Path:
    """Write every model compiled so far into the one package; graphs loaded already keep their own copy."""
    from torch._inductor.package import package_aoti

    scratch = out_dir / ".aoti-package"  # the archive's top folder is its file's stem: write it as aoti.pt2
    scratch.mkdir(exist_ok=True)
    package_aoti(str(scratch / PACKAGE), models)
    os.replace(scratch / PACKAGE, out_dir / PACKAGE)
    scratch.rmdir()
    return out_dir / PACKAGE


@EXPORTERS.register("aoti")
def export_aoti(req: ExportRequest) -> Artifact:
    models = req.shared.setdefault("aoti_models", {})  # graph -> its AOTInductor files
    pool = weight_file(req.shared, req.out_dir)
    try:
        models[req.graph] = _compile(req.program)
        path = _package(req.out_dir, models)
    except Exception as e:  # inductor raises many types; report one line
        first = str(e).strip().splitlines()[0]
        raise ExportError(f"AOTInductor compile of the {req.graph} graph failed: {first}") from e
    pool.add(program_tensors(req.program, req.graph), req.graph)
    files = [path.name, pool.name]
    return Artifact(target="aoti", graph=req.graph, files=files, backend="aoti",
                    meta={"device": compiled_for(req.program)}, loader=_load(files, req.input_names, req.graph))


def compiled_for(program: Any) -> str:
    """"cpu" or "cuda": the kind of device inductor generated code for (that of the program's example inputs)."""
    import torch

    args, kwargs = program.example_inputs
    first = next((t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)), None)
    return "cpu" if first is None else first.device.type
