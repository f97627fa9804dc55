"""Errors a user can act on.

`RecipeError` covers bad input (recipe, model directory, image file). The CLI prints its message as one
line and exits with code 2. `ParityError` means an artifact disagreed with eager PyTorch; the CLI exits
with code 1 and nothing is published.
"""

from __future__ import annotations

import re

MAX_WORD = 240  # characters of one value (a path, a number, a string) echoed in an error
MAX_LINE = 1000

_LONG_WORD = re.compile(r"\S{" + str(MAX_WORD + 1) + ",}")


def one_line(text: str) -> str:
    """`text` on one line, with any over-long value cut to its first characters and its length: an error
    must name the bad value, not reprint a megabyte of it."""
    flat = " ".join(str(text).split())
    flat = _LONG_WORD.sub(lambda m: f"{m.group(0)[:MAX_WORD - 60]}...({len(m.group(0))} characters)", flat)
    return flat if len(flat) <= MAX_LINE else flat[:MAX_LINE - 3] + "..."


class TokcompileError(Exception):
    """Base class of every error the CLI reports as one line, without a traceback."""

    exit_code = 1


class RecipeError(TokcompileError):
    """Bad user input. The message names the recipe key (or file) and the fix."""

    exit_code = 2

    def __init__(self, key: str, message: str):
        self.key = one_line(key)
        super().__init__(one_line(f"{key}: {message}" if key else message))


class ParityError(TokcompileError):
    """An artifact's outputs disagree with the eager reference."""

    exit_code = 1


class ExportError(TokcompileError):
    """An exporter failed (for example a backend rejected the graph)."""

    exit_code = 1
