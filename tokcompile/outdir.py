"""Where an export may go: the output directory (`--out`, else `save.save_path`), checked before any weights
load and without side effects.

The path must be creatable (no NUL byte, names and length within the filesystem's limits, under a writable
directory rather than a file), and must not be the current directory, one of its ancestors, `/` or the home
directory. An existing directory is replaced (only with --force) when it holds a tokcompile export or is empty;
anything else is left alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokcompile.errors import RecipeError

PID_DIGITS = 7  # Linux pids stay below 2**22 (pid_max)
TEMP_NAME_OVERHEAD = len(".") + len(".tmp-") + PID_DIGITS  # what publish's `.<name>.tmp-<pid>` adds to a name
MAX_MANIFEST_BYTES = 16 << 20
FIX = "choose another directory (--out or save.save_path)"


def is_export(path: Path) -> bool:
    """Whether `path` holds a tokcompile export: a manifest.json object with `format_version` and a plan or
    graphs, as compile.py writes it (see tokcompile.manifest)."""
    manifest = Path(path) / "manifest.json"
    try:
        if not manifest.is_file() or manifest.stat().st_size > MAX_MANIFEST_BYTES:
            return False
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "format_version" in data and ("plan" in data or "graphs" in data)


def _is_empty_dir(path: Path) -> bool:
    with os.scandir(path) as entries:
        return next(entries, None) is None


def _existing_ancestor(path: Path) -> Path:
    """The nearest ancestor of the absolute `path` that exists (followed through links)."""
    for parent in path.parents:
        try:
            os.stat(parent)
        except OSError:
            continue
        return parent
    return Path(path.anchor)


def _resolved(text: str) -> Path:
    """`text` as an absolute path with its parent's links resolved (the last component is kept as it is)."""
    raw = Path(text)
    if raw.name in ("", ".."):  # ".", "..", "/", "a/..": nothing to keep
        return raw.resolve()
    return raw.parent.resolve() / raw.name


def _protected(dest: Path) -> str | None:
    """What `dest` is if it must never be replaced: the current directory, an ancestor of it, `/`, home."""
    if dest == Path(dest.anchor):
        return "the root directory"
    try:
        cwd = Path.cwd().resolve()
    except OSError:
        cwd = None
    if cwd is not None and dest == cwd:
        return "the current directory"
    if cwd is not None and dest in cwd.parents:
        return "an ancestor of the current directory"
    try:
        if dest == Path.home().resolve():
            return "the home directory"
    except (OSError, RuntimeError, KeyError):
        pass
    return None


def check_path(path: str | Path, key: str) -> Path:
    """Check that a compile could create `path` (no side effects) and return it absolute.

    `key` names where the path came from (`--out` or `save.save_path`) in the error message.
    """
    text = os.fspath(path)
    if "\0" in text:
        raise RecipeError(key, f"{text!r} contains a NUL byte; choose a path without it")
    name_max = 255
    for part in Path(text).parts:
        if len(os.fsencode(part)) > name_max:
            raise RecipeError(key, f"the name {part[:24]}... is {len(os.fsencode(part))} bytes long, longer than "
                                   f"a file name can be ({name_max}); choose a shorter path")
    dest = _resolved(text)
    what = _protected(dest)
    if what is not None:
        raise RecipeError(key, f"{text} is {what}, which a compile must not replace; choose a new directory "
                               "for the export, e.g. exported/<name>")
    anc = _existing_ancestor(dest)
    if not anc.is_dir():
        raise RecipeError(key, f"{dest} cannot be created: {anc} is a file, not a directory; choose a path "
                               "under a directory")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise RecipeError(key, f"{dest} cannot be created: {anc} is not writable; choose a path in a writable "
                               "directory")
    try:
        name_max = os.pathconf(anc, "PC_NAME_MAX")
        path_max = os.pathconf(anc, "PC_PATH_MAX")
    except (OSError, ValueError):
        path_max = 4096
    limit = name_max - TEMP_NAME_OVERHEAD
    if len(os.fsencode(dest.name)) > limit:
        raise RecipeError(key, f"the directory name {dest.name[:24]}... is {len(os.fsencode(dest.name))} bytes "
                               f"long; it can be at most {limit} (its temporary sibling adds {TEMP_NAME_OVERHEAD}); "
                               "choose a shorter name")
    if len(os.fsencode(str(dest))) + TEMP_NAME_OVERHEAD >= path_max:
        raise RecipeError(key, f"the path {str(dest)[:40]}... is too long for this filesystem ({path_max} bytes); "
                               "choose a shorter path")
    return dest


def check_destination(path: str | Path, force: bool, key: str) -> Path:
    """`check_path`, then what already sits at `path`: nothing, or (with --force) an export or an empty
    directory. Returns the absolute destination."""
    dest = check_path(path, key)
    if os.path.islink(dest):
        raise RecipeError(key, f"{dest} is a symbolic link; point {key} at the directory it links to, "
                               f"{os.path.realpath(dest)}")
    if not os.path.lexists(dest):
        return dest
    if not dest.is_dir():
        raise RecipeError(key, f"{dest} is a file; choose a directory path")
    try:
        replaceable = is_export(dest) or _is_empty_dir(dest)
    except OSError as e:
        raise RecipeError(key, f"cannot read {dest}: {e.strerror or e}; {FIX}") from None
    if not replaceable:
        raise RecipeError(key, f"{dest} exists and does not hold a tokcompile export (no manifest.json written "
                               f"by compile.py); --force replaces only an export or an empty directory, so {FIX} "
                               "or move its files away")
    if not force:
        raise RecipeError(key, f"{dest} already exists; pass --force to replace it, or {FIX}")
    return dest
