"""Errors a user can act on.

`RecipeError` covers bad input (recipe, model directory, image file). The CLI prints its message as one
line and exits with code 2. `ParityError` means an artifact disagreed with eager PyTorch; the CLI exits
with code 1 and nothing is published.
"""

from __future__ import annotations


class TokcompileError(Exception):
    """Base class of every error the CLI reports as one line, without a traceback."""

    exit_code = 1


class RecipeError(TokcompileError):
    """Bad user input. The message names the recipe key (or file) and the fix."""

    exit_code = 2

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


class ParityError(TokcompileError):
    """An artifact's outputs disagree with the eager reference."""

    exit_code = 1


class ExportError(TokcompileError):
    """An exporter failed (for example a backend rejected the graph)."""

    exit_code = 1
