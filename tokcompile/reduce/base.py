"""Reducer interface: a frozen config per method that plans static steps and applies them.

A reducer never sees the model class. `plan()` turns recipe parameters and geometry into `Step`s with
Python-int counts; `apply()` maps a `TokenState` to a new one (it never mutates its input) and returns the
kept indices, which every artifact exposes for parity.
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from tokcompile.errors import RecipeError
from tokcompile.reduce.schedule import Schedule, Site, Step
from tokcompile.registry import Registry, suggest

if TYPE_CHECKING:
    from torch import Tensor

    from tokcompile.models.base import DecoderSiteContext, TokenState
    from tokcompile.models.geometry import Geometry


class Reducer(Protocol):
    method: ClassVar[str]
    site: ClassVar[Site]

    def plan(self, geom: Geometry, key: str) -> Schedule: ...

    def apply(
        self, state: TokenState, ctx: DecoderSiteContext, step: Step, forced: Tensor | None = None
    ) -> tuple[TokenState, Tensor]: ...


REDUCERS: Registry[type] = Registry("token-reduction method")


def _type_ok(value: Any, typ: Any) -> bool:
    if typ in (float, "float"):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typ in (int, "int"):
        return isinstance(value, int) and not isinstance(value, bool)
    if typ in (bool, "bool"):
        return isinstance(value, bool)
    if typ in (str, "str"):
        return isinstance(value, str)
    return True


def config_from_params(cls: type, params: dict[str, Any], key: str) -> Any:
    """Build a reducer config from recipe parameters, with errors that name `key.<param>`."""
    names = [f.name for f in fields(cls)]
    for name in params:
        if name not in names:
            raise RecipeError(
                f"{key}.{name}",
                f"unknown parameter for {cls.method}{suggest(name, names)}; known: {', '.join(names)}",
            )
    kwargs = {}
    for f in fields(cls):
        if f.name not in params:
            continue
        value = params[f.name]
        if not _type_ok(value, f.type):
            want = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}
            raise RecipeError(
                f"{key}.{f.name}",
                f"expected {want.get(str(f.type), f.type)}, got {type(value).__name__} {value!r}",
            )
        kwargs[f.name] = float(value) if f.type in (float, "float") else value
    missing = [
        f.name
        for f in fields(cls)
        if f.name not in kwargs and f.default is MISSING and f.default_factory is MISSING
    ]
    if missing:
        raise RecipeError(f"{key}.{missing[0]}", f"required parameter of {cls.method} is missing")
    return cls(**kwargs)
