"""`python -m tokcompile sweep sweep.yml [--address ADDR] [--serial]`: compile every point of a recipe sweep as
a Ray task (`sweep.py`) and write one table of cost against quality."""

from __future__ import annotations

import argparse
import os
import warnings

from tokcompile.cli import _report
from tokcompile.errors import TokcompileError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tokcompile sweep",
        description="Compile (and evaluate, when the base recipe has an eval section) every point of a sweep file: "
                    "a base recipe and a grid of overrides by recipe key. Points run as Ray tasks on a local "
                    "cluster (or --address); a re-run skips the points already published; a failed point is one "
                    "line in the results. Writes sweep.json and sweep.md into the sweep's out directory.")
    p.add_argument("sweep", help="the sweep YAML file")
    p.add_argument("--address", default=None, help="an existing Ray cluster's address (default: start a local one)")
    p.add_argument("--serial", action="store_true", help="compile the points one after another in this process, "
                                                         "without Ray")
    p.add_argument("--plan", action="store_true", help="list the points and their ids, compile nothing")
    return p


def sweep_main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    debug = os.environ.get("TOKCOMPILE_DEBUG") == "1"
    if not debug:
        warnings.filterwarnings("ignore")
        os.environ.setdefault("TORCH_LOGS", "-all")
    try:
        from tokcompile.errors import RecipeError
        from tokcompile.sweep import execute, load_sweep

        sweep = load_sweep(args.sweep)
        if args.plan:
            for p in sweep.points:
                print(p.id, p.overrides)
            return 0
        if not args.serial:
            try:
                import ray  # noqa: F401
            except ImportError:
                raise RecipeError("--serial", "Ray is not installed: pip install 'tokcompile[sweep]', or run the "
                                              "points one after another with --serial") from None
        rows = execute(sweep, address=args.address, serial=args.serial, log=lambda m: print(m, flush=True))
        failed = sum(r["status"] == "failed" for r in rows)
        print(f"done: {len(rows)} points, {failed} failed; wrote {sweep.out / 'sweep.md'}")
        return 1 if failed else 0
    except TokcompileError as e:
        return _report(e, debug)
