"""Prompts as users write them: bare questions (wrapped in the chat template) and prompts formatted already with
the family's placeholder (used as is), for every family; processors without a chat template get the family's own
format; a prompt or processor failure names what failed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tokcompile.errors import RecipeError
from tokcompile.models import ADAPTERS
from tokcompile.models.tiny import FAMILIES, build_config, build_processor
from tokcompile.parity import format_prompt, make_inputs, process, random_images

QUESTION = "What is shown?"
# The tiny processors' chat templates with one image and QUESTION, as HF's examples write them.
FORMATTED = {
    "llava": "USER: <image>\nWhat is shown? ASSISTANT:",
    "llava_next": "[INST] <image>\nWhat is shown? [/INST]",
    "llava_onevision": "<|im_start|>user\n<image>\nWhat is shown?<|im_end|>\n<|im_start|>assistant\n",
    "qwen2_vl": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                "<|vision_start|><|image_pad|><|vision_end|>What is shown?<|im_end|>\n<|im_start|>assistant\n",
}
FORMATTED["qwen2_5_vl"] = FORMATTED["qwen3_vl"] = FORMATTED["qwen2_vl"]


def _case(family: str):
    adapter = ADAPTERS.get(family)()
    return adapter, adapter.geometry(build_config(family), None), build_processor(family)


def _images(geom, n: int = 1) -> list:
    return random_images(np.random.default_rng(0), n, geom.image_size)


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("family", FAMILIES)
def test_formatted_prompt_is_used_as_is(family):
    """A prompt holding the family's placeholder gives exactly the inputs of the bare question."""
    adapter, geom, proc = _case(family)
    prompt = FORMATTED[family]
    assert adapter.placeholder("image") in prompt
    assert format_prompt(proc, adapter, QUESTION) == prompt  # the tiny chat template writes exactly this
    for fmt in ("auto", "raw"):
        assert format_prompt(proc, adapter, prompt, prompt_format=fmt) == prompt
    bare = process(proc, adapter, geom, _images(geom), [QUESTION])
    _assert_same(process(proc, adapter, geom, _images(geom), [prompt]), bare)
    _assert_same(process(proc, adapter, geom, _images(geom), [prompt], prompt_format="raw"), bare)
    # a batch may mix both kinds
    mixed = process(proc, adapter, geom, _images(geom, 2), [prompt, QUESTION])
    assert torch.equal(mixed["input_ids"][0], mixed["input_ids"][1])


def test_qwen_video_placeholder():
    adapter = ADAPTERS.get("qwen2_5_vl")()
    assert adapter.placeholder("video") == "<|vision_start|><|video_pad|><|vision_end|>"
    assert ADAPTERS.get("llava_onevision")().placeholder("video") == "<video>"


def test_prompt_format_errors_name_the_prompt():
    adapter, geom, proc = _case("llava")
    with pytest.raises(RecipeError) as e:
        process(proc, adapter, geom, _images(geom), [QUESTION], prompt_format="raw", key="--prompt")
    assert e.value.key == "--prompt"
    assert "has no image placeholder <image>; add it where the image goes" in str(e.value)
    assert "--prompt-format auto or chat" in str(e.value)
    twice = "USER: <image>\n<image>\nWhat is shown? ASSISTANT:"
    for fmt in ("auto", "raw"):
        with pytest.raises(RecipeError, match="^--prompt: .* holds the image placeholder <image> 2 times, but each "
                                              "prompt takes one image; keep one$"):
            format_prompt(proc, adapter, twice, prompt_format=fmt, key="--prompt")
    with pytest.raises(RecipeError, match="^--prompt: .* which the chat template adds itself; remove it, or give "
                                          "the formatted prompt with --prompt-format raw$"):
        format_prompt(proc, adapter, FORMATTED["llava"], prompt_format="chat", key="--prompt")
    with pytest.raises(RecipeError, match="^--prompt-format: unknown prompt format 'plain'; use one of auto, chat, "
                                          "raw$"):
        format_prompt(proc, adapter, QUESTION, prompt_format="plain")
    assert "\n" not in str(e.value)  # a prompt is quoted on one line


@pytest.mark.parametrize("family", FAMILIES)
def test_fallback_prompt_without_chat_template(family):
    """Each family's own format where the processor has no chat template: the processor takes it."""
    adapter, geom, proc = _case(family)
    proc.chat_template = None
    prompt = format_prompt(proc, adapter, QUESTION)
    assert prompt == adapter.fallback_prompt(QUESTION) and adapter.placeholder() in prompt
    batch = process(proc, adapter, geom, _images(geom, 2), [QUESTION, "Hi?"])
    image_id = proc.tokenizer.convert_tokens_to_ids(proc.image_token)
    assert ((batch["input_ids"] == image_id).sum(1) == geom.n_image_tokens).all()


def test_qwen_checkpoint_without_chat_template(tmp_path):
    """A Qwen2.5-VL processor saved without its chat template reloads through the adapter and makes its parity
    inputs in Qwen's own format (it used to get LLaVA's `USER: <image>`, which the processor rejects)."""
    family = "qwen2_5_vl"
    adapter, geom, proc = _case(family)
    proc.save_pretrained(tmp_path)
    for f in tmp_path.glob("chat_template*"):
        f.unlink()
    for name in ("processor_config.json", "tokenizer_config.json"):
        if (tmp_path / name).is_file():
            cfg = json.loads((tmp_path / name).read_text())
            cfg.pop("chat_template", None)
            (tmp_path / name).write_text(json.dumps(cfg))
    loaded = adapter.load_processor(str(tmp_path))
    assert not getattr(loaded, "chat_template", None)
    assert format_prompt(loaded, adapter, QUESTION) == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is shown?<|im_end|>\n"
        "<|im_start|>assistant\n")
    inputs = make_inputs(loaded, adapter, geom, batch_size=2, samples=1, seed=0, max_len=256)
    image_id = loaded.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert ((inputs[0].batch["input_ids"] == image_id).sum(1) == geom.n_image_tokens).all()


def test_processor_failure_names_model_path():
    """A processor that rejects the parity prompts is reported as the checkpoint's processor's failure, not as a
    ValueError the compile would report under another key (inputs.max_prompt_len)."""
    adapter, geom, _ = _case("llava")
    qwen = build_processor("qwen2_5_vl")  # the wrong family's processor: no <image> token
    qwen.chat_template = None
    with pytest.raises(RecipeError) as e:
        make_inputs(qwen, adapter, geom, batch_size=2, samples=1, seed=0, max_len=256)
    assert e.value.key == "model.path"
    assert str(e.value).startswith("model.path: the processor could not process the prompt 'USER: <image>\\n")
    assert "are this model's" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(RecipeError, match="^--prompt: the processor could not process .*; check the image "
                                          "placeholders in the prompt, or choose its format with --prompt-format$"):
        process(qwen, adapter, geom, _images(geom), [QUESTION], key="--prompt")


# --- the runtime and `python -m tokcompile generate` on the demo export (tiny LLaVA) ----------------------------------


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> str:
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "img.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (40, 60, 3)).astype("uint8")).save(path)
    return str(path)


def test_runtime_takes_hf_formatted_prompts(demo_export, image_file):
    from tokcompile.runtime import load

    gen = load(demo_export, "eager", trust_export=True)
    prompt = FORMATTED["llava"]
    assert format_prompt(gen.processor, gen.adapter, QUESTION) == prompt  # so the token ids must be equal
    kw = {"max_new_tokens": 6, "stop_at_eos": False}
    bare = gen.generate([image_file], [QUESTION], **kw)
    for fmt in ("auto", "raw"):
        ans = gen.generate([image_file], [prompt], prompt_format=fmt, **kw)
        assert ans.token_ids == bare.token_ids and ans.kept == bare.kept, fmt
    assert gen.generate([image_file], [QUESTION], prompt_format="chat", **kw).token_ids == bare.token_ids
    mixed = gen.generate([image_file, image_file], [prompt, QUESTION], **kw)
    assert mixed.token_ids == bare.token_ids * 2
    with pytest.raises(RecipeError, match="^--prompt: the formatted prompt 'What is shown\\?' has no image "
                                          "placeholder <image>; add it"):
        gen.generate([image_file], [QUESTION], prompt_format="raw", **kw)
    with pytest.raises(RecipeError, match="^--prompt: .* adds itself"):
        gen.generate([image_file], [prompt], prompt_format="chat", **kw)


def test_cli_prompt_format(demo_export, image_file):
    import subprocess
    import sys

    from tests.conftest import ROOT

    def run(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "tokcompile", "generate", str(demo_export), "--image", image_file,
               "--backend", "eager", "--trust-export", "--max-new-tokens", "4", "--no-eos", *args]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)

    ok = run("--prompt", FORMATTED["llava"], "--prompt-format", "raw")
    assert ok.returncode == 0, ok.stderr
    from tokcompile.runtime import load

    want = load(demo_export, "eager", trust_export=True).generate([image_file], [QUESTION], max_new_tokens=4,
                                                                  stop_at_eos=False)
    assert ok.stdout == "".join(f"{t}\n" for t in want.texts)
    bad = run("--prompt", QUESTION, "--prompt-format", "raw")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert bad.stderr.startswith("error: --prompt: the formatted prompt 'What is shown?' has no image placeholder")
