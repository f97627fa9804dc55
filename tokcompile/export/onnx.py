"""ONNX export with the dynamo exporter (`torch.onnx.export(dynamo=True)`), weights as external data in the
export's one weight file (`onnx_weights.py`), which the runtime maps once for all graphs.

The graph is translated from the same `torch.export` program the other targets use, so dynamic dimensions
(the prompt length) carry over. onnxruntime (CPU) runs it for parity. This is the ONNX a TensorRT build
consumes.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

from tokcompile.errors import ExportError
from tokcompile.export.base import EXPORTERS, Artifact, ExportRequest, Loader, Runner, runtime_device
from tokcompile.export.onnx_graph import topk_constants
from tokcompile.export.onnx_weights import WeightPool, session_options
from tokcompile.export.tensorrt_check import check_onnx


def _load(files: list[str], input_names: list[str], config: dict[str, str] | None = None) -> Loader:
    """A runner over one onnxruntime session on the runtime's device (`shared["device"]`: the CPU provider, or
    the CUDA provider with inputs and outputs bound on the GPU); `config` holds extra session config entries."""
    def loader(root: Path, shared: dict | None = None) -> Runner:
        import torch

        try:
            import onnxruntime as ort
        except ImportError:
            raise ExportError("onnxruntime is not installed; pip install 'tokcompile[onnx]'") from None
        device = torch.device(runtime_device(shared))
        opts = ort.SessionOptions()
        opts.log_severity_level = 4  # fatal only: failures reach the caller as exceptions, reported once
        session_options(opts, prepack=(shared or {}).get("onnx_prepack", True))  # see onnx_weights.py
        for key, value in (config or {}).items():
            opts.add_session_config_entry(key, value)
        # onnxruntime prints its provider-fallback notices with print(); the caller reports the failure itself
        with contextlib.redirect_stdout(io.StringIO()):
            session = ort.InferenceSession(str(root / files[0]), opts, providers=providers(ort, device))
        if device.type != "cpu":
            return bound_runner(session, input_names, device)

        def run(inputs: dict[str, Any]) -> tuple:
            feed = {n: torch.as_tensor(inputs[n]).cpu().numpy() for n in input_names}
            return tuple(torch.from_numpy(o) for o in session.run(None, feed))

        return run

    return loader


def providers(ort: Any, device: Any) -> list[Any]:
    """onnxruntime's execution providers for `device`; one line when its CUDA provider is not installed."""
    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        from tokcompile.errors import RecipeError

        raise RecipeError("--device", f"{device} needs onnxruntime's CUDA provider, which this onnxruntime lacks "
                                      "(pip install onnxruntime-gpu in place of onnxruntime); or use --device cpu")
    return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]


def bound_runner(session: Any, input_names: list[str], device: Any) -> Runner:
    """A runner that binds torch tensors on `device` as the session's inputs and hands its outputs over as torch
    tensors on that device (DLPack), so nothing crosses to the host between graphs (the KV cache stays put)."""
    import numpy as np
    import torch

    index = device.index or 0
    outputs = [o.name for o in session.get_outputs()]

    def run(inputs: dict[str, Any]) -> tuple:
        binding = session.io_binding()
        alive = [torch.as_tensor(inputs[n]).to(device).contiguous() for n in input_names]  # outlive the run
        for name, t in zip(input_names, alive):
            element = np.dtype(str(t.dtype).replace("torch.", "").replace("bool", "bool_"))
            binding.bind_input(name, device.type, index, element, tuple(t.shape), t.data_ptr())
        for name in outputs:
            binding.bind_output(name, device.type, index)
        session.run_with_iobinding(binding)
        return tuple(as_torch(o, device) for o in binding.get_outputs())

    return run


def as_torch(value: Any, device: Any) -> Any:
    """An onnxruntime OrtValue as a torch tensor on `device`: through DLPack, without a copy, where this
    onnxruntime offers it (its Python wrapper, or in older versions the binding underneath); else through the
    host."""
    import torch

    for candidate in (value, getattr(value, "_ortvalue", None)):
        if hasattr(candidate, "__dlpack__") and hasattr(candidate, "__dlpack_device__"):
            return torch.from_dlpack(candidate)
    return torch.from_numpy(value.numpy()).to(device)


@EXPORTERS.register("onnx")
def export_onnx(req: ExportRequest) -> Artifact:
    import onnx
    import torch

    path = req.out_dir / f"{req.graph}.onnx"
    kwargs = {"opset_version": req.opset} if req.opset is not None else {}
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink):
            torch.onnx.export(
                req.program,
                f=str(path),
                input_names=req.input_names,
                output_names=req.output_names,
                dynamo=True,
                external_data=True,
                optimize=True,
                **kwargs,
            )
    except Exception as e:  # the exporter raises many types; report one line and keep the log
        raise ExportError(f"ONNX export of the {req.graph} graph failed: {str(e).strip().splitlines()[0]}") from e
    if "onnx_weights" not in req.shared:  # the first graph of this compile starts the export's weight file
        req.shared["onnx_weights"] = WeightPool(req.out_dir)
    pool = req.shared["onnx_weights"]
    moved = pool.add(path)  # this graph's weights into the export's one weight file
    files = [path.name, pool.name]
    model = onnx.load(str(path), load_external_data=False)
    opset_used = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    ops = sorted({n.op_type for n in model.graph.node})
    return Artifact(
        target="onnx",
        graph=req.graph,
        files=files,
        backend="onnxruntime",
        meta={"opset": opset_used, "ops": ops, "topk_k": topk_constants(model), "tensorrt": check_onnx(path),
              "weights": moved},
        loader=_load(files, req.input_names),
    )

