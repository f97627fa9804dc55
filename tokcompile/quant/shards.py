"""A checkpoint's safetensors shards, read and written one group of tensors at a time.

`CheckpointShards` knows which file holds each checkpoint key (from `model.safetensors.index.json`, or by
opening every `*.safetensors` file's header) and reads only the tensors asked for. `names_in_model` maps the
checkpoint's keys to the model's parameter names the way transformers' loader renames them (LLaVA
checkpoints keep their original `language_model.model...` keys, the model says `model.language_model...`).
`ShardWriter` writes tensors as they come, one file per call, and names the files and the index at the end.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tokcompile.errors import RecipeError


class CheckpointShards:
    """The safetensors files of a checkpoint directory."""

    def __init__(self, directory: str | Path):
        from safetensors import safe_open

        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise RecipeError("model.path", f"{index} is not a safetensors index ({e}); re-save the "
                                                "checkpoint") from None
            self.file_of = {k: self.directory / f for k, f in weight_map.items()}
        else:
            self.file_of = {}
            for f in sorted(self.directory.glob("*.safetensors")):
                with safe_open(str(f), "pt") as s:
                    self.file_of.update({k: f for k in s.keys()})
        if not self.file_of:
            raise RecipeError("model.path", f"'{directory}' has no *.safetensors weights")
        self.dtype_of: dict[str, torch.dtype] = {}

    @property
    def keys(self) -> list[str]:
        return list(self.file_of)

    def read(self, keys: Iterable[str], dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """The tensors of `keys`, each its own copy (in `dtype` if given). The file is opened for one tensor at a
        time, so its mapped pages never count for more than that tensor in the process's memory."""
        from safetensors import safe_open

        out = {}
        for k in keys:
            with safe_open(str(self.file_of[k]), "pt") as s:
                t = s.get_tensor(k)
                self.dtype_of[k] = t.dtype
                out[k] = t.to(dtype) if dtype is not None and t.dtype != dtype else t.clone()
            del t
        return out


def names_in_model(model: Any, keys: Iterable[str]) -> dict[str, str]:
    """{checkpoint key: the model's parameter or buffer name} as transformers' loader renames them.

    A checkpoint whose tensors the loader fuses or splits (a weight converter) cannot be streamed one key at a
    time: that is one error line."""
    keys = list(keys)
    state = model.state_dict()
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:  # an older transformers: the checkpoint's names are the model's
        return {k: k for k in keys if k in state}
    transforms = get_model_conversion_mapping(model)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    out = {}
    for k in keys:
        name, converted = rename_source_key(k, renamings, converters, model.base_model_prefix, state)
        if converted is not None:
            raise RecipeError("model.path", f"transformers converts the checkpoint tensor {k} when it loads "
                                            "(fused or split weights), which a layer-by-layer load cannot do; "
                                            "quantize inside the compile instead")
        if name in state:
            out[k] = name
    return out


class ShardWriter:
    """Safetensors files written one at a time into `directory`, then named `model-0000i-of-0000n` with an
    index, as `save_pretrained` lays out a sharded checkpoint."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.parts: list[tuple[Path, list[str]]] = []
        self.total_size = 0

    def write(self, tensors: dict[str, Tensor]) -> None:
        from safetensors.torch import save_file

        if not tensors:
            return
        path = self.directory / f"part-{len(self.parts):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
        self.parts.append((path, list(tensors)))
        self.total_size += sum(v.numel() * v.element_size() for v in tensors.values())

    def finish(self) -> None:
        n = len(self.parts)
        weight_map = {}
        for i, (path, keys) in enumerate(self.parts):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(path, self.directory / name)
            weight_map.update({k: name for k in keys})
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
