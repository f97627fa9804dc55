"""Static token-reduction methods, one file each, registered by explicit import."""

from __future__ import annotations

from tokcompile.reduce import fastv  # noqa: F401  (registers "fastv")
from tokcompile.reduce.base import REDUCERS, config_from_params
from tokcompile.reduce.schedule import Schedule, Site, Step

__all__ = ["REDUCERS", "Schedule", "Site", "Step", "config_from_params"]
