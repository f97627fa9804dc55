"""The `torch.export` program itself, saved with `torch.export.save` (`<graph>.ep.pt2`), its weights in the
export's one `weights.safetensors` (`torch_weights.py`).

Each saved program holds one-element placeholders (zero-stride views of the right shape and dtype) where its
parameters, buffers and tensor constants were, and no example inputs; the runtime's "eager" backend loads it with
`torch.export.load`, binds it to the export's weights (read once for all graphs) and runs the graph module in eager
PyTorch: no compiler, no model code, the same graph the other targets were built from.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from tokcompile.errors import ExportError
from tokcompile.export.base import EXPORTERS, Artifact, ExportRequest, Loader, Runner, runtime_device
from tokcompile.export.torch_weights import pick, program_tensors, shared_tensors, weight_file


def _rebuild(program: Any, state_dict: dict, constants: dict, example_inputs: Any = None) -> Any:
    """`program` with other tensors in its state dict and constants (same graph, signature and names)."""
    import torch

    return torch.export.ExportedProgram(
        root=program.graph_module, graph=program.graph, graph_signature=program.graph_signature,
        state_dict=state_dict, range_constraints=program.range_constraints,
        module_call_graph=program.module_call_graph, example_inputs=example_inputs, constants=constants,
        verifiers=program.verifiers,
    )


def _swap(program: Any, value: Any) -> Any:
    """`program` with each tensor `t` of its state dict and constants replaced by `value(name, t)`; parameters
    stay parameters (without grad), other constants (script objects) stay as they are."""
    import torch

    def one(name: str, t: Any) -> Any:
        new = value(name, t)
        return torch.nn.Parameter(new, requires_grad=False) if isinstance(t, torch.nn.Parameter) else new

    state = {k: one(k, t) for k, t in program.state_dict.items()}
    consts = {k: one(k, t) if isinstance(t, torch.Tensor) else t for k, t in program.constants.items()}
    return _rebuild(program, state, consts)


def save_program(program: Any, path: Path) -> None:
    """Write `program` without its weights: each tensor becomes a zero-stride view of one element."""
    import torch

    bare = _swap(program, lambda _, t: torch.zeros((), dtype=t.dtype).expand(t.shape))  # (*t.shape,), 1 element
    with warnings.catch_warnings():  # the archive notes that a zero-stride view is not a whole storage
        warnings.filterwarnings("ignore", message="No complete tensor found")
        torch.export.save(bare, str(path))


def _without_shape_check(module: Any) -> Any:
    """`module` without the input-shape check `torch.export` puts before it. A saved and loaded program can pin a
    dynamic dimension to its example size: torch.export.load does so for a batch dimension that only reaches an
    expand (the decode graph's M-RoPE position ids on Qwen), and the check then refuses batch 1. The graph
    itself is shape-generic; the runtime feeds only shapes inside the exported ranges (its batch chunks and
    prompt limit), and parity checks every graph's outputs at batch 1 and 2."""
    for key, hook in list(module._forward_pre_hooks.items()):
        if getattr(hook, "__name__", "") == "_check_input_constraints_pre_hook":
            del module._forward_pre_hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)
    return module


def on_device(program: Any, shared: dict | None) -> Any:
    """`program` running on the runtime's device (`shared["device"]`, the host by default): the device arguments
    of the factory calls inside its graph (constants it builds) rewritten, and its tensors moved there, so a
    program traced on either device runs on either. Bind the weights first: they are then moved by no copy."""
    from torch.export.passes import move_to_device_pass

    return move_to_device_pass(program, runtime_device(shared))


def load_module(root: Path, file: str, weights: str, shared: dict | None, graph: str) -> Any:
    """The saved program `file` as a module bound to the export's weights `weights` (read once per `shared`)."""
    import torch

    program = torch.export.load(str(root / file))
    tensors = shared_tensors(root, shared, weights)  # on the runtime's device
    names = [*program.state_dict, *(k for k, t in program.constants.items() if isinstance(t, torch.Tensor))]
    bound = pick(tensors, names, root / weights, graph)
    return _without_shape_check(on_device(_swap(program, lambda name, _: bound[name]), shared).module())


def _load(files: list[str], input_names: list[str], graph: str = "") -> Loader:
    def loader(root: Path, shared: dict | None = None) -> Runner:
        import torch

        if len(files) == 1:  # an export written before the weights were shared: they are inside the program
            module = _without_shape_check(on_device(torch.export.load(str(root / files[0])), shared).module())
        else:
            module = load_module(root, files[0], files[1], shared, graph)
        device = runtime_device(shared)

        def run(inputs: dict[str, Any]) -> tuple:
            with torch.no_grad():
                return tuple(module(*[torch.as_tensor(inputs[n]).to(device) for n in input_names]))

        return run

    return loader


def write_program(req: ExportRequest) -> list[str]:
    """`<graph>.ep.pt2` without weights, and the program's tensors added to the export's weight file."""
    path = req.out_dir / f"{req.graph}.ep.pt2"
    pool = weight_file(req.shared, req.out_dir)
    try:
        pool.add(program_tensors(req.program, req.graph), req.graph)
        save_program(req.program, path)
    except ExportError:
        raise
    except Exception as e:  # serialization raises many types; report one line
        raise ExportError(f"saving the exported {req.graph} program failed: {str(e).strip().splitlines()[0]}") from e
    return [path.name, pool.name]


@EXPORTERS.register("eager")
def export_eager(req: ExportRequest) -> Artifact:
    files = write_program(req)
    return Artifact(target="eager", graph=req.graph, files=files, backend="eager",
                    loader=_load(files, req.input_names, req.graph))
