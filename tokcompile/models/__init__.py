"""Model-family adapters and the `ReducedVLM` wrapper."""

from __future__ import annotations

from tokcompile.models import llava  # noqa: F401  (registers the "llava" adapter)
from tokcompile.models.base import ReducedVLM, TokenState, VLMAdapter
from tokcompile.models.geometry import Geometry
from tokcompile.models.registry import ADAPTERS

__all__ = ["ADAPTERS", "Geometry", "ReducedVLM", "TokenState", "VLMAdapter"]
