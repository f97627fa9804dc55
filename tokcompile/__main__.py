"""python -m tokcompile compile recipe.yml [...] (the same as python compile.py recipe.yml)."""

import sys

from tokcompile.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] == "compile":
        args = args[1:]
    sys.exit(main(args))
