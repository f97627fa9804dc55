"""Export targets, registered by explicit import. Heavy dependencies load inside each exporter."""

from __future__ import annotations

from tokcompile.export import aoti, eager, onnx, tensorrt, torch_compile  # noqa: F401  (register the targets)
from tokcompile.export.base import EXPORTERS, Artifact

__all__ = ["EXPORTERS", "Artifact"]
