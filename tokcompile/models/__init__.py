"""Model-family adapters and the `ReducedVLM` wrapper."""

from __future__ import annotations

# Importing a family module registers its adapter under its HF model_type.
from tokcompile.models import llava, llava_next, llava_onevision, qwen2_vl  # noqa: F401
from tokcompile.models.base import ReducedVLM, TokenState, VLMAdapter
from tokcompile.models.geometry import Geometry
from tokcompile.models.registry import ADAPTERS

__all__ = ["ADAPTERS", "Geometry", "ReducedVLM", "TokenState", "VLMAdapter"]
