"""The layer-by-layer GPTQ driver for a VLM's decoder (the maths is in `gptq.py`).

Every calibration batch first runs through the vision tower, the projector and the splice. Then, one decoder
layer at a time: each Linear's inputs on every calibration token fold into its Hessian, the layer's Linears
are quantized (q/k/v, then o, then gate/up, then down with `true_sequential`, re-running the layer between
groups so later groups see the already-quantized earlier ones), and the quantized layer's outputs become the
next layer's inputs. Only one layer's activations for the calibration set are alive at a time.

The driver walks `Prefill`'s own loop (`steps_before`, `layer_forward`), layer-major over the calibration
batches. With `with_reduction`, the schedule's steps (vision-side ones included) run exactly as in the
deployed graphs, so the Hessians of layers after a step see the tokens the deployed graph sees; without it,
calibration sees the unreduced model. Padding tokens never enter a Hessian.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from tokcompile.models.reduced import KVCache, ReducedVLM
from tokcompile.quant.activations import ActivationStore
from tokcompile.quant.base import replace_weight_
from tokcompile.quant.gptq import GPTQConfig, add_to_hessian, gptq_quantize
from tokcompile.reduce.state import TokenState


@dataclass(frozen=True)
class QuantGrid:
    """A quantized weight's integers: codes (O, I) int8, scale and zero (O, G), in original column order."""

    codes: Tensor
    scale: Tensor
    zero: Tensor


def peak_rss_mb() -> int:
    """The process's peak resident memory so far, in MB: VmHWM of this program's memory (Linux), else
    `ru_maxrss`, which also counts what a parent held when it forked this process."""
    import resource
    import sys

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak / (1 << 20) if sys.platform == "darwin" else peak / 1024)


# Sub-layer order for true_sequential, by the Linear's last name component.
SEQUENTIAL_GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def _groups(names: list[str], true_sequential: bool) -> list[list[str]]:
    if not true_sequential:
        return [names]
    out, seen = [], set()
    for group in SEQUENTIAL_GROUPS:
        members = [n for n in names if n.rsplit(".", 1)[-1] in group]
        if members:
            out.append(members)
            seen.update(members)
    rest = [n for n in names if n not in seen]  # Linears of other names go last, together
    return out + ([rest] if rest else [])


@torch.no_grad()
def gptq_sequential(
    reduced: ReducedVLM,
    batches: list[dict[str, Tensor]],
    config: GPTQConfig,
    linears: dict[str, nn.Linear],
    *,
    with_reduction: bool,
    log: Callable[[str], None] = print,
    results: dict[str, Any] | None = None,
    before_layer: Callable[[int], None] | None = None,
    after_layer: Callable[[int], None] | None = None,
    max_layers: int | None = None,
    store: ActivationStore | None = None,
) -> dict[str, Any]:
    """Quantize `linears` (decoder Linears, by qualified name) in place. Returns a per-layer report; each
    Linear's integer codes and grid go to `results[fqn]` (a `QuantGrid`) when a dict is given.
    `before_layer(i)` runs before layer i's steps and calibration (the calibration inputs are ready by the first
    call), `after_layer(i)` once layer i is quantized and its outputs computed: streaming loads and writes
    layers there. `max_layers`: stop after that many layers (the rest keep their weights). `store` keeps the
    calibration activations between layers (default: in memory, computed where they are); it may spill them to
    disk and compute on another device (`activations.py`): the arithmetic is the same."""
    if not with_reduction:
        reduced = reduced.without_reduction()
    a, model, prefill = reduced.adapter, reduced.model, reduced.prefill
    layers = a.decoder_layers(model)
    names_of = {id(m): n for n, m in model.named_modules()}
    store = store if store is not None else ActivationStore()
    n_batches = len(batches)
    for b, batch in enumerate(batches):
        state = reduced.initial_state(store.to_compute(batch))
        store.put("state", b, state)
        store.put("embedded", b, state)  # what entered layer 0, for steps that read the input embeddings
        store.put("prev", b, None)  # (the tokens that entered the previous layer, its keys)
    report: dict[str, Any] = {"layers": [], "n_batches": n_batches}
    wq = config.weight
    t_all = time.perf_counter()
    for i, layer in enumerate(layers[:max_layers]):
        t0 = time.perf_counter()
        if before_layer is not None:
            before_layer(i)
        for b in range(n_batches):
            store.put("state", b, prefill.steps_before(i, store.get("state", b), store.get("prev", b), {}, None,
                                                       store.get("embedded", b)))

        def run(b: int, state: TokenState, cache: KVCache | None = None) -> TokenState:
            return prefill.layer_forward(i, state, cache if cache is not None else KVCache(), store.get("prev", b),
                                         {}, None, store.get("embedded", b))

        for b in range(n_batches):  # this layer before quantization
            store.put("reference", b, run(b, store.get("state", b)))
        prefix = names_of[id(layer)] + "."
        mine = [n for n in linears if n.startswith(prefix)]
        for group in _groups(mine, config.true_sequential):
            hessians: dict[str, list] = {n: [None, 0] for n in group}
            valid: list[Tensor] = []

            def hook(name: str) -> Callable:
                def fn(module: nn.Module, args: tuple) -> None:
                    x = args[0][valid[0]]  # (n_valid, in): padding never enters a Hessian
                    hessians[name][0], hessians[name][1] = add_to_hessian(hessians[name][0], hessians[name][1], x)

                return fn

            handles = [linears[n].register_forward_pre_hook(hook(n)) for n in group]
            try:
                for b in range(n_batches):
                    state = store.get("state", b)
                    valid[:] = [state.valid]
                    run(b, state)
            finally:
                for h in handles:
                    h.remove()
            for n in group:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    res = gptq_quantize(
                        linears[n].weight, hessians.pop(n)[0], bit=wq.bit, overwrite_h=True, symmetric=wq.symmetric,
                        group_size=wq.group_size, blocksize=config.blocksize, percdamp=config.percdamp,
                        actorder=config.actorder, static_groups=config.static_groups, sym_grid=wq.sym_grid,
                    )
                for w in caught:  # raised damping after a failed Cholesky: say so on the progress stream
                    log(f"warning: {n}: {w.message}")
                if res.retries:
                    report.setdefault("damping_raised", {})[n] = res.retries
                replace_weight_(linears[n], res.weight)
                if results is not None:  # compact: int8 codes and the grid, not the dequantized copy
                    results[n] = QuantGrid(res.codes.to(torch.int8), res.scale, res.zero)
        # The quantized layer's outputs become the next layer's inputs; a step inside the layer may select other
        # tokens once the layer is quantized, so the error compares equal shapes only.
        num = den = 0.0
        tokens = 0
        for b in range(n_batches):
            state, cache = store.get("state", b), KVCache()
            out, ref = run(b, state, cache), store.get("reference", b)
            if out.hidden.shape == ref.hidden.shape:
                v = out.valid
                num += float(((out.hidden - ref.hidden)[v] ** 2).sum())
                den += float((ref.hidden[v] ** 2).sum())
            tokens += int(state.valid.sum())
            store.put("next", b, out)
            store.put("next_prev", b, (state, cache.keys[i]))
        store.drop("reference", n_batches)  # the unquantized outputs are not needed any more
        store.rename("next", "state", n_batches)
        store.rename("next_prev", "prev", n_batches)
        err = (num / den) ** 0.5 if den > 0 else 0.0
        seconds = time.perf_counter() - t0
        peak = peak_rss_mb()
        report["layers"].append({"layer": i, "name": prefix[:-1], "linears": len(mine), "rel_output_error": err,
                                 "seconds": round(seconds, 3), "tokens": tokens, "peak_rss_mb": peak})
        log(f"  gptq {prefix[:-1]}: {len(mine)} Linear, output error {err:.4f}, {seconds:.1f}s, peak memory "
            f"{peak} MB")
        if after_layer is not None:
            after_layer(i)
    store.close()
    report["seconds"] = round(time.perf_counter() - t_all, 2)
    return report
