"""The recipe fuzzer in CI: at least 300 mutants of the shipped recipes through `--plan`, in-process.

Each run draws a new seed (printed with every finding, so a failure can be replayed with
`python -m tests.recipe_fuzzer --seed S --mutants N`); TOKCOMPILE_FUZZ_SEED and TOKCOMPILE_FUZZ_MUTANTS
override the draw and the count."""

from __future__ import annotations

import os
import random

from tests.recipe_fuzzer import RECIPES, check, fuzz, run_one


def test_fuzzer_detects_what_it_should(tmp_path):
    # the checks can fail: a traceback, two lines, a keyless line and an escaped exception are findings
    path = tmp_path / "r.yml"
    assert check(None, "KeyError: 'x'", path) is not None
    assert check(2, "error: a\nerror: b\n", path) is not None
    assert check(2, "error: something went wrong\n", path) is not None
    assert check(1, "error: parity: failed\n", path) is not None
    assert check(2, "warning: x: y\nerror: model.path: does not exist; fix it\n", path) is None
    code, err = run_one(path, "model: {path: 'tiny-random:llava'}\nsparse: {method: TokenReduction, special: "
                              "{method: FastV, rate: 2}}\n")
    assert code == 2 and "sparse.special.rate" in err and check(code, err, path) is None


def test_recipe_fuzzer_finds_no_traceback(tmp_path):
    assert len(RECIPES) >= 10
    seed = int(os.environ.get("TOKCOMPILE_FUZZ_SEED", random.SystemRandom().randrange(2**31)))
    n = max(300, int(os.environ.get("TOKCOMPILE_FUZZ_MUTANTS", 300)))
    report = fuzz(n, seed, tmp_path)
    print(f"seed {seed}: {report.summary()}")
    assert report.mutants == n
    assert report.exit_codes[2] > n // 2 and report.exit_codes[0] > 0  # the mutants reach both outcomes
    assert not report.findings, f"seed {seed}: {len(report.findings)} findings; first:\n{report.findings[0]}"
