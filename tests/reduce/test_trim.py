"""Static TRIM against the independent reference written the way the official code runs (tiny LLaVA, padded
batch of two, a real CLIP checkpoint directory), the IQR count padded to slots, plan errors, the question as a
vision-graph input through compile and runtime, and one full compile."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import (
    PADDED_QUESTIONS,
    ROOT,
    assert_no_data_dependent_ops,
    compile_recipe,
    export_matching_eager,
    padded_family_case,
)
from tests.references.trim import trim_reference
from tokcompile.errors import RecipeError
from tokcompile.models import ReducedVLM
from tokcompile.question import QuestionTokenizer
from tokcompile.reduce.base import Entering, config_from_params
from tokcompile.reduce.schedule import Output, Site
from tokcompile.reduce.trim import TRIMConfig, iqr_counts, outlier_count_table, percentile

KEY = "sparse.special"
TINY = "tiny-random:clip@32"


@pytest.fixture(scope="module")
def case():
    return padded_family_case("llava")


def _run(case, cfg: TRIMConfig, batch: dict | None = None, questions=PADDED_QUESTIONS):
    (step,) = cfg.plan(case.geom, KEY, Entering.start_for(case.geom, case.adapter))
    vlm = ReducedVLM(case.model, case.adapter, case.geom, (step,), (cfg,), case.image_id).eval()
    feed = dict(case.batch if batch is None else batch)
    feed.update(QuestionTokenizer.load(cfg.question(KEY))(list(questions)))
    with torch.no_grad():
        return vlm.run(feed), step, vlm, feed


def _selected(assign: torch.Tensor, n_out: int) -> list[int]:
    """Patch indices (CLS excluded) the assignment gives their own slot."""
    slots = assign[1:]
    return [i for i, s in enumerate(slots.tolist()) if 1 <= s < n_out - 1]


# --- the static version equals the reference -----------------------------------------------------------------------


@pytest.mark.parametrize(("keep_ratio", "sign", "max_tokens"), [(-1.0, "code", 16), (0.25, "code", 0),
                                                                (0.5, "paper", 0), (-1.0, "paper", 20)])
def test_static_trim_equals_the_reference(case, clip_dir, keep_ratio, sign, max_tokens):
    cfg = TRIMConfig(text_encoder=clip_dir, keep_ratio=keep_ratio, max_tokens=max_tokens, sign=sign)
    out, step, _, _ = _run(case, cfg)
    assert out["assign_0"].shape == (2, 65) and out["image_embeds"].shape[1] == step.n_out - 1
    worst = 0.0
    for b in range(2):
        sample = case.adapter.sample_inputs(case.batch, b, case.geom)
        ref_logits, ref_sel, n = trim_reference(case.model, clip_dir, sample, PADDED_QUESTIONS[b], case.image_id,
                                                keep_ratio, sign=sign, max_tokens=max_tokens or None)
        assert _selected(out["assign_0"][b], step.n_out) == ref_sel and len(ref_sel) == n
        used = int((out["image_source"][b] >= 0).sum())
        assert used == n + 1  # n patches and the aggregated token; the other slots are unused
        torch.testing.assert_close(out["logits"][b], ref_logits, atol=1e-5, rtol=1e-5)
        worst = max(worst, (out["logits"][b] - ref_logits).abs().max().item())
    print(f"TRIM keep_ratio {keep_ratio} sign {sign}: max |dlogit| vs reference {worst:.2e}")


def test_the_built_in_tiny_clip_equals_its_saved_directory(case, clip_dir):
    a, _, _, _ = _run(case, TRIMConfig(text_encoder=TINY))
    b, _, _, _ = _run(case, TRIMConfig(text_encoder=clip_dir))
    assert torch.equal(a["assign_0"], b["assign_0"])
    torch.testing.assert_close(a["logits"], b["logits"], atol=0, rtol=0)


def test_an_iqr_count_above_max_tokens_warns_and_drops_the_excess_by_score(case, clip_dir):
    cfg = TRIMConfig(text_encoder=clip_dir, max_tokens=3)
    with pytest.warns(UserWarning, match="more than max_tokens 3"):
        out, step, _, _ = _run(case, cfg)
    for b in range(2):
        sample = case.adapter.sample_inputs(case.batch, b, case.geom)
        ref_logits, ref_sel, n = trim_reference(case.model, clip_dir, sample, PADDED_QUESTIONS[b], case.image_id,
                                                -1.0, max_tokens=3)
        assert n == 3 and _selected(out["assign_0"][b], step.n_out) == ref_sel
        torch.testing.assert_close(out["logits"][b], ref_logits, atol=1e-5, rtol=1e-5)


def test_the_question_decides_the_selection(case):
    cfg = TRIMConfig(text_encoder=TINY, keep_ratio=0.25)
    a, _, _, _ = _run(case, cfg, questions=["a red square on the left", "Hi?"])
    b, _, _, _ = _run(case, cfg, questions=["how many blue circles are there", "Hi?"])
    assert not torch.equal(a["assign_0"][0], b["assign_0"][0])
    assert torch.equal(a["assign_0"][1], b["assign_0"][1])  # every sample reads its own question


def test_quartiles_match_numpy_bit_for_bit():
    rng = np.random.default_rng(0)
    for P in (64, 576, 37):
        x = rng.random((3, P)).astype(np.float32) ** 3
        s = torch.from_numpy(np.sort(x, axis=1))
        for q in (25, 75):
            assert np.array_equal(percentile(s, q).numpy(), np.percentile(x, q, axis=1).astype(np.float32))
        want = [int((row > np.percentile(row, 75) + 1.5 * (np.percentile(row, 75) - np.percentile(row, 25))).sum())
                for row in x]
        assert iqr_counts(torch.from_numpy(x)).tolist() == want
    table = outlier_count_table(576)
    assert table[0] == 0 and len(table) == 577 and all(abs(t - c) <= 1 for c, t in enumerate(table))


# --- plan ----------------------------------------------------------------------------------------------------------


def test_plan_counts(case):
    ent = Entering.start_for(case.geom, case.adapter)
    (iqr,) = TRIMConfig(text_encoder=TINY).plan(case.geom, KEY, ent)
    assert (iqr.site, iqr.n_in, iqr.n_out, iqr.output, iqr.question) == (Site.VISION_OUT, 65, 18, Output.ASSIGN, True)
    (fixed,) = TRIMConfig(text_encoder=TINY, keep_ratio=0.21).plan(case.geom, KEY, ent)
    assert fixed.n_out == 1 + int(64 * 0.21) + 1


@pytest.mark.parametrize(
    ("params", "key", "text"),
    [
        ({}, "sparse.special.text_encoder", "needs CLIP's text tower"),
        ({"text_encoder": "tiny-random:clip@16"}, "sparse.special.text_encoder", "takes 16-wide features"),
        ({"text_encoder": "tiny-random:clip"}, "sparse.special.text_encoder", "needs the vision width"),
        ({"text_encoder": "/nonexistent/clip"}, "sparse.special.text_encoder", "is not a directory"),
        ({"text_encoder": TINY, "sign": "minus"}, "sparse.special.sign", "not one of code, paper"),
        ({"text_encoder": TINY, "keep_ratio": 1.5}, "sparse.special.keep_ratio", "neither -1"),
        ({"text_encoder": TINY, "keep_ratio": 0.01}, "sparse.special.keep_ratio", "keeps 0 of 64"),
        ({"text_encoder": TINY, "keep_ratio": 0.5, "max_tokens": 8}, "sparse.special.max_tokens", "only the IQR"),
        ({"text_encoder": TINY, "max_tokens": 63}, "sparse.special.max_tokens", "outside [1, 62]"),
    ],
)
def test_plan_errors_name_the_key(case, params, key, text):
    with pytest.raises(RecipeError) as e:
        config_from_params(TRIMConfig, params, KEY).plan(case.geom, KEY, Entering.start_for(case.geom, case.adapter))
    assert e.value.key == key and text in str(e.value)


def test_a_directory_without_safetensors_is_refused(case, tmp_path, clip_dir):
    for name in ("config.json", "tokenizer.json"):
        (tmp_path / name).write_bytes((Path(clip_dir) / name).read_bytes())
    with pytest.raises(RecipeError) as e:
        TRIMConfig(text_encoder=str(tmp_path)).plan(case.geom, KEY, Entering.start_for(case.geom, case.adapter))
    assert "no .safetensors weights" in str(e.value)
    (tmp_path / "model.safetensors").write_bytes((Path(clip_dir) / "model.safetensors").read_bytes())
    TRIMConfig(text_encoder=str(tmp_path)).plan(case.geom, KEY, Entering.start_for(case.geom, case.adapter))


def test_a_question_longer_than_the_windows_names_the_key():
    cfg = TRIMConfig(text_encoder=TINY)
    spec = cfg.question(KEY)
    untruncated = QuestionTokenizer(type(spec)(**{**spec.to_dict(), "truncate": False}),
                                    QuestionTokenizer.load(spec).tokenizer)
    with pytest.raises(RecipeError) as e:
        untruncated(["word " * 40])
    assert e.value.key == "--prompt" and "sparse.special.text_segments" in str(e.value)
    ids = QuestionTokenizer.load(spec)(["word " * 40, "Hi?"])  # TRIM truncates as CLIP's tokenizer does
    assert ids["question_ids"].shape == (2, 1, 77) and int(ids["question_mask"][0].sum()) == 77
    assert int(ids["question_ids"][0, 0, 76]) == 257  # the end token survives truncation


def test_vision_graph_exports_with_no_data_dependent_ops(case):
    out, step, vlm, feed = _run(case, TRIMConfig(text_encoder=TINY))
    args = tuple(feed[n] for n in vlm.vision.input_names)
    assert vlm.vision.input_names[-2:] == ["question_ids", "question_mask"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the eager-only overflow check never runs under export
        ep = export_matching_eager(vlm.vision, args, exact=False)
    assert_no_data_dependent_ops(ep)


# --- compile and runtime -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trim_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("trim") / "out"
    res = compile_recipe(ROOT / "recipes/tiny/trim.yml", out)
    assert res.returncode == 0, res.stderr + res.stdout
    return out, res


def test_tiny_recipe_compiles_to_onnx_and_aoti_with_parity(trim_export):
    out, res = trim_export
    assert res.stdout.count("parity passed") == 2, res.stdout
    print(res.stdout[-2000:])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["plan"]["question"]["directory"] == TINY
    assert manifest["graphs"]["vision"]["inputs"][-1]["name"] == "question_mask"
    assert (out / "question_tokenizer" / "tokenizer.json").is_file()


def test_runtime_reads_the_question_from_the_prompt(trim_export):
    from tokcompile.runtime import load

    out, _ = trim_export
    gen = load(out)
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]
    answers = gen.generate(images, ["What is red here?", "USER: <image>\nHow many circles? ASSISTANT:"],
                           max_new_tokens=3)
    assert len(answers.texts) == 2
    feed = gen._batch(images[:1], ["What is red here?"], "auto")
    assert feed["question_ids"].shape == (1, 1, 77)
    raw = gen._batch(images[:1], ["USER: <image>\nHow many circles? ASSISTANT:"], "auto")
    want = QuestionTokenizer.load(TRIMConfig(text_encoder=TINY).question(KEY))(
        ["USER:  \nHow many circles? ASSISTANT:"])
    assert torch.equal(raw["question_ids"], want["question_ids"])  # placeholder replaced by a space
