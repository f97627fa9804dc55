"""TensorRT engines (`<graph>.engine`) built from each graph's ONNX export with the TensorRT Python API (10.x;
11.x where it differs), and the runner that executes them.

The `tensorrt` target builds from `<graph>.onnx`, which the `onnx` target writes earlier in the same compile
(plan.py requires onnx beside tensorrt and orders it first): the engine is built from the very graph that passed
onnxruntime parity and the static TensorRT check (`tensorrt_check`), and weight-stripped engines refit from that
ONNX's weights at load, so the export holds each weight once. Building: a strongly typed network (11.x: always),
`trt.OnnxParser`, one optimization profile with [min, opt, max] for every dynamic input dimension
(`tensorrt_profile`, `export.tensorrt`), a timing cache kept in the export (`tensorrt.timing_cache`) and, with
`export.tensorrt.strip_weights` (default), `STRIP_PLAN` + `REFIT_IDENTICAL`.

Needs TensorRT >= 10 and a CUDA GPU. CI has neither, so engine building, refitting and running have not run
there; the static check, the profile computation and the `--plan` refusal have.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tokcompile.devices import kind
from tokcompile.errors import ExportError, RecipeError, one_line
from tokcompile.export.base import EXPORTERS, Artifact, ExportRequest, Runner, runtime_device
from tokcompile.export.tensorrt_profile import input_profiles, plan_ranges

TIMING_CACHE = "tensorrt.timing_cache"
INSTALL = ("pip install tensorrt (NVIDIA's package: its install downloads the TensorRT libraries from NVIDIA's "
           "index, pypi.nvidia.com; 'tokcompile[tensorrt]' pulls it in)")


def import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or OSError when the libraries are missing
        raise ExportError(f"TensorRT is not installed or does not load ({type(e).__name__}); {INSTALL}") from None
    return trt


def _errors(source: Any) -> str:
    """A parser's or refitter's errors as one line: the count and the first."""
    n = source.num_errors
    return f"{n} error{'s' if n != 1 else ''}; first: {one_line(str(source.get_error(0)))}" if n else "no error given"


def _labelled_inputs(model: Any, labels: Mapping[str, Mapping[int, str]], graph: str) -> list[dict]:
    """The graph's inputs as the manifest writes them: static lengths as ints, dynamic ones by label."""
    weights = {i.name for i in model.graph.initializer}
    out = []
    for v in model.graph.input:
        if v.name in weights:
            continue
        shape: list[Any] = []
        for axis, d in enumerate(v.type.tensor_type.shape.dim):
            label = labels.get(v.name, {}).get(axis)
            if d.HasField("dim_value") and label is None:
                shape.append(d.dim_value)
            elif label is None:
                raise ExportError(f"the {graph} graph's input {v.name} has a dynamic axis {axis} with no name, so no "
                                  "TensorRT profile range; the graph layout must label it")
            else:
                shape.append(label)
        out.append({"name": v.name, "shape": shape})
    return out


def _external_files(model: Any) -> list[str]:
    """The files holding the graph's weights (external data locations, relative to the graph)."""
    return sorted({e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"})


def build_engine(onnx_path: Path, engine_path: Path, profiles: Mapping[str, tuple], cache_path: Path,
                 strip_weights: bool, graph: str) -> None:
    """Parse `onnx_path` (external data beside it), build with one profile, write the engine and the timing cache."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)  # 11.x: every network is typed
    network = builder.create_network(1 << int(typed) if typed is not None else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise ExportError(f"TensorRT's ONNX parser refused {onnx_path.name} ({_errors(parser)})")
    config = builder.create_builder_config()
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if tf32 is not None:
        config.clear_flag(tf32)  # float32 graphs compute in float32, as parity against eager expects
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        t = network.get_input(i)
        if -1 not in tuple(t.shape):
            continue
        if t.name not in profiles:
            raise ExportError(f"the {graph} graph's input {t.name} {tuple(t.shape)} is dynamic but has no profile")
        lo, opt, hi = profiles[t.name]
        profile.set_shape(t.name, lo, opt, hi)  # (min, opt, max) shapes
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=True)  # a cache from another GPU or version is not reused
    if strip_weights:
        config.set_flag(trt.BuilderFlag.STRIP_PLAN)  # the engine holds no weights ...
        config.set_flag(trt.BuilderFlag.REFIT_IDENTICAL)  # ... and is refitted with these same weights at load
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT could not build the {graph} engine; its log above says why")
    with open(engine_path, "wb") as f:
        f.write(serialized)
    with open(cache_path, "wb") as f:
        f.write(config.get_timing_cache().serialize())


@EXPORTERS.register("tensorrt")
def export_tensorrt(req: ExportRequest) -> Artifact:
    onnx_path = req.out_dir / f"{req.graph}.onnx"
    if not onnx_path.is_file():
        raise ExportError(f"the tensorrt target builds from {onnx_path.name}, which the onnx target has not written; "
                          "list onnx before tensorrt in export.targets")
    if req.plan is None:
        raise ExportError("the tensorrt target needs the plan in its ExportRequest (plan=...) for its profile ranges")
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    try:
        profiles = input_profiles(_labelled_inputs(model, req.labels or {}, req.graph), plan_ranges(req.plan))
    except ValueError as e:
        raise RecipeError("export.tensorrt", f"{req.graph} graph: {e}") from None
    strip = req.plan.recipe.export.tensorrt.strip_weights
    engine = req.out_dir / f"{req.graph}.engine"
    build_engine(onnx_path, engine, profiles, req.out_dir / TIMING_CACHE, strip, req.graph)
    files = [engine.name, onnx_path.name, *_external_files(model)]  # the ONNX and its weights: refit source
    meta = {
        "tensorrt_version": import_tensorrt().__version__,
        "profile": {name: [list(s) for s in shapes] for name, shapes in profiles.items()},  # [min, opt, max]
        "weight_stripped": strip,
        "refit_from": onnx_path.name if strip else None,
        "timing_cache": TIMING_CACHE,
        "device": "cuda",  # engines run on a CUDA GPU only
    }
    return Artifact(target="tensorrt", graph=req.graph, files=files, backend="tensorrt", meta=meta,
                    loader=_load(files, req.input_names))


def _torch_dtype(trt: Any, dtype: Any) -> Any:
    import torch

    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
             "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool, "UINT8": torch.uint8}
    name = next((n for n in table if getattr(trt.DataType, n, None) == dtype), None)
    if name is None:
        raise ExportError(f"the engine has an input or output of type {dtype}, which the runner cannot allocate")
    return table[name]


def _refit(trt: Any, engine: Any, onnx_path: Path, logger: Any) -> None:
    """Put the ONNX graph's weights into a weight-stripped (refittable) engine."""
    refitter = trt.Refitter(engine, logger)
    parser = trt.OnnxParserRefitter(refitter, logger)
    if not parser.refit_from_file(str(onnx_path)):
        raise ExportError(f"refitting the engine from {onnx_path.name} failed ({_errors(parser)})")
    missing = refitter.get_missing_weights()
    if missing:
        raise ExportError(f"{onnx_path.name} lacks {len(missing)} weights the engine needs (first: {missing[0]})")
    if not refitter.refit_cuda_engine():
        raise ExportError(f"TensorRT refused the weights of {onnx_path.name} for the engine")


class _EngineRunner:
    """One deserialized engine and its execution context: named inputs (any device) -> outputs in the ONNX graph's
    output order, on the GPU (`on_host=False`, the runtime's `cuda` device) or copied to the host."""

    def __init__(self, trt: Any, runtime: Any, engine: Any, outputs: list[str], input_names: list[str], file: str,
                 on_host: bool = True):
        self.trt, self.runtime, self.engine, self.file = trt, runtime, engine, file  # the runtime outlives the engine
        self.on_host = on_host
        self.context = engine.create_execution_context()
        io = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        self.inputs = [n for n in input_names if n in io]  # an input the builder found unused is no engine input
        self.outputs = outputs

    def _dtype(self, name: str) -> Any:
        return _torch_dtype(self.trt, self.engine.get_tensor_dtype(name))

    def __call__(self, inputs: dict[str, Any]) -> tuple:
        import torch

        stream = torch.cuda.current_stream()
        alive = []  # the device copies of the inputs must outlive the launch
        for name in self.inputs:
            t = torch.as_tensor(inputs[name]).to("cuda", self._dtype(name)).contiguous()
            lo, _opt, hi = self.engine.get_tensor_profile_shape(name, 0)
            if len(lo) != t.dim() or any(not a <= s <= b for a, s, b in zip(lo, t.shape, hi)):
                raise RecipeError("export.tensorrt", f"input {name} has shape {tuple(t.shape)}, outside the "
                                                     f"engine's profile {tuple(lo)}..{tuple(hi)}; widen the ranges "
                                                     "and recompile")
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
            alive.append(t)
        results = []
        for name in self.outputs:  # shapes follow from the input shapes: no data-dependent shapes in our graphs
            out = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self._dtype(name), device="cuda")
            self.context.set_tensor_address(name, out.data_ptr())
            results.append(out)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise ExportError(f"TensorRT failed to run {self.file}")
        stream.synchronize()
        return tuple(r.cpu() for r in results) if self.on_host else tuple(results)


def _load(files: list[str], input_names: list[str]) -> Callable[..., Runner]:
    """files: [<graph>.engine, <graph>.onnx, its weight files]; the ONNX gives the output order and, for a
    weight-stripped engine, the weights."""

    def loader(root: Path, shared: dict | None = None) -> Runner:
        import onnx
        import torch

        trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise ExportError("the tensorrt backend runs on a CUDA GPU and none is visible; choose another backend")
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine((root / files[0]).read_bytes())
        if engine is None:
            raise ExportError(f"TensorRT {trt.__version__} could not load {files[0]}; engines are tied to the TensorRT "
                              "version and GPU they were built with, so rebuild the export here")
        if engine.refittable:
            _refit(trt, engine, root / files[1], logger)
        outputs = [o.name for o in onnx.load(str(root / files[1]), load_external_data=False).graph.output]
        on_host = kind(runtime_device(shared)) != "cuda"
        return _EngineRunner(trt, runtime, engine, outputs, input_names, files[0], on_host)

    return loader
