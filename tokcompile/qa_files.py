"""Local image/question files, as calibration and evaluation read them: a folder with LightCompress's
`img_qa.json` (a JSON list of entries) or a JSONL file (one JSON entry per line). Image paths in the entries are
relative to the returned base folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokcompile.errors import RecipeError


def read_entries(p: Path, key: str, entries: str) -> tuple[list[Any], Path]:
    """(entries, base folder) from a folder with img_qa.json or a JSONL file; errors name `key`. `entries` says
    what a missing img_qa.json should list (e.g. "image/question pairs")."""
    if p.is_dir():
        index = p / "img_qa.json"
        if not index.is_file():
            raise RecipeError(key, f"{p} has no img_qa.json; add one (a list of {entries})")
        try:
            rows = json.loads(index.read_text())
        except ValueError as e:
            raise RecipeError(key, f"{index} is not valid JSON ({e})") from None
        if not isinstance(rows, list):
            raise RecipeError(key, f"{index} holds a JSON {type(rows).__name__}; it must be a list of entries")
        return rows, p
    if not p.is_file():
        raise RecipeError(key, f"{p} does not exist; give a folder with img_qa.json or a JSONL file")
    rows = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                raise RecipeError(key, f"{p} line {n} is not valid JSON ({e})") from None
    return rows, p.parent
