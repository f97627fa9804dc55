"""`python -m tokcompile tune tune.yml [--serial | --address ADDR]`: the budget autotuner (`tune.py`)."""

from __future__ import annotations

import argparse
import json
import os
import warnings

from tokcompile.cli import _report
from tokcompile.errors import TokcompileError


def tune_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tokcompile tune",
        description="Find the token reduction that loses the least quality within a prefill FLOPs budget: plan "
                    "every candidate, rank those in budget by the KL divergence of their next-token distribution "
                    "from the unreduced model's with successive halving, compile the finalists (Ray tasks, or "
                    "--serial) and write best.yml with a report of every candidate.")
    p.add_argument("tune", help="the tune YAML file")
    p.add_argument("--address", default=None, help="an existing Ray cluster for the finalists' compiles")
    p.add_argument("--serial", action="store_true", help="compile the finalists in this process, without Ray")
    args = p.parse_args(argv)
    debug = os.environ.get("TOKCOMPILE_DEBUG") == "1"
    if not debug:
        warnings.filterwarnings("ignore")
        os.environ.setdefault("TORCH_LOGS", "-all")
    try:
        from tokcompile.tune import tune

        doc = tune(args.tune, serial=args.serial, address=args.address, log=lambda m: print(m, flush=True))
        print(f"done: best {json.dumps(doc['best'])} (chosen by {doc['chosen_by']})")
        return 0
    except TokcompileError as e:
        return _report(e, debug)
