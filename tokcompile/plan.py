"""resolve(): a loaded recipe plus the model's config (no weights) -> a `Plan` of Python ints.

The plan holds everything the graph, the FLOPs count and the parity checks read: geometry, the static
schedule, the reducers, the quantization config and the input shapes. Every check that needs the model's
sizes (layer ranges, keep counts, group sizes, resolution) happens here, so `--plan` catches it without
loading weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokcompile import flops
from tokcompile.devices import usable
from tokcompile.errors import RecipeError
from tokcompile.export.tensorrt_profile import check_ranges
from tokcompile.layout import GraphLayout, build_layout
from tokcompile.models import ADAPTERS, Geometry, VLMAdapter, tiny
from tokcompile.models.loading import check_weights_present, load_config, model_type_of, resolve_dtype
from tokcompile.question import QuestionSpec
from tokcompile.recipe import EXPORT_TARGETS, Recipe
from tokcompile.reduce import REDUCERS, Entering, Output, Positions, Schedule, Site, Step, config_from_params
from tokcompile.reduce.base import FAMILY_NEEDS, missing_needs, sites_used
from tokcompile.reduce.schedule import decoder_image_tokens_in, image_tokens_per_decoder_layer
from tokcompile.registry import suggest

# Text tokens assumed for FLOPs when the recipe leaves the text length dynamic.
DEFAULT_FLOPS_TEXT_TOKENS = 64

# Parity tolerances (atol, rtol) per export dtype where the recipe sets none: artifact against eager in the same
# dtype, measured on the tiny models (README, Precision). float32's are the recipe defaults.
DTYPE_TOLERANCES = {"float32": (1e-4, 1e-3), "float16": (2e-2, 2e-2), "bfloat16": (5e-2, 5e-2)}


@dataclass(frozen=True)
class Plan:
    recipe: Recipe
    model_type: str
    adapter: VLMAdapter
    config: Any = field(repr=False)
    geometry: Geometry
    schedule: Schedule
    reducers: tuple
    image_token_id: int
    quant: Any | None  # a quant config object (e.g. RTNConfig) or None
    quant_include: tuple[str, ...]
    quant_ignore: tuple[str, ...]
    targets: tuple[str, ...]
    text_len_range: tuple[int, int]  # (min, max) total prompt length T, image tokens included
    out_dir: Path
    flops: dict
    dtype: str = "float32"  # the graphs' precision (export.dtype, or model.torch_dtype; see resolve_export_dtype)
    atol: float = 1e-4  # parity tolerances: the recipe's, else DTYPE_TOLERANCES[dtype]
    rtol: float = 1e-3
    question: QuestionSpec | None = None  # what the vision graph's question inputs hold, where a step reads it
    device: str = "cpu"  # where the graphs are traced, compiled and checked (parity.device, or --device)

    @property
    def batch_size(self) -> int:
        return self.recipe.inputs.batch_size

    def image_tokens_per_layer(self) -> list[int]:
        g = self.geometry
        return image_tokens_per_decoder_layer(g.n_image_tokens, g.n_layers, self.schedule, g.vision_tokens)

    @property
    def layout(self) -> GraphLayout:
        """The named inputs and outputs of the vision, prefill and decode graphs."""
        return build_layout(self.adapter, self.geometry, self.schedule)

    def to_dict(self) -> dict:
        return {
            "model_type": self.model_type,
            "geometry": self.geometry.to_dict(),
            "schedule": [s.to_dict() for s in self.schedule],
            "image_tokens_per_layer": self.image_tokens_per_layer(),
            "image_tokens_to_decoder": decoder_image_tokens_in(self.geometry.n_image_tokens, self.schedule,
                                                               self.geometry.vision_tokens),
            "image_token_id": self.image_token_id,
            "batch_size": self.batch_size,
            "text_len_range": list(self.text_len_range),
            "targets": list(self.targets),
            "dtype": self.dtype,
            "device": self.device,
            "parity_tolerance": {"atol": self.atol, "rtol": self.rtol},
            "quant_include": list(self.quant_include),
            "quant_ignore": list(self.quant_ignore),
            **({"question": self.question.to_dict()} if self.question else {}),
        }


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _check_model_type(declared: str | None, model_type: str, path: str) -> None:
    if declared is None:
        return
    adapter = ADAPTERS.get(model_type)
    accepted = {_norm(t) for t in (*adapter.model_types, *adapter.lightcompress_types)}
    if _norm(declared) not in accepted:
        names = ", ".join(adapter.lightcompress_types + adapter.model_types)
        raise RecipeError(
            "model.type",
            f"'{declared}' does not match the checkpoint at {path}, whose config says model_type '{model_type}'; "
            f"set model.type to one of {names}, or remove it",
        )


def _quant(recipe: Recipe, adapter: VLMAdapter, geom: Geometry) -> tuple[Any, tuple[str, ...], tuple[str, ...]]:
    q = recipe.quant
    if q is None:
        return None, (), ()
    from tokcompile.quant import RTNConfig, WeightQuantConfig
    from tokcompile.quant.gptq import GPTQConfig

    w = q.weight
    group = w.group_size if w.granularity == "per_group" else None
    if group is not None:
        in_features = {
            "q/k/v/gate/up projections": geom.hidden_size,
            "o_proj": geom.n_heads * geom.head_dim,
            "down_proj": geom.intermediate_size,
        }
        for what, n in in_features.items():
            if n % group:
                sizes = in_features.values()
                divisors = [g for g in (128, 64, 32, 16, 8) if all(m % g == 0 for m in sizes)]
                hint = f"use a divisor such as {divisors[0]}" if divisors else "use per_channel"
                raise RecipeError(
                    "quant.weight.group_size",
                    f"{group} does not divide the input features ({n}) of the decoder's {what}; {hint}",
                )
    wcfg = WeightQuantConfig(bit=w.bit, symmetric=w.symmetric, group_size=group, sym_grid=w.sym_grid)
    if q.method == "GPTQ":
        from tokcompile.quant.calib import SOURCES

        if q.calib.name.lower() not in SOURCES:
            raise RecipeError(
                "quant.calib.name", f"unknown calibration source '{q.calib.name}'; use one of {', '.join(SOURCES)}"
            )
        if q.calib.name.lower() != "synthetic" and not q.calib.path:
            raise RecipeError("quant.calib.path", f"calib name {q.calib.name} needs a folder or JSONL file")
        sp = q.special
        cfg: Any = GPTQConfig(
            weight=wcfg, blocksize=sp.blocksize, percdamp=sp.percdamp, actorder=sp.actorder,
            static_groups=sp.static_groups, true_sequential=sp.true_sequential,
        )
    else:
        cfg = RTNConfig(weight=wcfg)
    ignore = q.ignore if q.ignore is not None else adapter.quant_ignore
    return cfg, adapter.quant_include, tuple(ignore)


_SITE_WHERE = {
    Site.VISION_BLOCK: "inside the vision blocks",
    Site.VISION_OUT: "at the vision tower's output",
    Site.PROJECTOR_OUT: "at the projector's output",
    Site.DECODER_LAYER: "before a decoder layer",
    Site.DECODER_MID: "inside a decoder layer",
}


def _reduction(recipe: Recipe, adapter: VLMAdapter, geom: Geometry) -> tuple[Schedule, tuple, QuestionSpec | None]:
    """Plan every reduction of the recipe in data order, one reducer per step, and check that the steps
    chain: sites in order, each step's entering count equal to what the previous steps leave. Also returns
    what the question inputs hold, where a step reads the question (one tokenizer and shape per export)."""
    steps: list[Step] = []
    reducers: list = []
    question: QuestionSpec | None = None
    cls_offset = geom.vision_tokens - geom.n_image_tokens  # tower tokens the feature selection drops (CLS)
    n_vision, n_image = geom.vision_tokens, geom.n_image_tokens
    for spec in recipe.reductions:
        if spec.method not in REDUCERS:
            raise RecipeError(
                spec.method_key,
                f"unknown token-reduction method '{spec.method}'{suggest(spec.method, REDUCERS.keys())}; "
                f"available: {', '.join(REDUCERS.keys())}",
            )
        cls = REDUCERS.get(spec.method)
        cfg = config_from_params(cls, dict(spec.params), spec.key)
        for site in sites_used(cfg) - adapter.sites:
            reason = adapter.site_refusals.get(site, "the adapter does not expose this site")
            raise RecipeError(spec.method_key, f"{cls.method} runs {_SITE_WHERE[site]}, which {geom.family} does "
                                               f"not support: {reason}")
        for need in missing_needs(cls, adapter):
            raise RecipeError(spec.method_key, f"{cls.method} needs {FAMILY_NEEDS[need]}, which {geom.family}'s "
                                               "adapter does not give; choose another method for this family")
        after = (steps[-1].site, steps[-1].layer) if steps else None
        first_projector = not any(s.site is Site.PROJECTOR_OUT for s in steps)
        planned = cfg.plan(geom, spec.key, Entering(n_image, n_vision, after, adapter.sites, adapter.site_refusals,
                                                    adapter.tower_at_projector and not steps,
                                                    adapter.features_at_projector and first_projector))
        for step in planned:
            if step.site not in cls.sites:
                raise RecipeError(spec.method_key, f"{cls.method} planned a step at {step.site.value}, outside the "
                                                   f"sites it declares")
            if steps and (step.site.rank, step.layer) < (steps[-1].site.rank, steps[-1].layer):
                prev = steps[-1]
                raise RecipeError(spec.key, f"{cls.method} at {step.site.value} {step.layer} would run before "
                                            f"{prev.method} at {prev.site.value} {prev.layer}; reductions must follow "
                                            "the data order (vision, projector, decoder layers in order)")
            have = n_vision if step.site.in_vision_tower else n_image
            if step.n_in != have or not 0 <= step.n_out <= step.n_in:
                raise RecipeError(spec.key, f"{cls.method} at {step.site.value} {step.layer} takes {step.n_in} -> "
                                            f"{step.n_out} tokens, but {have} arrive there")
            if step.n_out == 0 and step.site.in_vision_graph:
                raise RecipeError(spec.key, f"{cls.method} would leave no image token before the decoder")
            before_side = step.site.in_vision_graph or step.layer < geom.side_streams
            if geom.side_streams and step.output is not Output.KEPT and before_side:
                raise RecipeError(spec.key, f"{cls.method} merges image tokens before decoder layer "
                                            f"{geom.side_streams - 1}, whose output {geom.family} still adds "
                                            "per-image-token side features to; merging those with the same weights is "
                                            "not implemented: use a pruning method there, or merge after that layer")
            if step.positions is Positions.RENUMBER and geom.rope != "1d":
                raise RecipeError(spec.key, f"{cls.method} renumbers positions, which {geom.family}'s {geom.rope} "
                                            "RoPE cannot take; keep the original positions")
            if step.site.in_vision_tower:
                n_vision = step.n_out
                n_image = n_vision - cls_offset
            else:
                n_image = step.n_out
            if step.question:
                if not step.site.in_vision_graph:
                    raise RecipeError(spec.method_key, f"{cls.method} reads the question at {step.site.value}; only "
                                                       "vision-graph steps can")
                mine = cfg.question(spec.key)
                if question is not None and (mine.directory, mine.segments, mine.length, mine.truncate) != (
                        question.directory, question.segments, question.length, question.truncate):
                    def form(q: QuestionSpec) -> str:
                        return (f"{q.directory} ({q.segments} × {q.length} tokens, "
                                f"{'truncated' if q.truncate else 'not truncated'})")

                    raise RecipeError(mine.key, f"{cls.method} reads the question with {form(mine)}, but an earlier "
                                                f"step reads it with {form(question)}; an export takes one question "
                                                "input: combine methods that read it the same way")
                question = question or mine
            steps.append(step)
            reducers.append(cfg)
    return tuple(steps), tuple(reducers), question


def _with_reducer_warnings(recipe: Recipe, reducers: tuple) -> Recipe:
    """The recipe with every reducer's `warnings()` (options accepted but without effect) added to its own."""
    from dataclasses import replace

    extra: list[str] = []
    for cfg in {id(c): c for c in reducers}.values():  # each config once, in order
        warn = getattr(cfg, "warnings", None)
        extra += [w for w in (warn() if callable(warn) else ()) if w not in extra]
    return replace(recipe, warnings=recipe.warnings + tuple(extra)) if extra else recipe


def _check_weight_format(recipe: Recipe, targets: tuple[str, ...]) -> None:
    if recipe.export.weight_format != "int4":
        return
    q = recipe.quant
    if q is None or q.weight.bit > 4:
        raise RecipeError("export.weight_format", "int4 needs weight quantization with quant.weight.bit of 4 or less")
    if "onnx" not in targets:
        raise RecipeError("export.weight_format", "int4 weights are written for ONNX; add onnx to export.targets")
    grouped = q.weight.granularity == "per_group"
    if q.method == "GPTQ" and q.special.actorder and not q.special.static_groups and grouped:
        raise RecipeError(
            "quant.special.static_groups",
            "int4 export with actorder needs static_groups: true (ONNX block dequantization needs contiguous groups)",
        )


def _check_tensorrt(recipe: Recipe, targets: tuple[str, ...], key: str) -> tuple[str, ...]:
    """TensorRT builds its engines from the ONNX graphs on a CUDA GPU: refuse it where it cannot run, and put onnx
    first. Returns the targets in build order."""
    if "tensorrt" not in targets:
        return targets
    try:
        import tensorrt as trt
    except Exception:  # ImportError, or OSError when its libraries are missing
        from tokcompile.export.tensorrt import INSTALL

        raise RecipeError(key, f"tensorrt needs TensorRT 10 or newer, which is not installed: {INSTALL}. Without it, "
                               "drop tensorrt; every compile still runs the static TensorRT check of the ONNX graphs "
                               "(manifest: graphs.<name>.artifacts.onnx.tensorrt)") from None
    if int(str(trt.__version__).split(".")[0]) < 10:
        raise RecipeError(key, f"tensorrt needs TensorRT 10 or newer, found {trt.__version__}; upgrade it")
    import torch

    if not torch.cuda.is_available():
        raise RecipeError(key, "tensorrt builds and runs its engines on a CUDA GPU and none is visible; compile on a "
                               "machine with one, or drop tensorrt (the static TensorRT check of the ONNX graphs runs "
                               "without it)")
    if "onnx" not in targets:
        raise RecipeError(key, "tensorrt builds its engines from the ONNX graphs; add onnx to the targets")
    return ("onnx", *(t for t in targets if t != "onnx"))


def resolve_export_dtype(recipe: Recipe, config: Any) -> str:
    """The graphs' dtype. `export.dtype` when given; else `model.torch_dtype` when the recipe writes a dtype by
    name; else float32. `torch_dtype: auto`, which LightCompress's configs write for loading, does not pick the
    export's precision: a config brought unchanged exports float32 (and stays exportable to ONNX). Weights always
    load and quantize in float32; the model is cast to this dtype after quantization, before the graphs are
    built."""
    if _written(recipe, "export", "dtype"):
        return recipe.export.dtype
    if not _written(recipe, "model", "torch_dtype") or recipe.model.torch_dtype == "auto":
        return "float32"
    return resolve_dtype(recipe.model.torch_dtype, config)


def _written(recipe: Recipe, section: str, key: str) -> bool:
    """Whether the recipe's YAML writes `section.key` (a default is not a choice)."""
    block = recipe.raw.get(section)
    return isinstance(block, dict) and block.get(key) is not None


def _dtype_source(recipe: Recipe) -> str:
    return "export.dtype" if _written(recipe, "export", "dtype") else "model.torch_dtype"


def parity_tolerance(recipe: Recipe, dtype: str) -> tuple[float, float]:
    """(atol, rtol): each the recipe's `parity.atol`/`parity.rtol` where it writes them, else the dtype's default."""
    atol, rtol = DTYPE_TOLERANCES[dtype]
    return (recipe.parity.atol if _written(recipe, "parity", "atol") else atol,
            recipe.parity.rtol if _written(recipe, "parity", "rtol") else rtol)


def _step_name(step: Any, reducer: Any) -> str:
    """A step as the recipe names its method: `ToMe`, or `AIM's aim_merge step` where a method has several."""
    method = type(reducer).method
    return method if method.lower().replace("-", "") == step.method else f"{method}'s {step.method} step"


def _check_dtype(recipe: Recipe, dtype: str, targets: tuple[str, ...], key: str, schedule: Schedule,
                 reducers: tuple) -> None:
    """Refuse what cannot be validated in half precision on this machine, before any weights load."""
    if dtype == "float32":
        return
    src = _dtype_source(recipe)
    if recipe.export.weight_format == "int4":
        raise RecipeError("export.weight_format", f"int4 ONNX graphs are written from float32 graphs only ({src}: "
                                                  f"{dtype}); set export.weight_format: float or {src}: float32")
    if dtype == "bfloat16" and ("onnx" in targets or "tensorrt" in targets):
        raise RecipeError(key, f"onnx cannot be validated in bfloat16 ({src}: bfloat16): onnxruntime's CPU provider "
                               "has no bfloat16 TopK and few bfloat16 kernels, so parity cannot run; use aoti or "
                               f"eager for bfloat16, or set {src}: float32 for onnx")
    unscored = sorted({_step_name(s, r) for s, r in zip(schedule, reducers) if s.scored is None})  # 0: constant
    if dtype == "float16" and ("onnx" in targets or "tensorrt" in targets) and unscored:
        names = ", ".join(unscored)
        raise RecipeError(key, f"onnx cannot be validated in float16 ({src}: float16) with {names}: onnxruntime's "
                               "CPU float16 kernels round differently from PyTorch's, so kept tokens can differ from "
                               "eager's at near-ties, and parity can check those only for methods that report their "
                               f"decision scores ({names} {'does' if len(unscored) == 1 else 'do'} not in this "
                               "configuration); use "
                               f"aoti or eager for float16, or set {src}: float32 for onnx")


def _check_device_targets(device: str, key: str, targets: tuple[str, ...]) -> None:
    """What parity on a GPU needs beyond CUDA itself: onnxruntime's CUDA provider for the ONNX graphs (the INT4
    graphs are checked on the CPU provider, as they are written for it)."""
    if device.startswith("cuda") and "onnx" in targets:
        try:
            import onnxruntime as ort
        except ImportError:
            return  # the onnx target's own check reports a missing onnxruntime
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RecipeError(key, f"{device}: the onnx graphs are checked on the GPU through onnxruntime's CUDA "
                                   "provider, which this onnxruntime lacks; pip install onnxruntime-gpu in place of "
                                   "onnxruntime, or drop onnx from export.targets")


def check_remote_code(recipe: Recipe, confirmed: bool) -> None:
    if recipe.model.trust_remote_code and not confirmed:
        raise RecipeError("model.trust_remote_code", "true runs Python code from the checkpoint directory; confirm "
                                                     "with --trust-remote-code on the command line, or set it false")


def remote_code_warning(recipe: Recipe) -> str | None:
    if not recipe.model.trust_remote_code:
        return None
    return (f"model.trust_remote_code is on: Python code in '{recipe.model.path}' will run with your "
            "permissions; use it only for checkpoints you trust")


def resolve(recipe: Recipe, out: str | Path | None = None, targets: tuple[str, ...] | None = None,
            trust_remote_code: bool = False, device: str | None = None) -> Plan:
    """Resolve `recipe` against the model's config only. Raises `RecipeError` on anything inconsistent.
    `device` (`--device`) overrides `parity.device`; a CUDA device this machine lacks is refused here.

    `model.trust_remote_code: true` runs Python files of the checkpoint directory (already when its config
    is read), so the caller must confirm it as well: `trust_remote_code=True` (`--trust-remote-code`)."""
    path = recipe.model.path
    check_remote_code(recipe, trust_remote_code)
    device_key = "--device" if device is not None else "parity.device"
    device = usable(device_key, device if device is not None else recipe.parity.device)
    model_type = model_type_of(path)
    if model_type not in ADAPTERS:
        raise RecipeError(
            "model.path",
            f"model family '{model_type}' is not supported yet; supported: {', '.join(ADAPTERS.keys())}",
        )
    _check_model_type(recipe.model.type, model_type, path)
    if not tiny.is_tiny(path):
        check_weights_present(path)
    adapter: VLMAdapter = ADAPTERS.get(model_type)()
    config = load_config(path, recipe.model.trust_remote_code)
    frames = recipe.inputs.video_frames
    if frames is not None and not adapter.supports_video:
        raise RecipeError("inputs.video_frames", f"{model_type} takes images only; remove inputs.video_frames")
    try:
        geom = adapter.geometry(config, recipe.inputs.image_size, video_frames=frames)
    except ValueError as e:
        key = "inputs.video_frames" if frames is not None and "frame" in str(e) else "inputs.image_size"
        raise RecipeError(key, str(e)) from None
    schedule, reducers, question = _reduction(recipe, adapter, geom)
    recipe = _with_reducer_warnings(recipe, reducers)
    quant, include, ignore = _quant(recipe, adapter, geom)

    if targets is not None:
        bad = [t for t in targets if t not in EXPORT_TARGETS]
        if bad:
            raise RecipeError("--targets", f"unknown target '{bad[0]}'{suggest(bad[0], EXPORT_TARGETS)}")
    chosen = tuple(targets) if targets is not None else recipe.export.targets

    N = geom.n_image_tokens  # the prompt carries N placeholders whatever the reduction keeps
    max_pos = getattr(config.text_config, "max_position_embeddings", 4096)
    max_text = recipe.inputs.max_prompt_len
    t_max = N + max_text if max_text is not None else max_pos
    if t_max > max_pos:
        raise RecipeError(
            "inputs.max_prompt_len",
            f"{max_text} text tokens plus {N} image tokens exceed the model's {max_pos} positions; lower it",
        )
    tc = getattr(config, "text_config", config)
    window = getattr(tc, "sliding_window", None)
    if window and getattr(tc, "use_sliding_window", True) is not False and t_max > window:
        # The graphs attend over the whole prompt; beyond the window that would differ from the model.
        fix = f"set inputs.max_prompt_len to at most {window - N}" if window > N + 2 else "this model cannot compile"
        raise RecipeError(
            "inputs.max_prompt_len",
            f"prompts of up to {t_max} tokens exceed the decoder's sliding window of {window}; {fix}",
        )
    _check_weight_format(recipe, chosen)
    dtype = resolve_export_dtype(recipe, config)
    _check_dtype(recipe, dtype, chosen, "--targets" if targets is not None else "export.targets", schedule, reducers)
    atol, rtol = parity_tolerance(recipe, dtype)
    chosen = _check_tensorrt(recipe, chosen, "--targets" if targets is not None else "export.targets")
    _check_device_targets(device, device_key, chosen)
    if recipe.eval is not None:
        from tokcompile.eval.spec import check_plan

        check_plan(recipe.eval, chosen, recipe.export.weight_format, geom.media)
    if (bad_range := check_ranges(recipe.export.tensorrt, recipe.inputs.batch_size, (N + 2, t_max))) is not None:
        raise RecipeError(*bad_range)
    n_text = max_text if max_text is not None else DEFAULT_FLOPS_TEXT_TOKENS
    out_dir = Path(out) if out is not None else Path(recipe.save.save_path or Path("exported") / recipe.name)
    return Plan(
        recipe=recipe,
        model_type=model_type,
        adapter=adapter,
        config=config,
        geometry=geom,
        schedule=schedule,
        reducers=reducers,
        image_token_id=adapter.image_token_id(config, geom),
        quant=quant,
        quant_include=include,
        quant_ignore=ignore,
        targets=chosen,
        text_len_range=(N + 2, t_max),
        out_dir=out_dir,
        flops=flops.prefill_flops(geom, schedule, n_text, reducers),
        dtype=dtype,
        atol=atol,
        rtol=rtol,
        question=question,
        device=device,
    )


def _media_line(g: Geometry) -> str:
    size = f"{g.image_size[0]}x{g.image_size[1]}"
    return f"video of {g.vision_images} frames at {size}" if g.media == "video" else f"image {size}"


def format_plan(plan: Plan) -> str:
    """The human summary printed by `compile.py --plan`."""
    g = plan.geometry
    lines = [
        f"recipe      {plan.recipe.name}  ({plan.recipe.source})",
        f"model       {plan.recipe.model.path}  [{plan.model_type}]  {g.n_layers} decoder layers, d={g.hidden_size}, "
        f"heads {g.n_heads}/{g.n_kv_heads} kv",
        f"inputs      batch {plan.batch_size}, {_media_line(g)} -> {g.n_image_tokens} image "
        f"tokens, prompt length {plan.text_len_range[0]}..{plan.text_len_range[1]} (dynamic)",
    ]
    if plan.quant is not None:
        w = plan.quant.weight
        gran = f"group {w.group_size}" if w.group_size else "per channel"
        method = plan.recipe.quant.method
        kind = ("sym full" if w.sym_grid == "full" else "sym") if w.symmetric else "asym"
        lines.append(f"quant       {method} w{w.bit} {kind} {gran}; skip {', '.join(plan.quant_ignore)}")
        if method == "GPTQ":
            c, sp = plan.recipe.quant.calib, plan.quant
            through = " through the reduction" if c.with_reduction else ""
            lines.append(
                f"            calibration {c.name} x{c.n_samples}{through}; "
                f"blocksize {sp.blocksize}, percdamp {sp.percdamp}, actorder {sp.actorder}, "
                f"static_groups {sp.static_groups}, true_sequential {sp.true_sequential}"
            )
    else:
        lines.append("quant       none")
    if plan.schedule:
        for s in plan.schedule:
            what = "vision-tower tokens" if s.site.in_vision_tower else "image tokens"
            how = {Output.KEPT: "->", Output.ASSIGN: "merged to"}.get(s.output, "clustered into at most")
            pos = " (positions renumbered)" if s.positions is Positions.RENUMBER else ""
            slots = "; unused slots masked" if s.output is Output.CLUSTER else ""
            scores = (f"; reports {s.scored} decision score vector{'s' if s.scored > 1 else ''}" if s.scored
                      else "; selects nothing from the data" if s.scored == 0 else "")
            lines.append(f"reduction   {s.method} at {s.site.value} {s.layer}: {s.n_in} {how} {s.n_out} {what}"
                         f"{pos}{slots}{scores}")
    else:
        lines.append("reduction   none")
    per_layer = plan.image_tokens_per_layer()
    to_decoder = decoder_image_tokens_in(g.n_image_tokens, plan.schedule, g.vision_tokens)
    if to_decoder != g.n_image_tokens:
        lines.append(f"vision      {to_decoder} of {g.n_image_tokens} image tokens reach the decoder")
    lines.append("schedule    image tokens entering each decoder layer:")
    lines.append("            " + " ".join(f"L{i}:{n}" for i, n in enumerate(per_layer)))
    kept = per_layer[-1] if per_layer else g.n_image_tokens
    if plan.schedule and plan.schedule[-1].site is Site.DECODER_MID:  # it shortens the last layer's MLP input
        kept = plan.schedule[-1].n_out
    if any(s.output is Output.CLUSTER for s in plan.schedule):  # slots: the most the data can leave
        lines.append(f"kept        at most {kept} of {g.n_image_tokens} image tokens after the last step (slots: "
                     "the count depends on the image)")
    else:
        lines.append(f"kept        {kept} of {g.n_image_tokens} image tokens after the last step")
    lines.append(f"dtype       {plan.dtype} graphs (weights load and quantize in float32); parity atol {plan.atol:g}, "
                 f"rtol {plan.rtol:g}")
    lines.append(f"targets     {', '.join(plan.targets)}  ->  {plan.out_dir}")
    if plan.device != "cpu":
        lines.append(f"device      {plan.device}: weights quantized, graphs traced, compiled and checked there "
                     "(they load on the host)")
    if (ev := plan.recipe.eval) is not None:
        n = f"first {ev.num_samples}" if ev.num_samples else "every sample"
        via = f"; exported answers through {ev.backend}" if "exported" in ev.positions else ""
        lines.append(f"eval        {', '.join(ev.positions)} on {', '.join(ev.datasets)} ({n}, batches of "
                     f"{ev.batch_size}){via}")
    lines.append("")
    lines.append(flops.format_table(plan.flops))
    return "\n".join(lines)
