"""GPTQ over a checkpoint larger than memory: the decoder is loaded, quantized and written one layer at a time.

The model is built from its config with every parameter on the meta device (buffers, such as RoPE's
frequencies, stay real). The vision tower, projector, embeddings and final norm are loaded from the
checkpoint's safetensors shards; the calibration batches run through them into the sequence entering decoder
layer 0, and they are dropped again. Then `gptq_sequential` walks the decoder as it does in memory, and around
each layer: its tensors are read from the shards in float32, quantized on the calibration activations (which
stay in host memory), written to the output as one shard, and dropped before the next layer loads (after it,
where a reduction step before layer i+1 scores with layer i). Every tensor that is not a quantized weight is
copied to the output in its own dtype; quantized weights are written in float32, as `save.save_fake` writes
them in memory, so the output holds the exact grid values.

Peak memory is about one decoder layer in float32 (two around a reduction step), one Linear's Hessian and its
GPTQ working matrices, the calibration activations, and, before the first layer, the vision tower and the
embeddings; the whole model is never resident.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tokcompile.errors import RecipeError
from tokcompile.quant.activations import ActivationStore
from tokcompile.quant.sequential import gptq_sequential, peak_rss_mb
from tokcompile.quant.shards import CheckpointShards, ShardWriter, names_in_model
from tokcompile.question import for_plan

COPY_CHUNK_BYTES = 512 << 20  # tensors copied unchanged go out in files of about this size


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside keep their parameters on the meta device (no memory); buffers stay real."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def skeleton(plan: Any) -> nn.Module:
    """The recipe's model class built from its config, parameters on the meta device, in eval mode."""
    import transformers

    cls = getattr(transformers, plan.adapter.model_class_name)
    with parameters_on_meta():
        model = cls._from_config(plan.config, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval()


class LayerStore:
    """Loads parameters from the shards into the meta skeleton and drops them again."""

    def __init__(self, model: nn.Module, shards: CheckpointShards):
        self.model, self.shards = model, shards
        self.key_of = {name: key for key, name in names_in_model(model, shards.keys).items()}

    def params_under(self, prefix: str) -> list[str]:
        return [n for n, _ in self.model.named_parameters(remove_duplicate=False) if n.startswith(prefix)]

    def check(self, names: list[str]) -> None:
        missing = [n for n in names if n not in self.key_of]
        if missing:
            raise RecipeError("model.path", f"the checkpoint has no tensor for {missing[0]} (and {len(missing) - 1} "
                                            "more); is it this model's checkpoint?")

    def load(self, names: list[str], device: str | None = None) -> None:
        self.check(names)
        tensors = self.shards.read([self.key_of[n] for n in names], torch.float32)
        for n in names:
            t = tensors[self.key_of[n]]
            self._set(n, nn.Parameter(t.to(device) if device is not None else t, requires_grad=False))

    def drop(self, names: list[str]) -> None:
        for n in names:
            p = self.model.get_parameter(n)
            self._set(n, nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False))

    def _set(self, name: str, value: nn.Parameter) -> None:
        owner, _, leaf = name.rpartition(".")
        self.model.get_submodule(owner)._parameters[leaf] = value


def buffers_to(model: nn.Module, device: str) -> None:
    """Move the skeleton's real buffers (RoPE tables and the like; parameters stay on the meta device)."""
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.device.type != "meta":
                module._buffers[name] = buf.to(device)


def available_mb() -> int | None:
    """MemAvailable from /proc/meminfo, in MB (None where it cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def activation_mb(batches: list[dict], hidden_size: int) -> int:
    """What the driver keeps per layer for the calibration set, in MB: fp32 tokens entering the layer, those
    that entered layer 0, the layer's unquantized and quantized outputs, and the previous layer's tokens and
    keys (about five copies of every calibration token's hidden state)."""
    tokens = sum(int(b["input_ids"].numel()) for b in batches)
    return 5 * tokens * hidden_size * 4 >> 20


def stream_gptq(plan: Any, out: Path, log: Callable[[str], None] = print, max_layers: int | None = None,
                device: str | None = None, spill_dir: Path | None = None) -> dict:
    """Quantize the recipe's checkpoint layer by layer into the HF checkpoint directory `out` (which exists and
    is empty). `max_layers`: quantize only the first layers and copy the rest unchanged (a measurement run).
    `device` ("cuda"): the vision tower, the projector and the current decoder layer compute there, the
    activations and everything else stay on the host. `spill_dir`: keep the calibration activations between
    layers in files there instead of memory; without it they spill (into `out`, removed at the end) when they
    would take more than half of the memory available.

    Returns GPTQ's per-layer report with the streaming figures."""
    from tokcompile.models import ReducedVLM
    from tokcompile.models.loading import check_weights_present, load_processor
    from tokcompile.quant import select_linears
    from tokcompile.quant.calib import calibration_batches

    recipe, adapter = plan.recipe, plan.adapter
    fixed_mmap_threshold()
    t_start = time.perf_counter()
    rss_start = current_rss_mb()
    shards = CheckpointShards(check_weights_present(recipe.model.path))
    model = skeleton(plan)
    if device is not None:
        buffers_to(model, device)
    store = LayerStore(model, shards)
    layers = adapter.decoder_layers(model)
    names_of = {id(m): n for n, m in model.named_modules()}
    prefixes = [names_of[id(layer)] + "." for layer in layers]
    in_layers = [store.params_under(p) for p in prefixes]
    decoder_params = {n for names in in_layers for n in names}
    norm_params = [names_of[id(adapter.final_norm(model))] + "." + n for n, _ in adapter.final_norm(model)
                   .named_parameters()]
    head = {names_of[id(adapter.lm_head(model))] + ".weight"}
    front = [n for n, _ in model.named_parameters() if n not in decoder_params and n not in head]
    store.check(front + sorted(decoder_params))

    writer = ShardWriter(out)
    quantized_keys: set[str] = set()
    layer_keys = [{store.key_of[n] for n in names} for names in in_layers]
    in_any_layer = set().union(*layer_keys)
    _copy(shards, [k for k in shards.keys if k not in in_any_layer], writer)  # the rest of the model, unchanged
    store.load(front, device)  # vision tower, projector, embeddings, final norm
    log(f"  streaming {len(layers)} decoder layers from {len(set(shards.file_of.values()))} shard(s); vision tower, "
        f"projector and embeddings loaded, peak memory {peak_rss_mb()} MB")

    processor = load_processor(recipe.model.path, recipe.model.trust_remote_code)
    calib = recipe.quant.calib
    batches = calibration_batches(calib, processor, adapter, plan.geometry, recipe.base.seed,
                                  batch_size=calib.bs if calib.bs > 0 else calib.n_samples,
                                  question=for_plan(plan))
    n_quant = len(layers) if max_layers is None else min(max_layers, len(layers))
    linears = {n: m for n, m in select_linears(model, plan.quant_include, plan.quant_ignore).items()
               if any(n.startswith(p) for p in prefixes[:n_quant])}
    reduced = ReducedVLM(model, adapter, plan.geometry, plan.schedule, plan.reducers, plan.image_token_id)
    if device is not None:
        reduced.vision.step_modules.to(device)  # weights a reducer brings (CLIP's text tower)
    timing: list[dict] = []
    # A reduction step before (or inside) layer i may score with layer i-1: keep that layer until layer i is done.
    steps_at = {s.layer for s in plan.schedule if not s.site.in_vision_graph} if calib.with_reduction else set()

    def before(i: int) -> None:
        if i == 0:  # the calibration inputs are ready: only the final norm stays (DART-style steps read it)
            store.drop([n for n in front if n not in norm_params])
        elif i not in steps_at:
            store.drop(in_layers[i - 1])
        t = time.perf_counter()
        store.load(in_layers[i], device)
        timing.append({"layer": i, "read_s": round(time.perf_counter() - t, 3)})

    def after(i: int) -> None:
        t = time.perf_counter()
        weights = {n + ".weight" for n, m in linears.items() if n.startswith(prefixes[i])}
        tensors = {}
        for n in in_layers[i]:
            key = store.key_of[n]
            value = model.get_parameter(n).detach().cpu()
            tensors[key] = value if n in weights else value.to(shards.dtype_of[key])
            if n in weights:
                quantized_keys.add(key)
        writer.write(tensors)
        if i > 0 and i in steps_at:
            store.drop(in_layers[i - 1])
        timing[-1]["write_s"] = round(time.perf_counter() - t, 3)
        if i == n_quant - 1:
            store.drop(in_layers[i])

    need, free = activation_mb(batches, plan.geometry.hidden_size), available_mb()
    if spill_dir is None and free is not None and need > free // 2:
        spill_dir = out / ".activations"  # inside the staging directory: removed with it whatever happens
        log(f"  calibration activations (about {need} MB) exceed half the available memory ({free} MB): "
            f"spilling them to {spill_dir}")
    activations = ActivationStore(device, spill_dir)
    log(f"  GPTQ on {calib.n_samples} {calib.name} calibration samples, {n_quant} of {len(layers)} layers"
        + (f", on {device}" if device is not None else "") + (", activations on disk" if spill_dir else ""))
    report = gptq_sequential(reduced, batches, plan.quant, linears, with_reduction=calib.with_reduction, log=log,
                             before_layer=before, after_layer=after, max_layers=n_quant, store=activations)
    for i in range(n_quant, len(layers)):  # layers left unquantized (a measurement run) are copied as they are
        _copy(shards, sorted(layer_keys[i]), writer)
    writer.finish()
    for name in ("config.json", "generation_config.json"):  # as the checkpoint has them (its dtype included)
        if (shards.directory / name).is_file():
            shutil.copyfile(shards.directory / name, out / name)
    processor.save_pretrained(str(out))
    return {**report, "streaming": {"layers_quantized": n_quant, "per_layer": timing, "peak_rss_mb": peak_rss_mb(),
                                    "device": device or "cpu", "activations_spilled": spill_dir is not None,
                                    "rss_at_start_mb": rss_start,
                                    "seconds": round(time.perf_counter() - t_start, 1),
                                    "quantized_tensors": len(quantized_keys)}}


def fixed_mmap_threshold(nbytes: int = 1 << 20) -> None:
    """Serve allocations of `nbytes` or more with their own mappings, returned to the system when freed (glibc).
    Its default threshold rises after each large free, after which freed layers stay in a fragmented heap and
    the process grows by tens of MB per layer; fixed, it stays flat. Elsewhere: nothing."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, nbytes)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def current_rss_mb() -> int:
    """The process's resident memory now, in MB (Linux; 0 where /proc is missing)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") >> 20


def _copy(shards: CheckpointShards, keys: list[str], writer: ShardWriter) -> None:
    """Copy `keys` unchanged, read one at a time, in files of about COPY_CHUNK_BYTES."""
    chunk: dict[str, torch.Tensor] = {}
    size = 0
    for k in keys:
        chunk.update(shards.read([k]))
        size += chunk[k].numel() * chunk[k].element_size()
        if size >= COPY_CHUNK_BYTES:
            writer.write(chunk)
            chunk, size = {}, 0
    writer.write(chunk)
