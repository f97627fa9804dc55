"""Export targets, registered by explicit import. Heavy dependencies load inside each exporter."""

from __future__ import annotations

from tokcompile.export import aoti, onnx  # noqa: F401  (register "aoti" and "onnx")
from tokcompile.export.base import EXPORTERS, Artifact

__all__ = ["EXPORTERS", "Artifact"]
