"""The registry of model-family adapters, keyed by HF `config.model_type`."""

from __future__ import annotations

from tokcompile.registry import Registry

ADAPTERS: Registry[type] = Registry("model family")
