"""Built-in trained models: `model.path: tiny-trained:<name>`, weights shipped with the package.

`tiny-trained:shapes` is the LLaVA-1.5 architecture of `tiny-random:llava@shapes` (CLIP tower, 256 image
tokens, Llama decoder) trained on the built-in `shapes` task by `tools/train_shapes.py`, so that accuracy
measured here means something. The weights are a safetensors file beside this module; its SHA-256 is checked
before it is read, and the config, tokenizer and image processor are the built-in ones of its family and size.
`python -m tokcompile save-model tiny-trained:shapes DIR` writes it as an ordinary Hugging Face directory.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from tokcompile.errors import RecipeError

TRAINED_PREFIX = "tiny-trained:"

# name -> (family, size, weights file beside this module, its SHA-256)
TRAINED: dict[str, tuple[str, str, str, str]] = {
    "shapes": ("llava", "shapes", "shapes.safetensors",
               "0a03557a8588e6073a0129709f7480d3ecfc4de579c1765f8474dd39e698b5b7"),
}


def is_trained(path: str) -> bool:
    return path.startswith(TRAINED_PREFIX)


def trained_name(path: str) -> str:
    return path[len(TRAINED_PREFIX):]


def family_and_size(path: str) -> tuple[str, str]:
    """"tiny-trained:shapes" -> ("llava", "shapes"); ("", "") for a name that is not built in."""
    entry = TRAINED.get(trained_name(path))
    return (entry[0], entry[1]) if entry else ("", "")


def weights_file(name: str) -> Path:
    return Path(__file__).with_name(TRAINED[name][2])


def load_state_dict(name: str) -> dict[str, Any]:
    """The trained weights, after their SHA-256 matches the one recorded here."""
    from safetensors.torch import load

    path = weights_file(name)
    key = f"{TRAINED_PREFIX}{name}"
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RecipeError("model.path", f"the weights of {key} ({path}) cannot be read ({e.strerror}); "
                                        "reinstall tokcompile") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != TRAINED[name][3]:
        raise RecipeError("model.path", f"the weights of {key} ({path}) do not match their recorded SHA-256 "
                                        f"(got {digest[:12]}…); reinstall tokcompile")
    return load(data)
