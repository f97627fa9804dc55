"""Model-family adapters and the graph modules (`ReducedVLM`, `VisionEncoder`, `Prefill`, `DecodeStep`)."""

from __future__ import annotations

# Importing a family module registers its adapter under its HF model_type.
from tokcompile.models import llava, llava_next, llava_onevision, qwen2_vl, qwen3_vl  # noqa: F401
from tokcompile.models.base import VLMAdapter
from tokcompile.models.geometry import Geometry
from tokcompile.models.reduced import DecodeStep, KVCache, Prefill, ReducedVLM, VisionEncoder
from tokcompile.models.registry import ADAPTERS
from tokcompile.reduce.state import TokenState

__all__ = ["ADAPTERS", "DecodeStep", "Geometry", "KVCache", "Prefill", "ReducedVLM", "TokenState", "VLMAdapter",
           "VisionEncoder"]
