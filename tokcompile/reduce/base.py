"""Reducer interface: a frozen config per method that plans static steps and applies them.

A reducer never sees the model class. `plan()` turns recipe parameters and geometry into `Step`s with
Python-int counts; `apply()` maps the tokens at its site (an `ImageTokens` in the vision graph, a
`TokenState` in the decoder) to new ones (it never mutates its input) and returns the step's parity output:
the kept indices, or for merges the output slot of every entering token.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from tokcompile.errors import RecipeError
from tokcompile.reduce.schedule import Schedule, Site, Step
from tokcompile.registry import Registry, suggest

if TYPE_CHECKING:
    from torch import Tensor

    from tokcompile.models.geometry import Geometry


@dataclass(frozen=True)
class Entering:
    """Token counts entering a reducer's first step, after every reducer planned before it.

    Args:
        image_tokens: image tokens that would reach the decoder.
        vision_tokens: tokens inside the vision tower (CLS included).
        after: (site, layer) of the last step planned before, or None; a reducer's steps must come later.
        family_sites: the sites the model family offers, for a method that can run at either of two.
        family_refusals: why the family refuses the others (the adapter's reasons), for that method's error.
        tower_at_projector: the family hands its tower's last block to the first projector-output step
            (`ImageContext.tower`).
        features_at_projector: the family hands the features its projector received to the first
            projector-output step (`ImageContext.features`).
    """

    image_tokens: int
    vision_tokens: int
    after: tuple[Site, int] | None = None
    family_sites: frozenset[Site] = frozenset(Site)
    family_refusals: Mapping[Site, str] = field(default_factory=dict)
    tower_at_projector: bool = False
    features_at_projector: bool = False

    def refusal(self, method: str, key: str, site: Site, geom: Geometry) -> RecipeError:
        """The plan's error for a method that needs `site` where the family refuses it."""
        reason = self.family_refusals.get(site, "the adapter does not expose this site")
        return RecipeError(f"{key}.method", f"{method} runs at the {site.value} site, which {geom.family} does not "
                                            f"support: {reason}")

    @classmethod
    def start(cls, geom: Geometry) -> Entering:
        """Nothing reduced yet: the model's own counts."""
        return cls(geom.n_image_tokens, geom.vision_tokens)

    @classmethod
    def start_for(cls, geom: Geometry, adapter: Any) -> Entering:
        """Nothing reduced yet, with what the model family offers."""
        return cls(geom.n_image_tokens, geom.vision_tokens, None, adapter.sites, adapter.site_refusals,
                   adapter.tower_at_projector, adapter.features_at_projector)


class Reducer(Protocol):
    """A token-reduction method's parameters. `sites` declares every site the method can use; a method whose
    parameters choose among them (FiCoCo: the tower, the decoder or both) also defines
    `sites_used() -> frozenset[Site]`, and only those must be supported by the model family. A method that
    accepts options without effect here (another toolkit's logging switches) defines `warnings() -> tuple[str,
    ...]`: the plan adds them to the recipe's warnings.

    A method that needs more than a site from the family lists the adapter's flags in `family_needs` (a
    ClassVar tuple, keys of `FAMILY_NEEDS`); the plan refuses a family that lacks one.

    Optional, for vision-graph methods: `question(key) -> QuestionSpec` when a step reads the question (its
    `Step.question`; `key` names the recipe section for errors), and `load_module() -> nn.Module | None`, weights
    the method brings itself (CLIP's text tower), loaded when the graphs are built, registered in the vision
    graph (so every export carries them) and handed to `apply` as `ctx.module`."""

    method: ClassVar[str]
    sites: ClassVar[frozenset[Site]]

    def plan(self, geom: Geometry, key: str, entering: Entering) -> Schedule: ...

    def apply(self, state: Any, ctx: Any, step: Step, forced: Tensor | None = None) -> tuple[Any, Tensor]: ...


REDUCERS: Registry[type] = Registry("token-reduction method")

# What a method may need from the family beyond a site (`family_needs`: the adapter's flag -> what it gives).
FAMILY_NEEDS = {
    "features_at_projector": "the features the projector received, at the projector-output site",
    "tower_at_projector": "the vision tower's last block, at the projector-output site",
}


def missing_needs(cls: type, adapter: Any) -> list[str]:
    """The adapter flags a reducer class lists in `family_needs` that the family's adapter does not set."""
    return [n for n in getattr(cls, "family_needs", ()) if not getattr(adapter, n, False)]


def is_int(v: Any) -> bool:
    """An integer recipe value (YAML's true/false are not)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A numeric recipe value (YAML's true/false are not)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def sites_used(cfg: Any) -> frozenset[Site]:
    """The sites these parameters make the method use (all it declares, unless it says otherwise)."""
    used = getattr(cfg, "sites_used", None)
    return used() if callable(used) else type(cfg).sites


def _type_ok(value: Any, typ: Any) -> bool:
    t = str(getattr(typ, "__name__", typ))
    if t == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if t == "bool":
        return isinstance(value, bool)
    if t == "str":
        return isinstance(value, str)
    return True


def config_from_params(cls: type, params: dict[str, Any], key: str, aliases: dict[str, str] | None = None) -> Any:
    """Build a reducer config from recipe parameters, with errors that name `key.<param>`.

    `aliases` maps other accepted names (another toolkit's spelling) to field names. Fields whose type is not
    a plain int/float/bool/str are passed through for the config's own `__post_init__` or `plan` to check.
    """
    aliases = dict(getattr(cls, "aliases", {}) or {}, **(aliases or {}))
    names = [f.name for f in fields(cls)]
    known = names + list(aliases)
    for name in params:
        if name not in known:
            raise RecipeError(
                f"{key}.{name}",
                f"unknown parameter for {cls.method}{suggest(name, known)}; known: {', '.join(known)}",
            )
    kwargs = {}
    for name, value in params.items():
        field_name = aliases.get(name, name)
        f = next(f for f in fields(cls) if f.name == field_name)
        if not _type_ok(value, f.type):
            want = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}
            raise RecipeError(
                f"{key}.{name}",
                f"expected {want.get(str(f.type), f.type)}, got {type(value).__name__} {value!r}",
            )
        kwargs[field_name] = float(value) if f.type in (float, "float") else value
    missing = [
        f.name
        for f in fields(cls)
        if f.name not in kwargs and f.default is MISSING and f.default_factory is MISSING
    ]
    if missing:
        raise RecipeError(f"{key}.{missing[0]}", f"required parameter of {cls.method} is missing")
    return cls(**kwargs)
