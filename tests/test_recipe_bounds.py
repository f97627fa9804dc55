"""Bad recipes and checkpoints as an attacker or a careless user writes them: one line, exit 2, no traceback.

Alias bombs, deep nesting, duplicate keys, remote code without confirmation, a config.json that is not an
object, a config field of the wrong type, an empty --targets, and values long enough to flood a terminal."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tokcompile.cli import main
from tokcompile.errors import RecipeError, one_line
from tokcompile.recipe import load_recipe
from tokcompile.yaml_safe import MAX_EXPANDED_NODES, expanded_size, load_bounded

BASE = 'model: {path: "tiny-random:llava"}\n'


def _plan_error(tmp_path: Path, capsys, text: str, *extra: str) -> str:
    path = tmp_path / "r.yml"
    path.write_text(text)
    code = main([str(path), "--plan", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if not ln.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def _alias_bomb(depth: int) -> str:
    lines = ['l0: &l0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i in range(1, depth + 1):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_at_load_quickly(tmp_path, capsys):
    bomb = BASE + "eval:\n" + "".join("  " + line + "\n" for line in _alias_bomb(9).splitlines())
    assert len(bomb) < 1000
    start = time.perf_counter()
    err = _plan_error(tmp_path, capsys, bomb)
    assert time.perf_counter() - start < 5  # nothing was expanded (9**10 values would take gigabytes)
    assert "r.yml" in err and f"more than {MAX_EXPANDED_NODES} values" in err and "aliases" in err


def test_expanded_size_counts_shared_nodes_once_per_use():
    import yaml

    node = yaml.compose("a: &x [1, 2]\nb: [*x, *x]\n")
    size, depth = expanded_size(node)
    # mapping + 2 keys + a's list (3 nodes) + b's list (1 + 2 x 3) = 1 + 2 + 3 + 7
    assert (size, depth) == (13, 4)  # mapping, list, aliased list, scalar
    assert load_bounded("a: &x [1, 2]\nb: [*x, *x]\n") == {"a": [1, 2], "b": [[1, 2], [1, 2]]}


def test_recursive_alias_and_deep_nesting(tmp_path, capsys):
    assert "alias" in _plan_error(tmp_path, capsys, BASE + "eval: &e [*e]\n")
    assert "nests 71 levels deep" in _plan_error(tmp_path, capsys, BASE + "eval: " + "[" * 70 + "]" * 70 + "\n")
    # deep enough for the parser's own recursion limit
    assert "nest" in _plan_error(tmp_path, capsys, BASE + "eval: " + "[" * 5000 + "]" * 5000 + "\n")


def test_duplicate_keys_are_refused_with_their_name(tmp_path, capsys):
    text = BASE + "sparse:\n  method: TokenReduction\n  special: {method: FastV, rate: 0.5, rate: 0.9}\n"
    err = _plan_error(tmp_path, capsys, text)
    assert "key 'rate' is given twice" in err and "line 4" in err
    err = _plan_error(tmp_path, capsys, BASE + 'model: {path: "tiny-random:qwen2_vl"}\n')
    assert "key 'model' is given twice" in err
    # a YAML merge (<<) that a later key overrides is not a duplicate
    assert load_bounded("b: &b {k: 1, j: 2}\nc:\n  <<: *b\n  k: 3\n")["c"] == {"k": 3, "j": 2}


def test_oversized_recipe_file(tmp_path, capsys):
    err = _plan_error(tmp_path, capsys, BASE + "# " + "x" * (1 << 20) + "\n")
    assert "larger than 1024 KiB" in err


def test_trust_remote_code_needs_the_flag_and_warns(tmp_path, capsys):
    text = 'model: {path: "tiny-random:llava", trust_remote_code: true}\n'
    err = _plan_error(tmp_path, capsys, text)
    assert "model.trust_remote_code" in err and "--trust-remote-code" in err
    assert main([str(tmp_path / "r.yml"), "--plan", "--trust-remote-code"]) == 0
    captured = capsys.readouterr()
    assert "warning: model.trust_remote_code is on" in captured.err
    # the confirmation is needed before the checkpoint is even looked at
    with pytest.raises(RecipeError, match="model.trust_remote_code"):
        from tokcompile.pipeline import plan_recipe

        (tmp_path / "remote.yml").write_text('model: {path: "/nonexistent/ckpt", trust_remote_code: true}\n')
        plan_recipe(tmp_path / "remote.yml")


@pytest.mark.parametrize("config, expect", [
    ([1, 2], "holds a JSON list, not an object"),
    ({"model_type": "llava", "text_config": "abc"}, "text_config"),
    ({"model_type": "llava", "text_config": {"model_type": "llama", "hidden_size": "x"}}, "hidden_size"),
])
def test_bad_config_json(tmp_path, capsys, config, expect):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(config))
    (ckpt / "model.safetensors").write_bytes(b"")
    err = _plan_error(tmp_path, capsys, f'model: {{path: "{ckpt}"}}\n')
    assert "model.path" in err and expect in err


def test_empty_targets_flag(tmp_path, capsys):
    err = _plan_error(tmp_path, capsys, BASE, "--targets", " , ")
    assert err.startswith("error: --targets: is empty")


def test_long_values_are_cut_in_errors(tmp_path, capsys):
    err = _plan_error(tmp_path, capsys, 'model: {path: "/nonexistent/' + "x" * 100_000 + '"}\n')
    assert len(err) < 600 and "(100015 characters)" in err and "model.path" in err
    assert one_line("a\nb  c") == "a b c"


def test_recipe_loader_keeps_safe_load_semantics(tmp_path):
    # tags that build Python objects stay refused, as with yaml.safe_load
    path = tmp_path / "r.yml"
    path.write_text(BASE + "eval: !!python/object/apply:os.system [echo hi]\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)
