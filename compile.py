"""python compile.py recipe.yml [--plan] [--out DIR] [--targets onnx,aoti] [--force]"""

import sys

from tokcompile.cli import main

if __name__ == "__main__":
    sys.exit(main())
