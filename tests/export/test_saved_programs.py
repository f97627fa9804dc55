"""Saved programs (the eager and torch_compile targets) run at every batch size they were exported for: on
Qwen2.5-VL, torch.export's save and load pin the decode graph's position-ids batch dimension to the example's 2,
and the loaded module's own input check then refused batch 1 (a traceback in the compile's generation check)."""

from __future__ import annotations

from tests.conftest import ROOT, compile_recipe


def test_qwen2_5_vl_eager_target_generates_at_batch_1_and_2(tmp_path):
    res = compile_recipe(ROOT / "recipes" / "tiny" / "qwen2_5_vl.yml", tmp_path / "out", "--targets", "eager")
    assert res.returncode == 0, res.stderr[-2000:] + res.stdout[-2000:]
    assert ("eager: vision, prefill and decode parity passed; greedy generation equals eager token for token "
            "(16 tokens, 2 cases, batch sizes [1, 2])") in res.stdout
