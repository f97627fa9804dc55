"""Loading configs, processors and weights: built-in tiny models or a local HF directory.

Only safe formats are read: `config.json` as JSON, weights from `*.safetensors` (a directory with only
pickled `*.bin` weights is refused), processor files through transformers. `trust_remote_code` stays off
unless the recipe sets `model.trust_remote_code: true`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokcompile.errors import RecipeError
from tokcompile.models import tiny
from tokcompile.models.registry import ADAPTERS
from tokcompile.models.tiny import trained

TORCH_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


def _dir(path: str) -> Path:
    try:
        p = Path(path).expanduser()
        exists = p.exists()
    except (OSError, ValueError) as e:  # a name too long, a NUL byte, no home directory...
        reason = getattr(e, "strerror", None) or str(e)
        raise RecipeError("model.path", f"'{path}' cannot be used as a path ({reason}); point it at a Hugging Face "
                                        "model directory") from None
    if not exists:
        raise RecipeError(
            "model.path",
            f"'{path}' does not exist; point it at a Hugging Face model directory (config.json and "
            f"*.safetensors) or use tiny-random:<family> ({', '.join(tiny.FAMILIES)})",
        )
    if not p.is_dir() or not (p / "config.json").is_file():
        raise RecipeError("model.path", f"'{path}' has no config.json; point it at a Hugging Face model directory")
    return p


def model_type_of(path: str) -> str:
    """The checkpoint's `model_type`, read from config.json as plain JSON (or the tiny family)."""
    if tiny.is_tiny(path):
        family = tiny.tiny_family(path)
        if family not in tiny.FAMILIES or tiny.tiny_size(path) not in tiny.sizes(family):
            sizes = tiny.sizes(family) if family in tiny.FAMILIES else ("medium",)
            raise RecipeError(
                "model.path", f"unknown built-in model '{path}'; use one of: "
                + ", ".join(tiny.TINY_PREFIX + f for f in tiny.FAMILIES)
                + f" (optionally with a size: @{', @'.join(sizes)}), or "
                + ", ".join(trained.TRAINED_PREFIX + n for n in trained.TRAINED)
            )
        return family
    p = _dir(path)
    try:
        data = json.loads((p / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise RecipeError("model.path", f"{p / 'config.json'} is not valid JSON ({e}); re-save it") from None
    if not isinstance(data, dict):
        raise RecipeError("model.path", f"{p / 'config.json'} holds a JSON {type(data).__name__}, not an object; "
                                        "a transformers config.json is a JSON object with a model_type")
    model_type = data.get("model_type")
    if not isinstance(model_type, str):
        raise RecipeError("model.path", f"{p / 'config.json'} has no model_type; is this a transformers checkpoint?")
    return model_type


def check_weights_present(path: str) -> Path:
    """A checkpoint directory must hold safetensors weights; pickled `*.bin`/`*.pt` are never loaded."""
    p = _dir(path)
    if not any(p.glob("*.safetensors")):
        pickled = [f.name for f in p.glob("*.bin")] + [f.name for f in p.glob("*.pt")]
        hint = " (found pickled weights: convert them to safetensors first)" if pickled else ""
        raise RecipeError("model.path", f"'{path}' has no *.safetensors weights{hint}")
    return p


def load_config(path: str, trust_remote_code: bool) -> Any:
    if tiny.is_tiny(path):
        return tiny.build_config(tiny.tiny_family(path), tiny.tiny_size(path))
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(_dir(path)), trust_remote_code=trust_remote_code, local_files_only=True)
    except RecipeError:
        raise
    except Exception as e:  # transformers validates config fields with several exception types
        raise RecipeError("model.path", f"could not read the config in '{path}': {_first_line(e, 2)}; fix "
                                        "config.json") from None


def load_processor(path: str, trust_remote_code: bool) -> Any:
    """The model's processor (tokenizer and image processor), through the family adapter. PIL image
    processors are used when torchvision is missing."""
    if tiny.is_tiny(path):
        return tiny.build_processor(tiny.tiny_family(path), tiny.tiny_size(path))
    adapter = ADAPTERS.get(model_type_of(path))()
    try:
        return adapter.load_processor(str(_dir(path)), trust_remote_code)
    except RecipeError:
        raise
    except Exception as e:  # tokenizer and image-processor files fail in many ways
        raise RecipeError(
            "model.path",
            f"could not load the processor from '{path}' ({_first_line(e)}); the directory needs its tokenizer "
            "and preprocessor_config.json",
        ) from None


def resolve_dtype(torch_dtype: str, config: Any) -> str:
    if torch_dtype != "auto":
        return torch_dtype
    found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(found).replace("torch.", "") if found is not None else "float32"
    return name if name in TORCH_DTYPES else "float32"


def load_model(path: str, config: Any, seed: int, trust_remote_code: bool) -> Any:
    """Load weights in float32 with SDPA attention, in eval mode. Quantization runs on them in float32; a half
    precision export (`Plan.dtype`) casts the model afterwards, before the graphs are built."""
    import torch

    family = model_type_of(path)
    if tiny.is_tiny(path):
        return tiny.build_from_path(path, seed=seed)
    p = check_weights_present(path)
    import transformers

    adapter = ADAPTERS.get(family)
    cls = getattr(transformers, adapter.model_class_name)
    try:
        model = cls.from_pretrained(
            str(p),
            config=config,
            dtype=torch.float32,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            attn_implementation="sdpa",
            local_files_only=True,
        )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise RecipeError("model.path", f"could not load the weights in '{path}': {_first_line(e)}") from None
    return model.eval()


def _first_line(e: BaseException, n: int = 1) -> str:
    """The first `n` non-empty lines of an exception's message, joined on one line."""
    text = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return " ".join(text[:n]) if text else type(e).__name__
