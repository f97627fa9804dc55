"""The GPU check in one command: a random model with LLaVA-1.5-7B's exact geometry (32 layers, d=4096, CLIP-L
at 336 px, 576 image tokens) in bf16 on CUDA, with static FastV (K=2, R=0.75) from the recipe compiler.

    python benchmarks/gpu.py                      # on a CUDA machine: --size llava7b --device cuda --dtype bfloat16
    python benchmarks/gpu.py --size tiny --device cpu --dtype float32 --repeats 1 --new-tokens 4   # smoke run
    python benchmarks/gpu.py --exports            # also: the demo compiled with --device cuda, every backend there

It measures, in one run, side by side:
- parity on the device: tokcompile's static FastV graphs (the eager modules the compile traces) against the
  independent FastV reference (`tokcompile.reference.fastv_reference`) on the same device and dtype: kept image
  tokens and the next-token logits;
- time to first token (vision + prefill, median of --repeats) for (a) the HF model uncompressed, eager PyTorch
  with SDPA, (b) a LightCompress-style FastV (hooks; layer K-1 run once more with eager attention to read its
  attention, `benchmarks/hooked_fastv.py`), (c) tokcompile's static FastV graphs;
- decode tokens per second over --new-tokens greedy tokens for (a) and (c), each with its own KV cache;
- peak device memory of each (CUDA only).
It prints a table and, where $OUT is set, writes gpu.json there. The weights are random (the geometry and the
token counts are LLaVA-1.5-7B's; the tokenizer is the tiny byte-level one, so the vocabulary is small).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

QUESTION = "What is shown in this picture? Describe it in detail."


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def build_model(size: str, device: str, dtype: torch.dtype, seed: int) -> Any:
    """The random LLaVA of `size`, created directly on the device in the dtype (no fp32 copy on the host)."""
    from tokcompile.models.tiny import llava

    config = llava.build_config("llava", size)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = llava.model_class("llava")(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def make_plan(size: str, pruning_loc: int, rate: float, dtype: str) -> Any:
    from tokcompile.plan import resolve
    from tokcompile.recipe import load_recipe_dict

    recipe = load_recipe_dict({
        "base": {"seed": 0},
        "model": {"path": f"tiny-random:llava@{size}"},
        "inputs": {"batch_size": 1, "max_prompt_len": 1024},
        "sparse": {"special": {"method": "FastV", "pruning_loc": pruning_loc, "rate": rate}},
        "export": {"targets": ["eager"], "dtype": dtype},
    }, "gpu_check")
    return resolve(recipe)


def make_batch(plan: Any, size: str, device: str, dtype: torch.dtype) -> dict[str, Any]:
    import numpy as np

    from tokcompile.models.tiny import build_processor
    from tokcompile.parity import process, random_images

    images = random_images(np.random.default_rng(0), 1, plan.geometry.image_size)
    batch = process(build_processor("llava", size), plan.adapter, plan.geometry, images, [QUESTION])
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in batch.items()}


def median_seconds(fn: Any, device: str, repeats: int) -> tuple[float, Any]:
    """Median wall time of `fn()` over `repeats` runs after one warm-up, and the last result."""
    with torch.no_grad():
        out = fn()
        sync(device)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = fn()
            sync(device)
            times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def hf_decode(model: Any, batch: dict, n: int, device: str) -> float:
    """(a): prefill, then n-1 greedy steps with HF's own cache; returns the seconds spent in the steps."""
    out = model(**batch, use_cache=True, logits_to_keep=1)
    past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n - 1):
        out = model(input_ids=tok, past_key_values=past, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    sync(device)
    return time.perf_counter() - t0


def timed_steps(graph: Any, device: str, spent: list[float]) -> Any:
    """`graph` with the wall time of each call (device synchronised) appended to `spent`."""
    def run(feed: dict) -> dict:
        sync(device)
        t0 = time.perf_counter()
        out = graph(feed)
        sync(device)
        spent.append(time.perf_counter() - t0)
        return out

    return run


def export_check(device: str, out_dir: Path, only: tuple[str, ...] | None = None) -> dict:
    """The demo recipe compiled with `--device` (its graphs traced, compiled and checked there), then its answers
    through each backend on the device (or those in `only`) against the exported programs' answers on the host."""
    import numpy as np
    from PIL import Image

    from tokcompile.pipeline import compile_recipe
    from tokcompile.runtime import load

    backends = {"eager": "eager", "aoti": "aoti", "torch_compile": None}  # backend -> the target it needs
    try:
        import onnxruntime as ort

        if not device.startswith("cuda") or "CUDAExecutionProvider" in ort.get_available_providers():
            backends["onnxruntime"] = "onnx"
    except ImportError:
        pass
    backends = {b: t for b, t in backends.items() if only is None or b in only}
    targets = tuple(t for t in backends.values() if t)
    root = Path(__file__).resolve().parents[1]
    t0 = time.perf_counter()
    compile_recipe(root / "recipes" / "demo.yml", out=out_dir, targets=targets, force=True, device=device,
                   log=lambda line: print(f"  {line}", flush=True))
    compiled = time.perf_counter() - t0
    rng = np.random.default_rng(3)
    images = [Image.fromarray((rng.random((64, 80, 3)) * 255).astype("uint8")) for _ in range(2)]
    prompts = ["What is in this image?", "Describe it in detail."]
    ref = load(out_dir, "eager", trust_export=True).generate(images, prompts, max_new_tokens=8, stop_at_eos=False)
    rows = {}
    for backend in backends:
        answer = load(out_dir, backend, trust_export=True, device=device).generate(images, prompts, max_new_tokens=8,
                                                                                 stop_at_eos=False)
        rows[backend] = answer.token_ids == ref.token_ids and answer.kept == ref.kept
        print(f"  {backend} on {device}: {'the host eager answers, token for token' if rows[backend] else 'DIFFERS'}",
              flush=True)
    return {"compile_s": compiled, "targets": list(targets), "same_answers": rows}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="llava7b", help="llava7b (LLaVA-1.5-7B's geometry), medium or tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--pruning-loc", type=int, default=2)
    ap.add_argument("--rate", type=float, default=0.75)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--exports", action="store_true",
                    help="also compile the demo recipe with --device and answer through each backend there")
    args = ap.parse_args(argv)

    from hooked_fastv import HookedFastV

    from tokcompile.generation import GenerationConfig, generate, run_prompt
    from tokcompile.graphs import build_modules, eager_runners
    from tokcompile.near_ties import NEAR_TIE_MARGINS, near_tie
    from tokcompile.reference import fastv_reference

    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    plan = make_plan(args.size, args.pruning_loc, args.rate, args.dtype)
    model = build_model(args.size, args.device, dtype, seed=0)
    batch = make_batch(plan, args.size, args.device, dtype)
    g = plan.geometry
    keep = plan.schedule[0].n_out
    print(f"model: random LLaVA @{args.size} ({g.n_layers} layers, d={g.hidden_size}, {g.n_image_tokens} image "
          f"tokens), {args.dtype} on {args.device}; FastV K={args.pruning_loc} keeps {keep}; built in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    reduced, decode = build_modules(plan, model)
    vision, prefill, decode_graph = eager_runners(reduced, decode)

    with torch.no_grad():  # parity on the device against the independent reference
        ours = reduced.run(batch)
        scores: list = []
        ref_logits, ref_kept = fastv_reference(model, plan.adapter, batch, image_token_id=plan.image_token_id,
                                               pruning_loc=args.pruning_loc, keep=keep, scores_out=scores)
        kept_equal = bool(torch.equal(ours["kept_0"][0].cpu(), ref_kept.cpu()))
        tie = None
        if not kept_equal:  # half precision: a selection that differs only at the boundary is a near-tie
            tie = near_tie(scores[0].cpu(), ours["kept_0"][0].cpu(), ref_kept.cpu(), NEAR_TIE_MARGINS[args.dtype])
            if tie is not None:  # compare the logits with the reference replaying our selection
                ref_logits, _ = fastv_reference(model, plan.adapter, batch, image_token_id=plan.image_token_id,
                                                pruning_loc=args.pruning_loc, keep=keep, forced=ours["kept_0"][0])
    diff = float((ours["logits"][0].float() - ref_logits.float()).abs().max())
    top1 = bool(int(ours["logits"][0].argmax()) == int(ref_logits.argmax()))
    kept_text = "identical" if kept_equal else (f"a near-tie ({len(tie['indices'])} boundary tokens within "
                                                f"{tie['margin']:g} of the k-th score)" if tie else "DIFFERENT")
    print(f"parity on {args.device}: kept tokens {kept_text}, max |Δlogit| {diff:.3g}, same top-1: {top1}",
          flush=True)

    rows = {}
    hooks = None
    for name in ("hf", "lightcompress_fastv", "tokcompile_static"):
        peak_reset(args.device)
        if name == "hf":
            ttft, _ = median_seconds(lambda: model(**batch, use_cache=True, logits_to_keep=1), args.device,
                                     args.repeats)
        elif name == "lightcompress_fastv":
            hooks = HookedFastV(model, plan.image_token_id, args.pruning_loc, args.rate)
            ttft, _ = median_seconds(lambda: model(**batch, use_cache=True, logits_to_keep=1), args.device,
                                     args.repeats)
            hooks.remove()
        else:
            ttft, _ = median_seconds(lambda: run_prompt(vision, prefill, reduced.layout, batch), args.device,
                                     args.repeats)
        rows[name] = {"ttft_s": ttft, "peak_gb": peak_gb(args.device)}
        print(f"  {name:20s} time to first token {ttft * 1e3:9.2f} ms", flush=True)

    n = args.new_tokens
    cfg = GenerationConfig(max_new_tokens=n)
    with torch.no_grad():
        hf_decode(model, batch, min(n, 2), args.device)  # warm-up
        hf_steps = hf_decode(model, batch, n, args.device)
        spent: list[float] = []
        generate(vision, prefill, decode_graph, batch, layout=reduced.layout, cfg=GenerationConfig(max_new_tokens=2))
        generate(vision, prefill, timed_steps(decode_graph, args.device, spent), batch, layout=reduced.layout,
                 cfg=cfg)
    for name, steps in (("hf", hf_steps), ("tokcompile_static", sum(spent[-(n - 1):]) if n > 1 else 0.0)):
        rows[name]["decode_tok_s"] = (n - 1) / steps if n > 1 and steps > 0 else None

    base = rows["hf"]["ttft_s"]
    print(f"\n| variant | TTFT (ms) | vs HF | decode tok/s ({n - 1} steps) | peak GB (prefill) |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        dec = f"{r['decode_tok_s']:.1f}" if r.get("decode_tok_s") else "-"
        mem = f"{r['peak_gb']:.2f}" if r["peak_gb"] is not None else "-"
        print(f"| {name} | {r['ttft_s'] * 1e3:.2f} | {base / r['ttft_s']:.2f}x | {dec} | {mem} |")
    result = {"size": args.size, "device": args.device, "dtype": args.dtype, "pruning_loc": args.pruning_loc,
              "rate": args.rate, "keep": keep, "new_tokens": n, "repeats": args.repeats,
              "parity": {"kept_identical": kept_equal, "near_tie": tie, "max_abs_logit_diff": diff,
                         "same_top1": top1},
              "variants": rows, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None}
    if args.exports:
        import tempfile

        print(f"\nexports compiled and run on {args.device}:", flush=True)
        with tempfile.TemporaryDirectory() as scratch:
            result["exports"] = export_check(args.device, Path(scratch) / "demo")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
