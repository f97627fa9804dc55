"""Output directories and publishing (tokcompile.outdir, tokcompile.publish): what --force may replace, the
atomic swap and its fallback, bad output paths as one-line errors, SIGTERM, and compiles killed at several
stages, which must leave the previous export byte-identical and their temporaries to the next compile's sweep.

Cheap tests call the functions, or compile_recipe with a stand-in for the compile itself. The kill tests run
real compiles (tiny FastV, eager target only) sharing one previous export."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tokcompile import outdir, pipeline, publish
from tokcompile.cli import main
from tokcompile.errors import RecipeError

RECIPE = ROOT / "recipes" / "tiny" / "fastv.yml"
MANIFEST = {"format_version": 2, "name": "x", "plan": {}, "graphs": {}}


def _export(path: Path, tag: str = "old") -> Path:
    """A directory that passes for an export: a manifest.json and one graph file saying `tag`."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "manifest.json").write_text(json.dumps({**MANIFEST, "name": tag}))
    (path / "graph.bin").write_text(tag)
    return path


def _tag(path: Path) -> str:
    return (path / "graph.bin").read_text()


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


# --- what an existing destination may be -------------------------------------------------------------------

def test_is_export(tmp_path):
    assert outdir.is_export(_export(tmp_path / "e"))
    for i, text in enumerate(["{}", "[1]", "not json", '{"format_version": 2}', '{"plan": {}}']):
        d = tmp_path / f"n{i}"
        d.mkdir()
        (d / "manifest.json").write_text(text)
        assert not outdir.is_export(d), text
    assert not outdir.is_export(tmp_path / "missing")


def test_check_destination(tmp_path):
    new = tmp_path / "new"
    assert outdir.check_destination(new, False, "--out") == new
    assert outdir.check_destination(_export(tmp_path / "e"), True, "--out") == tmp_path / "e"
    (tmp_path / "empty").mkdir()
    assert outdir.check_destination(tmp_path / "empty", True, "--out") == tmp_path / "empty"
    with pytest.raises(RecipeError, match=r"^--out: .*already exists; pass --force"):
        outdir.check_destination(tmp_path / "e", False, "--out")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(RecipeError, match=r"^save.save_path: .*does not hold a tokcompile export.*--force replaces "
                                          r"only an export or an empty directory"):
        outdir.check_destination(tmp_path / "mine", True, "save.save_path")
    (tmp_path / "f").write_text("x")
    with pytest.raises(RecipeError, match="is a file"):
        outdir.check_destination(tmp_path / "f", True, "--out")
    (tmp_path / "link").symlink_to(tmp_path / "e")
    with pytest.raises(RecipeError, match="symbolic link"):
        outdir.check_destination(tmp_path / "link", True, "--out")


def _fake_compile(tag: str = "new"):
    """A stand-in for pipeline._compile_into that writes an export tagged `tag` at once."""
    def compile_into(plan, tmp, log):
        _export(tmp, tag)
    return compile_into


def _recipe_saving_to(tmp_path: Path, save_path: Path) -> Path:
    text = RECIPE.read_text().replace("save: {save_path: exported/tiny_fastv}", f"save: {{save_path: '{save_path}'}}")
    assert str(save_path) in text
    path = tmp_path / "r.yml"
    path.write_text(text)
    return path


def test_force_refuses_a_directory_that_is_not_an_export(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pipeline, "_compile_into", _fake_compile())
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me")
    (mine / "sub" / "data.bin").write_bytes(b"\0\1")
    before = _tree_hashes(mine)
    for argv, key in [([str(RECIPE), "--out", str(mine)], "--out"),
                      ([str(_recipe_saving_to(tmp_path, mine))], "save.save_path")]:
        assert main([*argv, "--force"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith(f"error: {key}: ") and "not hold a tokcompile export" in err
    assert _tree_hashes(mine) == before and _hidden(tmp_path) == []


def test_force_replaces_an_empty_directory_and_an_export(tmp_path, monkeypatch):
    handler = signal.getsignal(signal.SIGTERM)
    (tmp_path / "empty").mkdir()
    _export(tmp_path / "exp", "old")
    (tmp_path / "exp" / "stale.onnx").write_text("from the old export")
    for name in ("empty", "exp"):
        monkeypatch.setattr(pipeline, "_compile_into", _fake_compile(f"new {name}"))
        assert pipeline.compile_recipe(RECIPE, out=tmp_path / name, force=True, log=lambda m: None) == tmp_path / name
        assert _tag(tmp_path / name) == f"new {name}"
    assert not (tmp_path / "exp" / "stale.onnx").exists()
    assert _hidden(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is handler  # the compile's SIGTERM handler is gone again


def test_something_appearing_during_the_compile_is_not_replaced(tmp_path, monkeypatch):
    dest = tmp_path / "exp"

    def compile_into(plan, tmp, log):
        _export(tmp, "new")
        dest.mkdir()
        (dest / "notes.txt").write_text("written meanwhile")

    monkeypatch.setattr(pipeline, "_compile_into", compile_into)
    with pytest.raises(RecipeError, match="does not hold a tokcompile export"):
        pipeline.compile_recipe(RECIPE, out=dest, force=True, log=lambda m: None)
    assert (dest / "notes.txt").read_text() == "written meanwhile" and _hidden(tmp_path) == []


# --- the swap -------------------------------------------------------------------------------------------------

def test_exchange_swaps_two_directories(tmp_path):
    a, b = _export(tmp_path / "a", "A"), _export(tmp_path / "b", "B")
    ino_a = a.stat().st_ino
    if not publish.exchange(a, b):
        pytest.skip("no renameat2(RENAME_EXCHANGE) here")
    assert _tag(a) == "B" and _tag(b) == "A" and b.stat().st_ino == ino_a


def test_publish_over_an_export_uses_the_exchange(tmp_path, monkeypatch):
    calls = []
    real = publish.exchange
    monkeypatch.setattr(publish, "exchange", lambda a, b: calls.append((a, b)) or real(a, b))
    dest, tmp = _export(tmp_path / "exp", "old"), _export(tmp_path / ".exp.tmp-1", "new")
    publish.publish(tmp, dest)
    assert calls == [(tmp, dest)] and _tag(dest) == "new" and _hidden(tmp_path) == []


@pytest.mark.parametrize("unavailable", ["no symbol", "EINVAL"])
def test_publish_falls_back_to_two_renames(tmp_path, monkeypatch, unavailable):
    if unavailable == "no symbol":
        monkeypatch.setattr(publish, "_renameat2", lambda: None)
    else:  # the filesystem refuses the flag
        def refuse(*args):
            ctypes.set_errno(errno.EINVAL)
            return -1

        monkeypatch.setattr(publish, "_renameat2", lambda: refuse)
    assert not publish.exchange(tmp_path / "a", tmp_path / "b")
    renames = []
    real_rename = os.rename
    monkeypatch.setattr(publish.os, "rename", lambda a, b: renames.append((Path(a).name, Path(b).name))
                        or real_rename(a, b))
    dest, tmp = _export(tmp_path / "exp", "old"), _export(tmp_path / ".exp.tmp-1", "new")
    publish.publish(tmp, dest)
    assert renames == [("exp", f".exp.old-{os.getpid()}"), (".exp.tmp-1", "exp")]
    assert _tag(dest) == "new" and _hidden(tmp_path) == []


def test_fallback_puts_the_old_export_back_when_the_second_rename_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(publish, "exchange", lambda a, b: False)
    real_rename = os.rename

    def rename(a, b):
        if Path(a).name.startswith(".exp.tmp-"):
            raise OSError(errno.EIO, "I/O error")
        real_rename(a, b)

    monkeypatch.setattr(publish.os, "rename", rename)
    dest, tmp = _export(tmp_path / "exp", "old"), _export(tmp_path / ".exp.tmp-1", "new")
    with pytest.raises(OSError):
        publish.publish(tmp, dest)
    assert _tag(dest) == "old" and _hidden(tmp_path) == [".exp.tmp-1"]


KILLED_PUBLISH = """
import os, signal, sys
from pathlib import Path
from tokcompile import publish
dest, tmp, where = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
die = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
if where == "after the exchange":
    publish._remove = die
else:  # between the fallback's two renames
    publish.exchange = lambda a, b: False
    real = os.rename
    publish.os.rename = lambda a, b: (real(a, b), die()) if Path(b).name.startswith(".exp.old-") else real(a, b)
publish.publish(tmp, dest)
"""


@pytest.mark.parametrize("where", ["after the exchange", "between the two renames"])
def test_a_publish_killed_midway_is_repaired_by_the_next_sweep(tmp_path, where):
    """SIGKILL inside publish: the destination holds one whole export, or (fallback, between its renames) none
    until the next compile's sweep puts the old one back; either way no temporary survives the sweep."""
    tmp_name = f".exp.tmp-{_dead_pid()}"
    dest, tmp = _export(tmp_path / "exp", "old"), _export(tmp_path / tmp_name, "new")
    before = _tree_hashes(dest)
    res = subprocess.run([sys.executable, "-c", KILLED_PUBLISH, str(dest), str(tmp), where], cwd=ROOT)
    assert res.returncode == -signal.SIGKILL
    if where == "after the exchange":
        assert _tag(dest) == "new" and _hidden(tmp_path) == [tmp_name]  # the old export, not yet removed
        assert publish.sweep(dest) == [tmp_name] and _tag(dest) == "new"
    else:
        parked = [n for n in _hidden(tmp_path) if n.startswith(".exp.old-")]
        assert not dest.exists() and len(parked) == 1 and _hidden(tmp_path) == sorted(parked + [tmp_name])
        assert publish.sweep(dest) == sorted(parked + [tmp_name])
        assert _tree_hashes(dest) == before
    assert _hidden(tmp_path) == []


# --- stale temporaries -----------------------------------------------------------------------------------------

def test_sweep_removes_only_dead_temporaries_of_that_destination(tmp_path, monkeypatch):
    dead, alive = _dead_pid(), os.getppid()
    dest = _export(tmp_path / "exp", "current")
    stale = [f".exp.tmp-{dead}", f".exp.old-{dead}"]
    kept = [f".exp.tmp-{alive}", f".exp.tmp-{dead}x", f".exp2.tmp-{dead}", f".other.tmp-{dead}", f"exp.tmp-{dead}",
            f".exp.new-{dead}", ".exp.tmp-"]
    for name in stale + kept:
        _export(tmp_path / name)
    (tmp_path / f".exp.tmp-{dead + 1}").write_text("a file, not a directory")
    real_alive = publish._alive
    monkeypatch.setattr(publish, "_alive", lambda pid: pid not in (dead, dead + 1) and real_alive(pid))
    logged = []
    assert publish.sweep(dest, logged.append) == sorted(stale + [f".exp.tmp-{dead + 1}"])
    assert len(logged) == 3 and _tag(dest) == "current"
    assert sorted(_hidden(tmp_path)) == sorted(n for n in kept if n.startswith("."))



def test_alive_treats_another_users_process_as_alive(monkeypatch):
    assert publish._alive(os.getpid()) and not publish._alive(_dead_pid())

    def eperm(pid, sig):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(publish.os, "kill", eperm)
    assert publish._alive(12345)


def test_sweep_restores_a_parked_export_when_the_destination_is_missing(tmp_path):
    dead = _dead_pid()
    parked = _export(tmp_path / f".exp.old-{dead}", "previous")
    before = _tree_hashes(parked)
    publish.sweep(tmp_path / "exp")
    assert _tree_hashes(tmp_path / "exp") == before and _hidden(tmp_path) == []


def test_a_compile_without_force_keeps_a_parked_export_it_put_back(tmp_path, monkeypatch):
    _export(tmp_path / f".exp.old-{_dead_pid()}", "previous")
    monkeypatch.setattr(pipeline, "_compile_into", _fake_compile())
    with pytest.raises(RecipeError, match="already exists; pass --force"):
        pipeline.compile_recipe(RECIPE, out=tmp_path / "exp", log=lambda m: None)
    assert _tag(tmp_path / "exp") == "previous" and _hidden(tmp_path) == []


def test_compile_sweeps_before_it_starts(tmp_path, monkeypatch):
    dead = _dead_pid()
    (tmp_path / f".exp.tmp-{dead}" / "processor").mkdir(parents=True)
    monkeypatch.setattr(pipeline, "_compile_into", _fake_compile())
    logs = []
    pipeline.compile_recipe(RECIPE, out=tmp_path / "exp", log=logs.append)
    assert _hidden(tmp_path) == [] and any(f".exp.tmp-{dead}" in m for m in logs)


# --- SIGTERM ----------------------------------------------------------------------------------------------------

def test_sigterm_during_the_compile_removes_the_temporary_directory(tmp_path, capsys, monkeypatch):
    handler = signal.getsignal(signal.SIGTERM)
    seen = []

    def compile_into(plan, tmp, log):
        seen.append(tmp)
        (tmp / "prefill.onnx").write_text("half written")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # interrupted by the handler's exception
        raise AssertionError("SIGTERM did not interrupt the compile")

    monkeypatch.setattr(pipeline, "_compile_into", compile_into)
    assert main([str(RECIPE), "--out", str(tmp_path / "exp")]) == 143
    assert capsys.readouterr().err == "error: terminated; nothing was published\n"
    assert not seen[0].exists() and list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is handler


def test_sigterm_while_publishing_takes_effect_after_the_swap(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "_compile_into", _fake_compile("new"))
    _export(tmp_path / "exp", "old")
    real = publish.publish

    def publish_with_sigterm(tmp, dest):
        os.kill(os.getpid(), signal.SIGTERM)
        real(tmp, dest)

    monkeypatch.setattr(publish, "publish", publish_with_sigterm)
    with pytest.raises(publish.Terminated, match="terminated after publishing"):
        pipeline.compile_recipe(RECIPE, out=tmp_path / "exp", force=True, log=lambda m: None)
    assert _tag(tmp_path / "exp") == "new" and _hidden(tmp_path) == []


# --- bad output paths ---------------------------------------------------------------------------------------------

BAD_PATHS = {  # --out as given ({tmp}: a directory holding cwd/, the current directory, and the file "file")
    ".": "is the current directory",
    "..": "is an ancestor of the current directory",
    "/": "is the root directory",
    "{tmp}/home": "is the home directory",
    "{tmp}/file/x": "is a file, not a directory",
    "{tmp}/file/x/y": "is a file, not a directory",
    "{tmp}/a\0b": "NUL byte",
    "{tmp}/" + "a" * 300: "300 bytes long",
    "{tmp}/" + "a" * 250: "can be at most",  # fits a file name, not with the temporary sibling's suffix
    "/proc/tokcompile-out": "cannot create a directory in /proc",
    "/proc/tokcompile/out": "cannot create /proc/tokcompile",
}


@pytest.mark.parametrize("path", BAD_PATHS, ids=[p.replace("\0", "NUL")[:24] for p in BAD_PATHS])
def test_a_bad_output_path_is_one_line(tmp_path, capsys, monkeypatch, path):
    """Exit 2 and one line naming --out, from a compile (before any weights load) and from --plan."""
    expect = BAD_PATHS[path]
    (tmp_path / "file").write_text("x")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    def no_compile(*a):
        raise AssertionError("weights loaded for a bad output path")

    monkeypatch.setattr(pipeline, "_compile_into", no_compile)
    for flag in ("--force", "--plan"):
        if flag == "--plan" and path.startswith("/proc/"):
            continue  # only creating it tells
        code = main([str(RECIPE), "--out", path.format(tmp=tmp_path), flag])
        err = capsys.readouterr().err.strip()
        assert code == 2, err
        assert err.count("\n") == 0 and err.startswith("error: --out: ") and expect in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "file"] and list((tmp_path / "cwd").iterdir()) == []


def test_a_bad_save_path_names_the_recipe_key(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(pipeline, "_compile_into", _fake_compile())
    assert main([str(_recipe_saving_to(tmp_path, tmp_path / "file" / "exp"))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: save.save_path: ") and "is a file" in err and err.count("\n") == 1


def test_a_bad_output_path_in_the_cli_process(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "compile.py"), str(RECIPE), "--out", "/proc/tokcompile-out",
                          "--targets", "eager"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: --out: ")


# --- real compiles killed --------------------------------------------------------------------------------------------

# One thread per compile: on a small shared runner this is faster than torch's default, and steadier.
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _compile_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-u", str(ROOT / "compile.py"), str(RECIPE), "--targets", "eager", "--out", str(out),
            *extra]


def _run_until(out: Path, marker: str, sig: int) -> tuple[subprocess.Popen, list[str], str]:
    """Recompile into `out` with --force, send `sig` once stdout shows the line `marker`; wait for the exit."""
    proc = subprocess.Popen(_compile_cmd(out, "--force"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=ENV)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if lines[-1] == marker:
                proc.send_signal(sig)
                break
        else:
            pytest.fail(f"the compile ended before {marker!r}: {lines} {proc.stderr.read()}")
        proc.stdout.read()
        err = proc.stderr.read()
        proc.wait(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    return proc, lines, err


@pytest.fixture(scope="module")
def previous_export(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """One real export, in a directory of its own, and the hash of each of its files."""
    out = tmp_path_factory.mktemp("publish") / "exp"
    res = subprocess.run(_compile_cmd(out), capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)
    assert res.returncode == 0, res.stderr + res.stdout
    return out, _tree_hashes(out)


def _assert_intact(out: Path, hashes: dict[str, str], load: bool = False) -> None:
    """Every file byte-identical; with `load`, also loadable by the runtime (seconds, so done once)."""
    assert _tree_hashes(out) == hashes
    if load:
        from tokcompile.runtime import load as load_export

        load_export(out, backend="eager", verify=True, trust_export=True)


@pytest.mark.parametrize("marker", ["[load] ...", "[export] ...", "[eager] ..."])
def test_sigkill_leaves_the_previous_export(previous_export, marker):
    """A --force recompile killed while loading, exporting or checking the eager target's parity: the
    previous export is untouched and loadable; the killed run's temporary directory remains for the next
    compile, whose sweep (see the next kill and the SIGTERM test) removes it."""
    out, hashes = previous_export
    proc, lines, _ = _run_until(out, marker, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    _assert_intact(out, hashes, load=marker == "[eager] ...")
    assert _hidden(out.parent) == [f".exp.tmp-{proc.pid}"]  # an earlier kill's leftover was swept


def test_sigterm_removes_the_temporary_directory(previous_export):
    """SIGTERM during the eager check (the processor is already written): exit 143, one line, no temporary
    directory; the run's sweep also removed a killed run's leftover."""
    out, hashes = previous_export
    dead = _dead_pid()
    (out.parent / f".exp.tmp-{dead}" / "processor").mkdir(parents=True)
    proc, lines, err = _run_until(out, "[eager check] ...", signal.SIGTERM)
    assert proc.returncode == 143
    assert err == "error: terminated; nothing was published\n"
    assert any(f".exp.tmp-{dead}" in ln for ln in lines)
    assert _hidden(out.parent) == []
    _assert_intact(out, hashes)
