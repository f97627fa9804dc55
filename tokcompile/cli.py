"""Command line: `python compile.py recipe.yml [--plan] [--out DIR] [--targets onnx,aoti] [--force]`.

User errors print one line (`error: <key>: <what and the fix>`) and exit 2; a parity or export failure
prints one line and exits 1. No traceback unless TOKCOMPILE_DEBUG=1.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from tokcompile.errors import TokcompileError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="compile.py",
        description="Compile a VLM recipe (fake quantization + static token reduction) into validated artifacts.",
    )
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("--plan", action="store_true", help="print the resolved schedule and FLOPs without loading weights")
    p.add_argument("--out", help="output directory (default: save.save_path, else exported/<recipe name>)")
    p.add_argument("--targets", help="comma-separated export targets, overriding export.targets (onnx,aoti)")
    p.add_argument("--force", action="store_true", help="replace an existing export directory")
    p.add_argument("-q", "--quiet", action="store_true", help="print only warnings, errors and the result")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    targets = tuple(t.strip().lower() for t in args.targets.split(",") if t.strip()) if args.targets else None
    debug = os.environ.get("TOKCOMPILE_DEBUG") == "1"
    try:
        if args.plan:
            from tokcompile.pipeline import plan_recipe
            from tokcompile.plan import format_plan

            plan = plan_recipe(args.recipe, out=args.out, targets=targets)
            for w in plan.recipe.warnings:
                print(f"warning: {w}", file=sys.stderr)
            print(format_plan(plan))
            return 0
        if not debug:
            warnings.filterwarnings("ignore")
            os.environ.setdefault("TORCH_LOGS", "-all")
        from tokcompile.pipeline import compile_recipe

        def log(msg: str) -> None:
            if msg.startswith("warning:"):
                print(msg, file=sys.stderr, flush=True)
            elif not args.quiet or msg.startswith("done"):
                print(msg, flush=True)

        compile_recipe(args.recipe, out=args.out, targets=targets, force=args.force, log=log)
        return 0
    except TokcompileError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; nothing was published", file=sys.stderr)
        return 130
