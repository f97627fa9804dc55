"""`python -m tokcompile quantize recipe.yml --out DIR`: the recipe's GPTQ streamed over its checkpoint, one
decoder layer in memory at a time (`quant/streaming.py`), written as a fake-quantized HF checkpoint directory,
shard by shard. A recipe without quantization pointed at DIR then compiles it like any checkpoint."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import warnings
from pathlib import Path

from tokcompile.cli import _report
from tokcompile.errors import RecipeError, TokcompileError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tokcompile quantize",
        description="Quantize the recipe's checkpoint with its GPTQ settings layer by layer, never holding the "
                    "whole model in memory, and write the fake-quantized checkpoint (safetensors shards, config "
                    "and processor files) to --out. Prints one line per layer with its error, time and the "
                    "process's peak memory.")
    p.add_argument("recipe", help="a recipe whose quant section is GPTQ and whose model.path is a local directory")
    p.add_argument("--out", required=True, help="the checkpoint directory to write (new, or empty)")
    p.add_argument("--layers", type=int, default=None,
                   help="quantize only the first N decoder layers and copy the rest unchanged (a measurement run)")
    p.add_argument("--device", default=None,
                   help="compute the current layer (and the vision tower) there, e.g. cuda; everything else stays on "
                        "the host (default: the host's CPU)")
    p.add_argument("--spill-dir", default=None,
                   help="keep the calibration activations between layers in files under this directory (default: "
                        "in memory, spilled into --out's staging directory when they would not fit)")
    p.add_argument("--force", action="store_true", help="replace an empty directory or an earlier export at --out")
    p.add_argument("--trust-remote-code", action="store_true", help="confirm the recipe's model.trust_remote_code")
    return p


def quantize_main(argv: list[str] | None = None) -> int:
    from tokcompile.publish import Terminated

    args = _parser().parse_args(argv)
    debug = os.environ.get("TOKCOMPILE_DEBUG") == "1"
    if not debug:
        warnings.filterwarnings("ignore")
    try:
        from tokcompile.models import tiny
        from tokcompile.outdir import check_destination
        from tokcompile.pipeline import plan_recipe
        from tokcompile.publish import staging
        from tokcompile.quant import GPTQConfig
        from tokcompile.quant.streaming import stream_gptq

        # Nothing is exported here: plan for the eager target, which takes any dtype the recipe names.
        plan = plan_recipe(args.recipe, targets=("eager",), trust_remote_code=args.trust_remote_code, evaluate=False)
        if not isinstance(plan.quant, GPTQConfig):
            raise RecipeError("quant.method", "streaming quantization runs GPTQ; set quant.method: GPTQ (RTN needs "
                                              "no calibration and runs inside the compile)")
        if tiny.is_tiny(plan.recipe.model.path):
            raise RecipeError("model.path", "streaming reads a checkpoint directory; write the built-in model with "
                                            "`python -m tokcompile save-model` and point model.path at it")
        if args.device is not None:
            from tokcompile.devices import usable

            usable("--device", args.device)
        if args.layers is not None and args.layers < 1:
            raise RecipeError("--layers", f"{args.layers} is not a layer count; give 1 or more, or leave it out")
        dest = check_destination(args.out, args.force, "--out")
        with staging(dest, args.force, "--out") as stage:
            report = stream_gptq(plan, stage.tmp, log=lambda m: print(m, flush=True), max_layers=args.layers,
                                 device=args.device,
                                 spill_dir=Path(args.spill_dir) if args.spill_dir is not None else None)
            (stage.tmp / "quantization.json").write_text(json.dumps(report, indent=2) + "\n")
            stage.publish()
        s = report["streaming"]
        print(f"done: {s['layers_quantized']} decoder layers quantized in {s['seconds']} s, peak memory "
              f"{s['peak_rss_mb']} MB; wrote {dest}")
        return 0
    except TokcompileError as e:
        return _report(e, debug)
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written to --out", file=sys.stderr)
        return 130
    except Terminated as e:  # SIGTERM: the staging directory is already removed
        print(f"error: {e}", file=sys.stderr)
        return 128 + signal.SIGTERM
