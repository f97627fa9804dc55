"""A recipe fuzzer: mutants of the shipped recipes through `compile.py --plan`, in-process.

Every mutant must end with exit code 0 (it is still a valid recipe) or 2 with exactly one `error: <key or
file>: <message>` line on stderr. Anything else (an exception escaping `main`, a traceback, exit code 1, a
message spread over several lines or missing its key) is a finding.

    python -m tests.recipe_fuzzer --mutants 5000 --seed 1   # report counts and the first findings

Mutations work on the parsed recipe (delete, retype, rename, misplace or duplicate keys; values from a pool
of awkward ones) and on the YAML text (lines dropped, doubled or cut, anchors and aliases, stray bytes).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yml"))
ERROR_LINE = re.compile(r"^error: (?P<key>[^\s:].*?): \S")  # `error: <key or file>: <message>`

AWKWARD: list[Any] = [
    None, True, False, 0, 1, -1, 2, 3, 7, 64, 2**31, 2**63, -(2**63), 0.5, 1.0, -0.5, 1e-300, 1e308,
    float("nan"), float("inf"), "", " ", "x", "null", "true", "1e-4", "0x10", "4", "auto", "none", "RTN", "GPTQ",
    "FastV", "TokenReduction", "onnx", "int4", "cuda", "cuda:1", "cpu:0", "tiny-random:llava",
    "tiny-random:qwen2_vl@medium", "tiny-random:nope", ".", "/", "/dev/null", "/proc/self", "../../etc", "a\x00b",
    "é€😀", "x" * 5000, [], {},
    [1, 2], ["onnx", "onnx"], [64, 64], [0, 0], [-1, 32], {"a": 1}, {"method": "FastV"}, [[[[[[]]]]]],
]


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path of a nested mapping/list, to pick mutation sites from."""
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, prefix + (i,))
    return out


def _get(node: Any, path: tuple) -> Any:
    for k in path:
        node = node[k]
    return node


def _mutate_data(data: Any, rng: random.Random) -> Any:
    paths = [p for p in _paths(data) if p]
    if not paths:
        return rng.choice(AWKWARD)
    path = rng.choice(paths)
    parent, key = _get(data, path[:-1]), path[-1]
    op = rng.randrange(7)
    if op == 0:  # delete
        del parent[key]
    elif op == 1:  # awkward value
        parent[key] = rng.choice(AWKWARD)
    elif op == 2 and isinstance(parent, dict):  # misspelt key
        name = str(key)
        i = rng.randrange(len(name) + 1)
        parent[name[:i] + rng.choice("xe_") + name[i + 1:]] = parent.pop(key)
    elif op == 3:  # a value from elsewhere in the recipe
        parent[key] = copy.deepcopy(_get(data, rng.choice(paths)))
    elif op == 4:  # wrap the value in a list or a mapping
        parent[key] = rng.choice([[parent[key]], {"value": parent[key]}])
    elif op == 5 and isinstance(parent, dict):  # an unknown key beside it
        parent[rng.choice(["extra", "method", "special", "rate", "path", str(key).upper()])] = rng.choice(AWKWARD)
    else:  # the number or string next to it
        v = parent[key]
        if isinstance(v, bool):
            parent[key] = not v
        elif isinstance(v, int):
            parent[key] = v + rng.choice([-(v + 1), -1, 1, 10**6])
        elif isinstance(v, float):
            parent[key] = rng.choice([v * 10, -v, v + 1, str(v)])
        elif isinstance(v, str):
            parent[key] = rng.choice([v.upper(), v + v, v[: len(v) // 2], " " + v])
    return data


def _mutate_text(text: str, rng: random.Random) -> str:
    lines = text.splitlines()
    op = rng.randrange(6)
    i = rng.randrange(max(len(lines), 1))
    if op == 0 and lines:
        del lines[i]
    elif op == 1 and lines:
        lines.insert(i, lines[i])  # a duplicate key
    elif op == 2:
        return text[: rng.randrange(len(text) + 1)]
    elif op == 3 and lines:
        lines[i] = lines[i] + rng.choice([" &a", " *a", " !!python/none", " #", ":", " {", "\t", " ]", " ? x"])
    elif op == 4:
        depth = rng.choice([70, 3000])
        lines.append("eval: " + "[" * depth + "]" * depth)
    else:
        pos = rng.randrange(len(text) + 1)
        return text[:pos] + rng.choice(["\x00", "\x1b", "\ufeff", "é", "'", '"', "%", "@", "`", "|"]) + text[pos:]
    return "\n".join(lines) + "\n"


def mutant(rng: random.Random) -> tuple[str, str]:
    """(source recipe name, mutated YAML text)."""
    source = rng.choice(RECIPES)
    data = yaml.safe_load(source.read_text())
    for _ in range(rng.randint(1, 3)):
        data = _mutate_data(data, rng)
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    if rng.random() < 0.35:
        text = _mutate_text(text, rng)
    return source.name, text


@dataclass
class Report:
    mutants: int = 0
    exit_codes: Counter = field(default_factory=Counter)
    messages: Counter = field(default_factory=Counter)  # error lines with the recipe path and values masked
    findings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        codes = ", ".join(f"{'exception' if c is None else c}: {n}"
                          for c, n in sorted(self.exit_codes.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)))
        return (f"{self.mutants} mutants in {self.seconds:.1f}s; exit codes {{{codes}}}; "
                f"{len(self.messages)} distinct error messages; {len(self.findings)} findings")


def _shape(line: str, path: Path) -> str:
    """An error line with the mutant's path and quoted or numeric values masked, to count distinct messages."""
    line = line.replace(str(path), "<recipe>")
    line = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", line)
    return re.sub(r"-?\d[\d.e+-]*", "N", line)[:160]


def run_one(path: Path, text: str) -> tuple[int | None, str]:
    """(exit code or None when an exception escaped, stderr or the exception) of `--plan` on one mutant."""
    from tokcompile.cli import main

    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main([str(path), "--plan"])
    except SystemExit as e:  # argparse
        return (e.code if isinstance(e.code, int) else 2), err.getvalue()
    except BaseException as e:  # noqa: BLE001 - an escaping exception is exactly what the fuzzer looks for
        return None, f"{type(e).__name__}: {e}"[:500]
    return code, err.getvalue()


def check(code: int | None, stderr: str, path: Path) -> str | None:
    """What is wrong with one outcome, or None."""
    if code is None:
        return f"exception escaped: {stderr}"
    if "Traceback" in stderr:
        return "traceback on stderr"
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if not ln.startswith("warning: ")]
    if code == 0:
        return f"exit 0 with error output: {errors[0][:200]}" if errors else None
    if code != 2:
        return f"exit code {code}: {stderr[:200]}"
    if len(errors) != 1:
        return f"{len(errors)} error lines: {stderr[:300]}"
    if not ERROR_LINE.match(errors[0]):
        return f"error line names no key or file: {errors[0][:200]}"
    return None


def fuzz(n: int, seed: int, workdir: Path, report: Report | None = None) -> Report:
    rng = random.Random(seed)
    report = report or Report()
    path = workdir / "mutant.yml"
    start = time.perf_counter()
    for i in range(n):
        source, text = mutant(rng)
        code, stderr = run_one(path, text)
        report.mutants += 1
        report.exit_codes[code] += 1
        if code == 2 and stderr:
            last = [ln for ln in stderr.splitlines() if ln.startswith("error: ")]
            if last:
                report.messages[_shape(last[-1], path)] += 1
        problem = check(code, stderr, path)
        if problem is not None:
            report.findings.append(f"seed {seed} mutant {i} (from {source}): {problem}\n--- mutant ---\n{text[:800]}")
    report.seconds = time.perf_counter() - start
    return report


def _main() -> None:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mutants", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--show", type=int, default=5, help="findings to print")
    ap.add_argument("--messages", action="store_true", help="print every distinct error message with its count")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        report = fuzz(args.mutants, args.seed, Path(d))
    print(report.summary())
    if args.messages:
        for msg, count in report.messages.most_common():
            print(f"{count:6d}  {msg}")
    for f in report.findings[: args.show]:
        print("\n" + f)


if __name__ == "__main__":
    _main()
