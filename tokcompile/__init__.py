"""tokcompile: compile a VLM with fake quantization and a static visual-token-reduction schedule into
validated ONNX and AOTInductor artifacts."""

from __future__ import annotations

__version__ = "0.1.0"
