"""Streaming GPTQ at LLaVA-1.5-7B's size on this machine: a random checkpoint with LLaVA-1.5-7B's geometry
(Vicuna-7B decoder: 32 layers, d=4096, FFN 11008, vocabulary 32064; CLIP ViT-L/14 at 336 px) in bfloat16 as
sharded safetensors (about 14 GB), generated tensor by tensor without ever holding the model, then
`python -m tokcompile quantize` on it: GPTQ W4 g128 layer by layer, with the process's peak resident memory and
the time per layer.

    python benchmarks/streaming_gptq.py --dir /tmp/llava7b-random --layers 4 [--samples 8]
    python benchmarks/streaming_gptq.py --dir /tmp/llava7b-random --layers 32 --device cuda   # on a GPU machine
    python benchmarks/streaming_gptq.py --dir /tmp/llava7b-random --layers 2 --spill-dir /tmp/act  # on disk

The checkpoint is written once (`--dir`; kept for later runs). Its tensor names are the model's own (transformers
loads them as they are). The tokenizer is the built-in byte-level one, so the vocabulary rows beyond its 261
tokens are never used, but they are there: the embedding and the head have LLaVA-1.5-7B's size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VOCAB = 32064  # LLaVA-1.5-7B's
SHARD_BYTES = 2 << 30


def write_checkpoint(directory: Path) -> float:
    """The random bf16 checkpoint, one tensor at a time. Returns its size in GB."""
    import torch

    from tokcompile.models import tiny
    from tokcompile.quant.shards import ShardWriter
    from tokcompile.quant.streaming import parameters_on_meta

    config = tiny.build_config("llava", "llava7b")
    config.text_config.vocab_size = VOCAB
    import transformers

    with parameters_on_meta():
        model = transformers.LlavaForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    directory.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(directory)
    g = torch.Generator().manual_seed(0)
    chunk, size = {}, 0
    for name, p in model.named_parameters():
        if p.dim() == 1 and ("norm" in name or "layrnorm" in name):
            t = torch.ones(p.shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(p.shape, generator=g) * 0.02).to(torch.bfloat16)
        chunk[name] = t
        size += t.numel() * 2
        if size >= SHARD_BYTES:
            writer.write(chunk)
            chunk, size = {}, 0
    writer.write(chunk)
    writer.finish()
    config.save_pretrained(str(directory))
    tiny.build_processor("llava", "llava7b").save_pretrained(str(directory))
    return writer.total_size / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, required=True, help="where the random 7B checkpoint is (written if absent)")
    ap.add_argument("--out", type=Path, default=None, help="the quantized checkpoint (default: DIR-gptq)")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers to quantize (the rest are copied)")
    ap.add_argument("--samples", type=int, default=8, help="calibration samples (synthetic, 576 image tokens each)")
    ap.add_argument("--device", default=None, help="compute the current layer there (e.g. cuda)")
    ap.add_argument("--spill-dir", default=None, help="keep the calibration activations in files there")
    args = ap.parse_args()
    if not (args.dir / "model.safetensors.index.json").is_file():
        t = time.perf_counter()
        gb = write_checkpoint(args.dir)
        print(f"wrote a random LLaVA-1.5-7B-geometry checkpoint: {gb:.2f} GB in {time.perf_counter() - t:.0f} s")
    out = args.out or args.dir.with_name(args.dir.name + "-gptq")
    recipe = out.with_name(out.name + ".yml")
    recipe.write_text(json.dumps({
        "base": {"seed": 0}, "model": {"path": str(args.dir), "torch_dtype": "float32"},
        "quant": {"method": "GPTQ", "weight": {"bit": 4, "symmetric": True, "granularity": "per_group",
                                               "group_size": 128},
                  "special": {"actorder": True, "static_groups": True, "blocksize": 128, "true_sequential": True},
                  "calib": {"name": "synthetic", "n_samples": args.samples, "bs": 1}},
    }))  # JSON is YAML
    shutil.rmtree(out, ignore_errors=True)  # this script's own output of an earlier run
    cmd = [sys.executable, "-m", "tokcompile", "quantize", str(recipe), "--out", str(out), "--layers",
           str(args.layers)]
    cmd += ["--device", args.device] if args.device else []
    cmd += ["--spill-dir", args.spill_dir] if args.spill_dir else []
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    report = json.loads((out / "quantization.json").read_text())
    s = report["streaming"]
    size = sum(f.stat().st_size for f in args.dir.glob("*.safetensors")) / 2**20
    per_layer = [r["seconds"] for r in report["layers"]]
    print(f"checkpoint {size / 1024:.2f} GiB; peak resident memory {s['peak_rss_mb']} MB = "
          f"{s['peak_rss_mb'] / size:.3f} of the checkpoint; {s['layers_quantized']} layers at "
          f"{sum(per_layer) / len(per_layer):.0f} s each (GPTQ), {s['seconds']} s in all, on {s['device']}"
          + (", activations on disk" if s["activations_spilled"] else ""))


if __name__ == "__main__":
    main()
