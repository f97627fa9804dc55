"""The deployed answer side by side: time to first token, 64 new tokens and memory, for one recipe.

    python benchmarks/answer.py                          # the medium random LLaVA (needs the machine alone)
    python benchmarks/answer.py --sizes tiny             # the tiny model, to check the script quickly
    python benchmarks/answer.py --variants lightcompress,onnx_int4 --workdir /tmp/answer

One compile of RTN w4 (group 128; 32 on the tiny model) + FastV K=2 R=0.75, exported to ONNX (fp32 and INT4
weights) and AOTInductor, then, each in its own worker process so that peak memory is its own:
  hf_full            (a) the HF LLaVA uncompressed, eager PyTorch, greedy with its KV cache
  lightcompress      (b) the same HF model with RTN fake-quantized fp32 weights and FastV by forward hooks that
                         re-run layer K-1 with eager attention (benchmarks/hooked_fastv.py), as LightCompress does
  onnx_int4          (c) our ONNX export with INT4 weights (MatMulNBits), onnxruntime pre-packing off
  onnx_int4_prepack  (c) the same with pre-packing on (a pre-packed weight copy per session)
  onnx_fp32          (d) our ONNX export, fp32 (fake-quantized) weights, pre-packing off
  onnx_fp32_prepack  (d) the same with pre-packing on
  aoti               (e) our AOTInductor export
Every variant answers the same processed prompt (image processing excluded): the first token from the prompt
(TTFT), then 63 decode steps. Warm-up run, then the median of --repeats. A separate untimed check runs our
eager reduced modules on the same fake-quantized weights as the token and kept-index reference.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from answer_report import report  # noqa: E402
from common import processed_batch, reset_peak, smaps_mb, status_mb, timed  # noqa: E402

QUESTION = "Describe this image in detail, please."
VARIANTS = {  # name -> (label, runtime backend, onnxruntime pre-packing)
    "hf_full": ("(a) HF eager, uncompressed", None, None),
    "lightcompress": ("(b) LightCompress-style eager", None, None),
    "onnx_int4": ("(c) ONNX INT4", "onnxruntime-int4", False),
    "onnx_int4_prepack": ("(c) ONNX INT4, prepack", "onnxruntime-int4", True),
    "onnx_fp32": ("(d) ONNX fp32", "onnxruntime", False),
    "onnx_fp32_prepack": ("(d) ONNX fp32, prepack", "onnxruntime", True),
    "aoti": ("(e) AOTInductor", "aoti", True),
}
GROUP_SIZE = {"tiny": 32, "medium": 128}  # tiny: d=128, FFN 256, so 128 would be one group per row in most layers


def recipe(size: str, pruning_loc: int, rate: float) -> dict:
    return {
        "base": {"seed": 42},
        "model": {"path": "tiny-random:llava" if size == "tiny" else f"tiny-random:llava@{size}"},
        "inputs": {"batch_size": 1, "max_prompt_len": 256},
        "quant": {"method": "RTN", "weight": {"bit": 4, "symmetric": True, "granularity": "per_group",
                                              "group_size": GROUP_SIZE.get(size, 128)}},
        "sparse": {"method": "TokenReduction",
                   "special": {"method": "FastV", "pruning_loc": pruning_loc, "rate": rate}},
        "export": {"targets": ["onnx", "aoti"], "weight_format": "int4"},
        "parity": {"samples": 1, "atol": 1e-3, "rtol": 1e-3},
    }


def pin_onnxruntime_threads(n: int) -> None:
    """Give every onnxruntime session `n` intra-op threads, as torch has (onnxruntime's own default is the
    number of physical cores): wraps the session options that tokcompile's ONNX loader applies."""
    from tokcompile.export import onnx as onnx_export

    base = onnx_export.session_options

    def with_threads(opts, prepack):
        opts.intra_op_num_threads = n
        return base(opts, prepack)

    onnx_export.session_options = with_threads


def export_processor(export_dir: Path, manifest: dict):
    """The processor the export saved (what `tokcompile.runtime.load` uses), without loading any graph."""
    from tokcompile.models import ADAPTERS

    adapter = ADAPTERS.get(manifest["plan"]["model_type"])()
    return adapter.load_processor(str(export_dir / manifest.get("processor", "processor")))


def hf_model(size: str, recipe_path: Path, quantize: bool):
    """The HF LLaVA (eval mode); with `quantize`, its Linear weights fake-quantized as the recipe says."""
    from tokcompile.models.tiny import build_model

    model = build_model("llava", seed=42, size=size).eval()
    if quantize:
        from tokcompile.pipeline import plan_recipe
        from tokcompile.quant import quantize_

        plan = plan_recipe(recipe_path)
        quantize_(model, plan.quant, include=plan.quant_include, ignore=plan.quant_ignore)
    return model


def attach_fastv(model, recipe_path: Path):
    """(b)'s FastV hooks with the recipe's pruning_loc and rate."""
    import yaml
    from hooked_fastv import HookedFastV

    special = yaml.safe_load(recipe_path.read_text())["sparse"]["special"]
    return HookedFastV(model, model.config.image_token_id, special["pruning_loc"], special["rate"])


def hf_runner(model, batch: dict, new_tokens: int, fastv=None, keep_logits: bool = False):
    """`run_once(n)`: one greedy answer of n tokens with the HF model's forward and DynamicCache, timed per stage."""
    import torch

    marks: dict[str, float] = {}
    model.model.vision_tower.register_forward_pre_hook(lambda *a: marks.__setitem__("v0", time.perf_counter()))
    model.model.multi_modal_projector.register_forward_hook(lambda *a: marks.__setitem__("v1", time.perf_counter()))

    @torch.no_grad()
    def run_once(n: int = new_tokens) -> dict:
        t0 = time.perf_counter()
        out = model(**batch, use_cache=True, logits_to_keep=1)  # as HF generate asks for the prompt
        ttft = time.perf_counter() - t0
        logits = [out.logits[0, -1]]
        past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        tokens, steps = [int(tok)], []
        for _ in range(n - 1):
            t = time.perf_counter()
            out = model(input_ids=tok, past_key_values=past, use_cache=True)
            steps.append(time.perf_counter() - t)
            past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(tok))
            if keep_logits:
                logits.append(out.logits[0, -1])
        return {"answer": time.perf_counter() - t0, "ttft": ttft, "vision": marks["v1"] - marks["v0"],
                "decode": steps, "tokens": tokens, "logits": logits,
                "kept": fastv.kept.tolist() if fastv is not None else None}

    return run_once


def graph_runner(vision, prefill, decode, layout, batch: dict, new_tokens: int, keep_logits: bool = False):
    """`run_once()`: one greedy answer through tokcompile's generation loop over the three graphs, timed per graph."""
    from tokcompile.generation import GenerationConfig, generate

    cfg = GenerationConfig(max_new_tokens=new_tokens)

    def run_once() -> dict:
        v, p, d, ends = [], [], [], []

        def prefill_end(feed):
            out = timed(prefill, p)(feed)
            ends.append(time.perf_counter())
            return out

        t0 = time.perf_counter()
        res = generate(timed(vision, v), prefill_end, timed(decode, d), batch, layout=layout, cfg=cfg,
                       keep_logits=keep_logits)
        answer = time.perf_counter() - t0
        kept = next(iter(res.kept.values()), None)
        return {"answer": answer, "ttft": ends[0] - t0, "vision": v[0], "graph_prefill": p[0], "decode": d,
                "tokens": res.tokens[0].tolist(), "kept": None if kept is None else kept[0].tolist(),
                "logits": [x[0] for x in res.step_logits]}

    return run_once


def check(export_dir: Path, recipe_path: Path, size: str, new_tokens: int) -> dict:
    """Untimed: our eager reduced modules against (b)'s hooks, on the same fake-quantized HF model."""
    from tokcompile.graphs import build_modules, eager_runners
    from tokcompile.pipeline import plan_recipe

    manifest = json.loads((export_dir / "manifest.json").read_text())
    batch = processed_batch(export_processor(export_dir, manifest), manifest, QUESTION)
    model = hf_model(size, recipe_path, quantize=True)
    reduced, decode = build_modules(plan_recipe(recipe_path), model)  # runs the HF layers: before the hooks
    ours = graph_runner(*eager_runners(reduced, decode), reduced.layout, batch, new_tokens, keep_logits=True)()
    hooked = hf_runner(model, batch, new_tokens, attach_fastv(model, recipe_path), keep_logits=True)()
    diffs = [float((x - y).abs().max()) for x, y in zip(hooked["logits"], ours["logits"])]
    return {"tokens": ours["tokens"], "kept": ours["kept"], "lightcompress_tokens": hooked["tokens"],
            "lightcompress_kept": hooked["kept"], "first_logit_diff": diffs[0], "logit_diff": max(diffs)}


def worker(variant: str, export_dir: Path, recipe_path: Path, size: str, new_tokens: int, repeats: int,
           threads: int) -> dict:
    import onnxruntime  # noqa: F401  (every variant imports the same libraries, so baselines match)
    import torch
    import transformers  # noqa: F401

    import tokcompile.pipeline  # noqa: F401
    import tokcompile.quant  # noqa: F401
    import tokcompile.runtime  # noqa: F401

    torch.set_num_threads(threads)
    pin_onnxruntime_threads(threads)
    if variant == "check":
        return check(export_dir, recipe_path, size, new_tokens)
    baseline, base_smaps = status_mb("VmRSS"), smaps_mb()
    reset_peak()
    manifest = json.loads((export_dir / "manifest.json").read_text())
    _, backend, prepack = VARIANTS[variant]
    fastv = None
    if backend is None:
        batch = processed_batch(export_processor(export_dir, manifest), manifest, QUESTION)
        model = hf_model(size, recipe_path, quantize=variant == "lightcompress")
        if variant == "lightcompress":
            fastv = attach_fastv(model, recipe_path)
            reset_peak()  # a deployment loads fake-quantized weights ready: quantizing them is not part of it
        run_once = hf_runner(model, batch, new_tokens, fastv)
    else:
        from tokcompile.runtime import load

        gen = load(export_dir, backend, trust_export=True, prepack=prepack)  # compiled by this benchmark
        batch = processed_batch(gen.processor, manifest, QUESTION)
        run_once = graph_runner(*gen.graphs, gen.layout, batch, new_tokens)

    run_once()  # warm-up
    runs = [run_once() for _ in range(repeats)]
    peak, after = status_mb("VmHWM"), smaps_mb()

    def med(key):
        return statistics.median(r[key] for r in runs)

    for r in runs:
        r["decode_s"] = sum(r["decode"])
        r["decode_ms_tok"] = 1e3 * r["decode_s"] / max(len(r["decode"]), 1)
        r["other_s"] = r["answer"] - r["ttft"] - r["decode_s"]
    res = {"variant": variant, "answer_s": med("answer"), "ttft_s": med("ttft"), "vision_s": med("vision"),
           "decode_s": med("decode_s"), "decode_ms_tok": med("decode_ms_tok"), "other_s": med("other_s"),
           "decode_tok_s": statistics.median(len(r["decode"]) / r["decode_s"] for r in runs),
           "peak_over_baseline_mb": peak - baseline,
           **{f"{k}_over_baseline_mb": v - base_smaps[k] for k, v in after.items()},
           "tokens": runs[-1]["tokens"], "kept": runs[-1]["kept"], "prompt_len": int(batch["input_ids"].shape[1]),
           "torch_threads": torch.get_num_threads(), "ort_threads": threads}
    if backend is not None:
        res["graph_prefill_s"] = med("graph_prefill")
    if fastv is not None:  # the layer K-1 re-run: its own time, and prefill with and without it, alternated
        res["rerun_s"] = statistics.median(fastv.rerun_times[-len(runs):])
        pairs = {True: [], False: []}
        for _ in range(repeats + 1):
            for rerun in (True, False):
                fastv.rerun = rerun  # False: the previous prefill's scores are reused
                pairs[rerun].append(run_once(1)["ttft"])
        res["ttft_rerun_s"], res["ttft_no_rerun_s"] = (statistics.median(pairs[k]) for k in (True, False))
    return res


def compile_export(work: Path, size: str, args: argparse.Namespace) -> tuple[Path, Path]:
    """Compile the recipe into work/<size> unless the same recipe is compiled there already."""
    import yaml

    from tokcompile.pipeline import compile_recipe

    out, recipe_path = work / size, work / f"{size}.yml"
    text = yaml.safe_dump(recipe(size, args.pruning_loc, args.rate))
    if recipe_path.exists() and recipe_path.read_text() == text and (out / "manifest.json").exists():
        print(f"{size}: reusing the export in {out}", flush=True)
        return out, recipe_path
    recipe_path.write_text(text)
    print(f"compiling {size} ...", flush=True)
    t = time.perf_counter()
    compile_recipe(recipe_path, out=out, force=True, log=lambda m: None)
    print(f"  compiled in {time.perf_counter() - t:.0f}s", flush=True)
    return out, recipe_path


def run_worker(variant: str, out: Path, recipe_path: Path, size: str, args: argparse.Namespace) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", variant, "--export", str(out), "--size", size, "--recipe",
           str(recipe_path), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
           "--threads", str(args.threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    if res.returncode != 0 or not line:
        print(f"  {variant} failed: {res.stderr.strip().splitlines()[-1:]}", flush=True)
        return None
    return json.loads(line[0][len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="medium", help="model sizes, comma-separated: tiny, medium")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"a subset of {', '.join(VARIANTS)}")
    p.add_argument("--pruning-loc", type=int, default=2)
    p.add_argument("--rate", type=float, default=0.75)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="threads for torch and onnxruntime (default: torch's)")
    p.add_argument("--workdir", default=None, help="keep the export here and reuse it (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    for hidden in ("--worker", "--export", "--size", "--recipe"):
        p.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads is None:
        import torch

        args.threads = torch.get_num_threads()

    if args.worker:
        res = worker(args.worker, Path(args.export), Path(args.recipe), args.size, args.new_tokens, args.repeats,
                     args.threads)
        print("RESULT " + json.dumps(res))
        return

    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (the first token, then decode steps)")
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tokcompile-answer-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    for size in [s for s in args.sizes.split(",") if s]:
        out, recipe_path = compile_export(work, size, args)
        ref = run_worker("check", out, recipe_path, size, args)
        rows = []
        for variant in variants:
            print(f"  {variant} ...", flush=True)
            row = run_worker(variant, out, recipe_path, size, args)
            if row is not None:
                rows.append(row)
        report(size, json.loads((out / "manifest.json").read_text()), rows, ref, args.new_tokens, args.repeats,
               GROUP_SIZE.get(size, 128), {v: label for v, (label, _, _) in VARIANTS.items()})
        results[size] = {"rows": rows, "check": ref}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
