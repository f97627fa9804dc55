"""ONNX export with the dynamo exporter (`torch.onnx.export(dynamo=True)`), weights as external data.

The graph is translated from the same `torch.export` program the other targets use, so dynamic dimensions
(the prompt length) carry over. onnxruntime (CPU) runs it for parity. This is the ONNX a TensorRT build
consumes.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokcompile.errors import ExportError
from tokcompile.export.base import EXPORTERS, Artifact, ExportRequest, Runner
from tokcompile.export.onnx_graph import topk_constants
from tokcompile.export.tensorrt_check import check_onnx


def _load(files: list[str], input_names: list[str]) -> Callable[[Path], Runner]:
    def loader(root: Path) -> Runner:
        import torch

        try:
            import onnxruntime as ort
        except ImportError:
            raise ExportError("onnxruntime is not installed; pip install 'tokcompile[onnx]'") from None
        opts = ort.SessionOptions()
        opts.log_severity_level = 4  # fatal only: failures reach the caller as exceptions, reported once
        # onnxruntime prints its provider-fallback notices with print(); the caller reports the failure itself
        with contextlib.redirect_stdout(io.StringIO()):
            session = ort.InferenceSession(str(root / files[0]), opts, providers=["CPUExecutionProvider"])

        def run(inputs: dict[str, Any]) -> tuple:
            feed = {n: torch.as_tensor(inputs[n]).cpu().numpy() for n in input_names}
            return tuple(torch.from_numpy(o) for o in session.run(None, feed))

        return run

    return loader


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
    files = [path.name] + sorted(p.name for p in req.out_dir.glob(f"{req.graph}.onnx.data"))
    model = onnx.load(str(path), load_external_data=False)
    opset_used = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    ops = sorted({n.op_type for n in model.graph.node})
    return Artifact(
        target="onnx",
        graph=req.graph,
        files=files,
        backend="onnxruntime",
        meta={"opset": opset_used, "ops": ops, "topk_k": topk_constants(model), "tensorrt": check_onnx(path)},
        loader=_load(files, req.input_names),
    )

