"""Static token-reduction methods, one file each, registered by explicit import."""

from __future__ import annotations

# Importing a method's module registers it under its file name.
from tokcompile.reduce import (  # noqa: F401
    aim,
    cdpruner,
    dart,
    divprune,
    fastervlm,
    fastv,
    ficoco,
    pact,
    pyramiddrop,
    randomprune,
    sparsevlm,
    tome,
    trim,
    visionzip,
    vispruner,
    vtw,
)
from tokcompile.reduce.base import REDUCERS, Entering, config_from_params
from tokcompile.reduce.schedule import Output, Positions, Schedule, Site, Step

__all__ = ["REDUCERS", "Entering", "Output", "Positions", "Schedule", "Site", "Step", "config_from_params"]
