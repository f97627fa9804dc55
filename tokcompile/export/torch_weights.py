"""One copy of the weights for the PyTorch targets (`eager`, `torch_compile`, `aoti`): `weights.safetensors`.

Every program of a compile comes from the same module, so a parameter, buffer or lifted constant has one name in
all of them (`model.lm_head.weight`). `WeightFile.add(tensors)` puts a program's tensors into the export's single
safetensors file under those names; a name two programs share is stored once, after checking that both hold the
same values. Tensors that alias each other (tied embeddings) are stored once and the other names recorded in the
file's metadata. The graph files themselves then carry no weights: the saved programs hold one-element
placeholders (`eager.py`), the AOTInductor package is compiled with its constants outside the shared library
(`aoti.py`).

At run time `shared_tensors` reads the file once per loaded export (kept in the runtime's `shared` dict) and every
graph is bound to those tensors, so the vision, prefill and decode graphs hold one copy of the weights in memory.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokcompile.errors import ExportError
from tokcompile.export.base import runtime_device

WEIGHTS_FILE = "weights.safetensors"
ALIASES = "aliases"  # metadata key: JSON {alias name: stored name}
SHARED_KEY = "torch_weights"  # in the runtime's per-export `shared` dict (with the file name): name -> tensor


def weight_file(shared: dict, out_dir: Path) -> WeightFile:
    """The compile's weight file for one target (`ExportRequest.shared`), opened on its first graph."""
    if "torch_weight_file" not in shared:
        shared["torch_weight_file"] = WeightFile(out_dir)
    return shared["torch_weight_file"]


# Names the exporter makes up for tensors a forward creates (`lifted_tensor_0`, ...): numbered per program, so the
# same name means different tensors in two graphs. The weight file keeps them under "<graph>:<name>".
_PER_PROGRAM = re.compile(r"(lifted_tensor|_tensor_constant)_?\d+")


def file_key(graph: str, name: str) -> str:
    """Where a program's tensor `name` lives in the weight file: its module name, or "<graph>:<name>" for a
    constant the exporter named per program."""
    return f"{graph}:{name}" if _PER_PROGRAM.fullmatch(name) else name


def program_tensors(program: Any, graph: str) -> dict[str, Any]:
    """A `torch.export` program's parameters, buffers and tensor constants, by their weight-file keys."""
    import torch

    out = dict(program.state_dict)
    out.update({file_key(graph, k): v for k, v in program.constants.items() if isinstance(v, torch.Tensor)})
    return out


def _identity(t: Any) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


@dataclass
class WeightFile:
    """The export's weight file while graphs are added. Entries a file already held when opened (an earlier
    target of the same compile wrote it) are kept; names added through this object must agree with each other."""

    root: Path
    name: str = WEIGHTS_FILE
    tensors: dict[str, Any] = field(default_factory=dict)  # stored name -> tensor (contiguous, own storage)
    aliases: dict[str, str] = field(default_factory=dict)  # alias -> stored name
    added: set[str] = field(default_factory=set)  # names added through this object

    def __post_init__(self) -> None:
        if self.path.is_file():
            self.tensors, self.aliases = _read(self.path)

    @property
    def path(self) -> Path:
        return self.root / self.name

    def add(self, tensors: dict[str, Any], graph: str) -> dict[str, int]:
        """Store `graph`'s tensors; rewrites the file only when something is new. Returns this graph's counts."""
        import torch

        changed, counts = False, {"tensors": len(tensors), "bytes": 0, "new_bytes": 0}
        seen: dict[tuple, str] = {}  # identity of a tensor of this graph -> the name it is stored under
        for name, t in tensors.items():
            t = t.detach()
            counts["bytes"] += t.numel() * t.element_size()
            ident = _identity(t)
            if seen.get(ident, name) != name:  # the same tensor under a second name (tied weights)
                changed |= self.aliases.get(name) != seen[ident]
                self.aliases[name] = seen[ident]
                if name not in self.aliases.values():  # no other name resolves to it
                    self.tensors.pop(name, None)
            else:
                have = self._get(name)
                same = have is not None and (_identity(have) == ident or (  # a file's tensors are on the host
                    have.dtype == t.dtype and have.shape == t.shape and torch.equal(have, t.to(have.device))))
                if name in self.added and not same:
                    raise ExportError(f"the {graph} graph's weight '{name}' differs from the one an earlier graph "
                                      "stored under that name; export all graphs from one module")
                if not same:
                    self.tensors[name] = _own(t)
                    self.aliases.pop(name, None)
                    counts["new_bytes"] += t.numel() * t.element_size()
                    changed = True
                seen[ident] = self.aliases.get(name, name)
            self.added.add(name)
        if changed or not self.path.is_file():
            self._write()
        return counts

    def _get(self, name: str) -> Any:
        return self.tensors.get(self.aliases.get(name, name))

    def _write(self) -> None:
        from safetensors.torch import save_file

        tmp = self.path.with_name(f".{self.name}.tmp")
        save_file(self.tensors, str(tmp), metadata={ALIASES: json.dumps(self.aliases, sort_keys=True)})
        os.chmod(tmp, self.root.stat().st_mode & 0o666)  # safetensors writes 0600; read as the directory's files
        os.replace(tmp, self.path)  # graphs loaded already keep reading the old file's tensors


def _own(t: Any) -> Any:
    """`t` contiguous in a storage of its own (safetensors refuses tensors that share memory)."""
    c = t.contiguous()
    whole = c.storage_offset() == 0 and c.untyped_storage().nbytes() == c.numel() * c.element_size()
    return c if whole else c.clone()


def _read(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    aliases = json.loads(meta.get(ALIASES, "{}"))
    return tensors, aliases


def shared_tensors(root: Path, shared: dict | None, file: str = WEIGHTS_FILE) -> dict[str, Any]:
    """The export's weights by name (aliases included), read once per loaded export and kept in `shared`, on the
    device `shared["device"]` names (the host by default)."""
    key = f"{SHARED_KEY}:{file}"
    if shared is not None and key in shared:
        return shared[key]
    path = root / file
    if not path.is_file():
        raise ExportError(f"{path}: is missing; the export is incomplete, recompile it")
    tensors, aliases = _read(path)
    device = runtime_device(shared)  # the runtime's device: each stored tensor moved there once
    tensors = {name: t.to(device) for name, t in tensors.items()}
    missing = sorted(set(aliases.values()) - set(tensors))
    if missing:
        raise ExportError(f"{path}: alias target '{missing[0]}' is not stored; the file is damaged, recompile")
    tensors.update({alias: tensors[target] for alias, target in aliases.items()})
    if shared is not None:
        shared[key] = tensors
    return tensors


def pick(tensors: dict[str, Any], names: list[str], path: Path, graph: str) -> dict[str, Any]:
    """The tensor for every name `graph` needs, by that name; one line naming the first one missing."""
    missing = [n for n in names if file_key(graph, n) not in tensors]
    if missing:
        raise ExportError(f"{path}: has no weight '{file_key(graph, missing[0])}' ({len(missing)} missing); "
                          "recompile the export")
    return {n: tensors[file_key(graph, n)] for n in names}
