"""Publishing a compile's output directory: written beside it, swapped in atomically, cleaned up.

A compile writes into a hidden sibling of its destination, `.<name>.tmp-<pid>`, and publishes it only after
parity passed (the destination was checked before any weights loaded: tokcompile.outdir):

- `publish` renames the temporary directory into place. Over an existing export it is one
  `renameat2(RENAME_EXCHANGE)` on Linux, so the destination always holds the old or the new export; where
  that call is missing, two renames park the old export at `.<name>.old-<pid>` in between.
- `staging` turns SIGTERM, like Ctrl-C, into an exception inside the compile, so the temporary directory is
  removed. A compile killed outright (SIGKILL, power loss) leaves its temporaries behind; the next compile
  into the same destination removes those whose process is gone (`sweep`), and puts a parked old export
  back if the kill came between the two renames.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokcompile.errors import RecipeError
from tokcompile.outdir import FIX, check_destination, is_export

TMP, OLD = "tmp", "old"  # kinds of temporary sibling: the export being written, the export being replaced
RENAME_EXCHANGE = 2
AT_FDCWD = -100
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP}


class Terminated(BaseException):
    """SIGTERM arrived during a compile. Raised in the main thread so that the temporary directory is removed."""

    def __init__(self, published: Path | None = None):
        self.published = published
        super().__init__(f"terminated after publishing {published}" if published else
                         "terminated; nothing was published")


def temp_path(dest: Path, kind: str, pid: int | None = None) -> Path:
    """The hidden sibling `.<name>.<kind>-<pid>` of `dest` (outdir.TEMP_NAME_OVERHEAD bytes longer at most)."""
    return dest.with_name(f".{dest.name}.{kind}-{os.getpid() if pid is None else pid}")


def _alive(pid: int) -> bool:
    """Whether process `pid` exists (one owned by another user counts as alive)."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists and belongs to someone else
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def sweep(dest: Path, log: Callable[[str], None] | None = None) -> list[str]:
    """Remove the temporaries of `dest` (`.<name>.tmp-<pid>`, `.<name>.old-<pid>`) left by compiles whose
    process is gone; a parked old export whose destination is missing (killed between two renames) is
    renamed back instead. Returns the names handled. Other entries are never touched."""
    pattern = re.compile(rf"\.{re.escape(dest.name)}\.({TMP}|{OLD})-([0-9]+)")
    try:
        with os.scandir(dest.parent) as it:
            names = sorted(e.name for e in it)
    except OSError:
        return []
    handled = []
    for name in names:
        m = pattern.fullmatch(name)
        if m is None:
            continue
        pid = int(m.group(2))
        if pid != os.getpid() and _alive(pid):
            continue
        entry = dest.parent / name
        try:
            if m.group(1) == OLD and not os.path.lexists(dest) and is_export(entry):
                os.rename(entry, dest)
                msg = f"restored {dest} from {name}, left by a compile killed while it published"
            else:
                _remove(entry)
                msg = f"removed {name}, left by a compile that was killed"
        except OSError:
            continue  # not ours to remove after all (permissions); the compile goes on without it
        handled.append(name)
        if log is not None:
            log(msg)
    return handled


@functools.cache
def _renameat2() -> Any:
    """libc's renameat2, or None where there is none (not Linux, glibc before 2.28)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def exchange(a: Path, b: Path) -> bool:
    """Swap the entries at `a` and `b` in one step. False where the system or filesystem cannot."""
    import ctypes

    fn = _renameat2()
    if fn is None:
        return False
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def publish(tmp: Path, dest: Path) -> None:
    """Move the finished `tmp` to `dest`; an existing `dest` is swapped out and removed.

    Without an atomic exchange the old export is parked at `.<name>.old-<pid>` between two renames, put back
    if the second fails, and (if the process dies there) put back by the next compile's `sweep`.
    """
    if not os.path.lexists(dest):
        os.rename(tmp, dest)
        return
    if exchange(tmp, dest):
        _remove(tmp)  # the old export, now under the temporary name
        return
    old = temp_path(dest, OLD)
    os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rename(old, dest)
        raise
    _remove(old)


class _SigtermGuard:
    """SIGTERM handler for the length of a compile: raises Terminated once; while publishing, only notes it."""

    def __init__(self) -> None:
        self.deferred = False
        self.pending = False
        self.fired = False

    def __call__(self, signum: int, frame: Any) -> None:
        if self.deferred:
            self.pending = True
        elif not self.fired:
            self.fired = True
            raise Terminated()


@contextmanager
def _sigterm_guard() -> Iterator[_SigtermGuard | None]:
    """Install a _SigtermGuard (main thread only) and restore the previous handler afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield None
        return
    guard = _SigtermGuard()
    previous = signal.signal(signal.SIGTERM, guard)
    try:
        yield guard
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@dataclass
class Staging:
    """A compile's temporary directory (`tmp`) and where it goes (`dest`)."""

    dest: Path
    tmp: Path
    force: bool
    key: str
    guard: _SigtermGuard | None

    def publish(self) -> None:
        """Check `dest` again (something may have appeared there during the compile), then publish.
        A SIGTERM during the swap takes effect after it."""
        check_destination(self.dest, self.force, self.key)
        if self.guard is not None:
            self.guard.deferred = True
        try:
            publish(self.tmp, self.dest)
        except OSError as e:
            raise RecipeError(self.key, f"cannot move the export into {self.dest}: {e.strerror or e}; {FIX}") from None
        finally:
            if self.guard is not None:
                self.guard.deferred = False
        if self.guard is not None and self.guard.pending:
            self.guard.fired = True
            raise Terminated(published=self.dest)


@contextmanager
def staging(dest: Path, force: bool, key: str, log: Callable[[str], None] | None = None) -> Iterator[Staging]:
    """Create `dest`'s parent and sweep its stale temporaries, then a fresh temporary directory beside it.
    Any exception (SIGTERM included) inside the block removes the temporary directory. `dest` comes from
    `check_destination`."""
    with _sigterm_guard() as guard:
        tmp = temp_path(dest, TMP)
        try:
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise RecipeError(key, f"cannot create {dest.parent}: {e.strerror or e}; {FIX}") from None
            sweep(dest, log)
            check_destination(dest, force, key)  # again: the sweep may have put a parked export back
            try:
                if os.path.lexists(tmp):
                    _remove(tmp)
                tmp.mkdir()
            except OSError as e:
                raise RecipeError(key, f"cannot create a directory in {dest.parent}: {e.strerror or e}; "
                                       f"{FIX}") from None
            yield Staging(dest, tmp, force, key, guard)
        except BaseException:
            if os.path.isdir(tmp) and not os.path.islink(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
            raise
