"""Time to first token, decode speed and peak memory, side by side in one run.

    python benchmarks/generation.py                       # tiny demo model and the ~250M medium model
    python benchmarks/generation.py --sizes tiny --targets onnx,eager

For each model size it compiles a FastV recipe (no quantization: fake-quantized weights cost the same), then
measures, each in a fresh worker process so that peak memory is its own:
  hf_full        the HF model, eager, without compression (KV cache, greedy)
  eager_reduced  tokcompile's graph modules (VisionEncoder, Prefill, DecodeStep), eager PyTorch
  onnxruntime / aoti / eager   the exported vision, prefill and decode graphs through tokcompile.runtime
  onnxruntime_no_prepack       onnxruntime with prepack=False: no per-graph packed copy of the MatMul weights
and prints ratios against hf_full. TTFT is the vision graph then the prefill graph, timed as one chain (the
whole prompt up to the first token's logits, as hf_full's one forward). Machines are noisy: compare the ratios
of one run, not absolute times across runs.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import processed_batch, reset_peak, smaps_mb, status_mb, timed  # noqa: E402

QUESTION = "Describe this image in detail, please."


def _recipe(size: str, pruning_loc: int, rate: float, targets: list[str]) -> dict:
    return {
        "base": {"seed": 42},
        "model": {"path": f"tiny-random:llava@{size}" if size != "tiny" else "tiny-random:llava"},
        "inputs": {"batch_size": 1, "max_prompt_len": 256},
        "sparse": {
            "method": "TokenReduction",
            "special": {"method": "FastV", "pruning_loc": pruning_loc, "rate": rate},
        },
        "export": {"targets": targets},
        "parity": {"samples": 1, "atol": 1e-3, "rtol": 1e-3},
    }


def _chain_timed(vision, prefill, times):
    """`vision` and `prefill` as one timed chain: from the vision graph's start to the prefill graph's end."""
    start: list[float] = []

    def run_vision(feed):
        start.append(time.perf_counter())
        return vision(feed)

    def run_prefill(feed):
        out = prefill(feed)
        times.append(time.perf_counter() - start.pop())
        return out

    return run_vision, run_prefill


def worker(variant: str, export_dir: Path, recipe: Path, size: str, new_tokens: int, repeats: int) -> dict:
    import onnxruntime  # noqa: F401  (every variant imports the same libraries, so baselines match)
    import torch
    import transformers  # noqa: F401

    import tokcompile.runtime  # noqa: F401
    from tokcompile.generation import GenerationConfig, generate

    baseline = status_mb("VmRSS")
    base_smaps = smaps_mb()
    reset_peak()  # the peak below is this variant's own

    manifest = json.loads((export_dir / "manifest.json").read_text())
    cfg = GenerationConfig(max_new_tokens=new_tokens)

    if variant in ("hf_full", "eager_reduced"):
        from tokcompile.models.tiny import build_model, build_processor

        processor = build_processor("llava", size)
        model = build_model("llava", seed=42, size=size)
        batch = processed_batch(processor, manifest, QUESTION)
        if variant == "hf_full":

            def prefill(feed):
                with torch.no_grad():
                    out = model(**feed, use_cache=True)
                state["past"] = out.past_key_values
                state["pos"] = feed["input_ids"].shape[1]
                return out.logits[:, -1]

            def decode_tok(tok):
                with torch.no_grad():
                    out = model(input_ids=tok, past_key_values=state["past"], use_cache=True)
                state["past"] = out.past_key_values
                return out.logits[:, -1]

            state: dict = {}

            def run_once():
                pre, dec = [], []
                logits = timed(prefill, pre)(batch)
                for _ in range(new_tokens - 1):
                    tok = logits.argmax(-1, keepdim=True)
                    logits = timed(decode_tok, dec)(tok)
                return pre[0], dec

        else:
            from tokcompile.graphs import build_modules, eager_runners
            from tokcompile.pipeline import plan_recipe

            plan = plan_recipe(recipe)
            reduced, decode = build_modules(plan, model)
            graphs, layout = eager_runners(reduced, decode), reduced.layout
    else:
        from tokcompile.runtime import load

        backend = variant.removesuffix("_no_prepack")
        gen = load(export_dir, backend, trust_export=True,  # compiled by this benchmark
                   prepack=not variant.endswith("_no_prepack"))
        batch = processed_batch(gen.processor, manifest, QUESTION)
        graphs, layout = gen.graphs, gen.layout

    if variant != "hf_full":
        vision_graph, prefill_graph, decode_graph = graphs

        def run_once():
            pre, dec = [], []
            vision, prefill = _chain_timed(vision_graph, prefill_graph, pre)
            generate(vision, prefill, timed(decode_graph, dec), batch, layout=layout, cfg=cfg)
            return pre[0], dec

    run_once()  # warm-up
    ttfts, decode_rates = [], []
    for _ in range(repeats):
        ttft, dec = run_once()
        ttfts.append(ttft)
        decode_rates.append(len(dec) / sum(dec))
    return {
        "variant": variant,
        "ttft_s": statistics.median(ttfts),
        "decode_tok_s": statistics.median(decode_rates),
        "peak_rss_mb": status_mb("VmHWM"),
        "peak_over_baseline_mb": status_mb("VmHWM") - baseline,
        **{f"{k}_over_baseline_mb": v - base_smaps[k] for k, v in smaps_mb().items()},
        "prompt_len": int(batch["input_ids"].shape[1]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="tiny,medium")
    p.add_argument("--targets", default="onnx,aoti,eager")
    p.add_argument("--pruning-loc", type=int, default=2)
    p.add_argument("--rate", type=float, default=0.75)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default=None, help="keep compiled exports here (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--export", default=None, help=argparse.SUPPRESS)
    p.add_argument("--size", default=None, help=argparse.SUPPRESS)
    p.add_argument("--recipe", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        res = worker(args.worker, Path(args.export), Path(args.recipe), args.size, args.new_tokens, args.repeats)
        print("RESULT " + json.dumps(res))
        return

    import yaml

    from tokcompile.pipeline import compile_recipe

    targets = [t for t in args.targets.split(",") if t]
    backends = {"onnx": ["onnxruntime", "onnxruntime_no_prepack"], "aoti": ["aoti"], "eager": ["eager"]}
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tokcompile-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    for size in args.sizes.split(","):
        out = work / size
        recipe_path = work / f"{size}.yml"
        recipe_path.write_text(yaml.safe_dump(_recipe(size, args.pruning_loc, args.rate, targets)))
        if not (out / "manifest.json").exists():
            print(f"compiling {size} ...", flush=True)
            t = time.perf_counter()
            compile_recipe(recipe_path, out=out, force=True, log=lambda m: None)
            print(f"  compiled in {time.perf_counter() - t:.0f}s", flush=True)
        rows = []
        for variant in ["hf_full", "eager_reduced"] + [v for t in targets for v in backends[t]]:
            res = subprocess.run(
                [sys.executable, __file__, "--worker", variant, "--export", str(out), "--size", size,
                 "--recipe", str(recipe_path),
                 "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)],
                capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
            )
            line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
            if res.returncode != 0 or not line:
                print(f"  {variant} failed: {res.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            rows.append(json.loads(line[0][7:]))
        manifest = json.loads((out / "manifest.json").read_text())
        g = manifest["plan"]["geometry"]
        step = manifest["schedule"][0]
        import torch

        print(f"\n{size}: llava, {g['n_layers']} decoder layers, d={g['hidden_size']}, {g['n_image_tokens']} image "
              f"tokens, FastV K={step['layer']} keeps {step['n_out']}; prompt {rows[0]['prompt_len'] if rows else '?'} "
              f"tokens, {args.new_tokens} new tokens, batch 1, {torch.get_num_threads()} threads, median of "
              f"{args.repeats}")
        print(f"{'variant':<21}{'TTFT ms':>10}{'x hf_full':>11}{'decode tok/s':>14}{'x hf_full':>11}"
              f"{'peak MB':>10}{'x hf_full':>11}{'PSS MB':>9}{'anon MB':>9}")
        base = rows[0] if rows and rows[0]["variant"] == "hf_full" else None
        for r in rows:

            def ratio(key: str, inverse: bool = False, r: dict = r) -> float:
                if base is None:
                    return float("nan")
                return base[key] / r[key] if inverse else r[key] / base[key]

            print(f"{r['variant']:<21}{r['ttft_s'] * 1e3:>10.1f}{ratio('ttft_s', True):>10.2f}x"
                  f"{r['decode_tok_s']:>14.1f}{ratio('decode_tok_s'):>10.2f}x{r['peak_over_baseline_mb']:>10.0f}"
                  f"{ratio('peak_over_baseline_mb'):>10.2f}x{r.get('pss_over_baseline_mb', float('nan')):>9.0f}"
                  f"{r.get('anonymous_over_baseline_mb', float('nan')):>9.0f}")
        print("(TTFT ratio = speedup: hf_full TTFT / variant TTFT. Peak MB = peak resident memory above the same "
              "imports, model build and loading included; its ratio = variant / hf_full. A file page mapped by "
              "several sessions counts once per mapping there; PSS MB (after the run) counts it once, anon MB is "
              "private memory. onnxruntime pre-packs MatMul weights per graph (the default); _no_prepack: "
              "prepack=False, the mapped weight file the only copy)")
        results[size] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
