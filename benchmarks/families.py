"""Prefill speedup of the exported reduced graphs over the eager HF full model, for every family, in one run.

    python benchmarks/families.py                                  # every family, medium size, rates 0.75 and 0.5
    python benchmarks/families.py --families qwen2_vl --size tiny --repeats 3
    python benchmarks/families.py --backends onnx,aoti             # AOTInductor too (minutes per graph)

For each family it builds the built-in random model (`tiny-random:<family>@<size>`: about 150-300M parameters
at "medium", with the family's real image-token count at a common resolution), one image (or video) prompt at
the compiled resolution, and times the prefill (time to first token, batch 1) of:
  hf_full         the HF model's own forward, eager, without compression
  <backend>_full  the exported vision graph then prefill graph, without reduction (what export alone buys)
  <backend>_r<R>  the exported vision then prefill graph with static FastV at K=2, rate R
Both graphs are exported at the prompt's static shapes with the compiler's own exporters and checked against
eager before they are timed as one chain (benchmarks/common.py: kept indices, cache masks, image sources and
next positions equal, logits within 1e-3). The table prints the speedups over hf_full and, beside them,
the ideal speedup from the analytic FLOPs (exact convention: vision tower + decoder + lm_head).
Machines are noisy: read the ratios of one run, and run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTION = "Describe this image in detail, please."
ALL_FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl")
# Compiled resolution per family at "medium" (None: the family's default). LLaVA-NeXT's default 672x672 gives
# 2928 image tokens, tens of seconds per prefill on 2 CPU cores; 336x672 (a 1x2 grid, 1752 tokens) is the
# real layout of a landscape photo at a third of the cost.
MEDIUM_IMAGE_SIZE = {"llava_next": [336, 672]}


def _plan(family: str, size: str, rate: float | None, pruning_loc: int, tmp: Path):
    import yaml

    from tokcompile.pipeline import plan_recipe

    path = f"tiny-random:{family}" + (f"@{size}" if size != "tiny" else "")
    recipe: dict = {"model": {"path": path}, "inputs": {"batch_size": 1, "max_prompt_len": 128}}
    if size == "medium" and family in MEDIUM_IMAGE_SIZE:
        recipe["inputs"]["image_size"] = MEDIUM_IMAGE_SIZE[family]
    if rate is not None:
        recipe["sparse"] = {"method": "TokenReduction",
                            "special": {"method": "FastV", "pruning_loc": pruning_loc, "rate": rate}}
    f = tmp / f"{family}-{rate}.yml"
    f.write_text(yaml.safe_dump(recipe))
    return plan_recipe(f, out=tmp / "unused")


def bench_family(family: str, size: str, rates: list[float], backends: list[str], repeats: int, tmp: Path) -> dict:
    import numpy as np
    import torch

    from benchmarks.common import export_chain, median_time
    from tokcompile import flops
    from tokcompile.models.tiny import build_model, build_processor
    from tokcompile.parity import process

    full_plan = _plan(family, size, None, 2, tmp)
    g = full_plan.geometry
    model = build_model(family, seed=0, size=size)
    processor = build_processor(family, size)
    media = full_plan.adapter.random_media(np.random.default_rng(0), 1, g)
    batch = process(processor, full_plan.adapter, g, media, [QUESTION])
    params = sum(p.numel() for p in model.parameters())

    def hf(feed):
        with torch.no_grad():
            return model(**feed).logits[:, -1]

    row: dict = {"family": family, "params_m": round(params / 1e6, 1), "image_tokens": g.n_image_tokens,
                 "prompt_len": int(batch["input_ids"].shape[1]), "media": g.media, "times_ms": {}, "flops": {}}
    row["times_ms"]["hf_full"] = 1e3 * median_time(hf, batch, repeats)
    print(f"[{family}] {row['params_m']}M params, {g.n_image_tokens} image tokens, prompt {row['prompt_len']}: "
          f"hf_full {row['times_ms']['hf_full']:.0f} ms", flush=True)
    for rate in [None, *rates]:
        plan = full_plan if rate is None else _plan(family, size, rate, 2, tmp)
        tag = "full" if rate is None else f"r{rate:g}"
        if rate is not None:  # at this prompt's own text length
            n_text = row["prompt_len"] - g.n_image_tokens
            row["flops"][tag] = flops.prefill_flops(g, plan.schedule, n_text)["total_exact"]["ratio"]
        for backend in backends:
            t0 = time.perf_counter()
            out = tmp / f"{family}-{tag}-{backend}"
            runner = export_chain(plan, model, batch, backend, out)
            export_s = time.perf_counter() - t0
            row["times_ms"][f"{backend}_{tag}"] = 1e3 * median_time(runner, batch, repeats)
            print(f"[{family}] {backend}_{tag}: {row['times_ms'][f'{backend}_{tag}']:.0f} ms "
                  f"(exported and checked in {export_s:.0f}s)", flush=True)
            del runner
            gc.collect()
    return row


def table(rows: list[dict], rates: list[float], backends: list[str]) -> str:
    head = ["family", "params", "image tokens", "prompt", "HF full ms"]
    for b in backends:
        head.append(f"{b} full (x)")
        for r in rates:
            head.append(f"{b} R={r:g} (x)")
    for r in rates:
        head.append(f"FLOPs ideal R={r:g} (x)")
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in rows:
        t = row["times_ms"]
        cells = [row["family"] + (" (video)" if row["media"] == "video" else ""), f"{row['params_m']}M",
                 str(row["image_tokens"]), str(row["prompt_len"]), f"{t['hf_full']:.0f}"]
        for b in backends:
            cells.append(f"{t['hf_full'] / t[f'{b}_full']:.2f}")
            for r in rates:
                cells.append(f"{t['hf_full'] / t[f'{b}_r{r:g}']:.2f}")
        for r in rates:
            cells.append(f"{1 / row['flops'][f'r{r:g}']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default=",".join(ALL_FAMILIES))
    p.add_argument("--size", default="medium")
    p.add_argument("--rates", default="0.75,0.5")
    p.add_argument("--backends", default="onnx")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path, help="also write the raw rows here")
    args = p.parse_args()
    import torch

    from tokcompile.models import tiny

    torch.manual_seed(0)
    families = [f for f in args.families.split(",") if f]
    unknown = [f for f in families if f not in tiny.FAMILIES]
    if unknown:
        sys.exit(f"error: --families: unknown family {unknown[0]}; built in: {', '.join(tiny.FAMILIES)}")
    rates = [float(r) for r in args.rates.split(",")]
    backends = [b for b in args.backends.split(",") if b]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for family in families:
            rows.append(bench_family(family, args.size, rates, backends, args.repeats, Path(d)))
    print()
    print(f"Prefill speedup over the eager HF full model (batch 1, {args.size} size, FastV K=2, "
          f"median of {args.repeats}, torch {torch.__version__}, {torch.get_num_threads()} threads):")
    print(table(rows, rates, backends))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
