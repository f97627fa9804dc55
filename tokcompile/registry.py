"""Small explicit registries with "did you mean" errors.

Entries are added with the `register` decorator from explicit imports in each subpackage's
`__init__.py`; nothing walks packages or star-imports.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


def suggest(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """Return " (did you mean 'x'?)" for the closest choice, or "" when nothing is close."""
    lowered = {c.lower(): c for c in choices}
    match = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)
    return f" (did you mean '{lowered[match[0]]}'?)" if match else ""


class Registry(Generic[T]):
    """A named, case-insensitive mapping from keys to registered objects."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, *keys: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            for key in keys:
                k = key.lower()
                if k in self._entries:
                    raise KeyError(f"{self.kind} '{key}' is registered twice")
                self._entries[k] = obj
            return obj

        return deco

    def get(self, key: str) -> T:
        try:
            return self._entries[key.lower()]
        except KeyError:
            raise KeyError(
                f"unknown {self.kind} '{key}'{suggest(key, list(self._entries))}; "
                f"known: {', '.join(sorted(self._entries))}"
            ) from None

    def __contains__(self, key: str) -> bool:
        return key.lower() in self._entries

    def keys(self) -> list[str]:
        return sorted(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())
