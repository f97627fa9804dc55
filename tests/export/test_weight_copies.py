"""One copy of the weights for the PyTorch targets: the weight file, programs saved without weights and bound to
it at load, and the demo export's bytes for `eager` and `aoti` (ONNX: test_onnx_weights.py)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from tokcompile.errors import ExportError
from tokcompile.export.base import ExportRequest
from tokcompile.export.eager import _load, export_eager, load_module
from tokcompile.export.torch_weights import WEIGHTS_FILE, WeightFile, shared_tensors

GRAPHS = ("vision", "prefill", "decode")


class Tied(nn.Module):
    """Two heads over one body, a tied output matrix, a non-persistent buffer and a lifted tensor constant."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.body = nn.Linear(8, 8)
        self.out = nn.Linear(8, 16, bias=False)
        self.out.weight = self.embed.weight  # tied: one storage under two names
        self.register_buffer("scale", torch.full((8,), 0.5), persistent=False)
        self.offset = torch.arange(8.0)  # a plain tensor attribute: export lifts it as a constant

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor]:
        h = self.body(self.embed(ids)) * self.scale + self.offset  # (B, T, 8)
        return (self.out(h),)  # (B, T, 16): graphs return tuples


class Head(nn.Module):
    """A second program over the same modules under the same names (as prefill and decode share the decoder)."""

    def __init__(self, m: Tied) -> None:
        super().__init__()
        self.embed, self.body, self.out = m.embed, m.body, m.out
        self.register_buffer("scale", m.scale, persistent=False)
        self.offset = m.offset

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor]:
        return (Tied.forward(self, ids)[0].softmax(-1),)  # (B, T, 16)


def test_programs_share_one_weight_file_and_one_copy_in_memory(tmp_path):
    torch.manual_seed(0)
    model = Tied().eval()
    ids = torch.randint(0, 16, (2, 5))
    shared: dict = {}
    arts = {}
    for name, module in (("first", model), ("second", Head(model))):
        program = torch.export.export(module, (ids,), strict=False)
        kinds = {str(s.kind).split(".")[1] for s in program.graph_signature.input_specs}
        assert {"PARAMETER", "BUFFER", "CONSTANT_TENSOR"} <= kinds
        arts[name] = export_eager(ExportRequest(program, tmp_path, name, ["ids"], ["out"], shared=shared))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.ep.pt2", "second.ep.pt2", WEIGHTS_FILE]
    for art in arts.values():  # the programs hold placeholders only
        assert (tmp_path / art.files[0]).stat().st_size < 64 * 1024
    stored = shared_tensors(tmp_path, None)
    assert stored["out.weight"].data_ptr() == stored["embed.weight"].data_ptr()  # tied: stored once
    assert set(stored) == {"embed.weight", "out.weight", "body.weight", "body.bias", "scale", "offset"}

    runtime: dict = {}
    with torch.no_grad():
        got = {n: _load(a.files, ["ids"], n)(tmp_path, runtime)({"ids": ids})[0] for n, a in arts.items()}
        torch.testing.assert_close(got["first"], model(ids)[0], rtol=0, atol=0)
        torch.testing.assert_close(got["second"], Head(model)(ids)[0], rtol=0, atol=0)
    assert len(runtime) == 1  # the file was read once for both programs
    first, second = (load_module(tmp_path, a.files[0], WEIGHTS_FILE, runtime, n) for n, a in arts.items())
    for name in ("body.weight", "embed.weight", "out.weight"):  # bound to the same tensors: one copy in memory
        assert first.get_parameter(name).data_ptr() == second.get_parameter(name).data_ptr()
    assert first.get_buffer("scale").data_ptr() == runtime[next(iter(runtime))]["scale"].data_ptr()


def test_a_name_two_programs_store_differently_is_refused(tmp_path):
    pool = WeightFile(tmp_path)
    pool.add({"w": torch.ones(3)}, "vision")
    assert pool.add({"w": torch.ones(3)}, "prefill")["new_bytes"] == 0
    with pytest.raises(ExportError, match="prefill graph's weight 'w' differs .* export all graphs from one module"):
        pool.add({"w": torch.zeros(3)}, "prefill")


def test_a_file_from_an_earlier_target_is_kept_and_views_are_stored_whole(tmp_path):
    base = torch.arange(12.0)
    WeightFile(tmp_path).add({"a": base[:4], "b": base[4:].view(2, 4)}, "vision")  # views of one storage
    pool = WeightFile(tmp_path)  # another target of the same compile opens the file
    assert pool.add({"a": torch.arange(4.0)}, "vision")["new_bytes"] == 0
    stored = shared_tensors(tmp_path, None)
    assert torch.equal(stored["b"], base[4:].view(2, 4)) and torch.equal(stored["a"], base[:4])


def _embedded_weight_bytes(path: Path, weights: dict[str, torch.Tensor]) -> int:
    """Bytes of weights inside a .pt2 archive: its weight and constant records, plus any weight of 16 KiB or
    more whose first 256 bytes appear in a compiled library (AOTInductor can put constants inside the .so)."""
    total = 0
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            parts = info.filename.split("/")
            if ("weights" in parts or "constants" in parts) and not info.filename.endswith(".json"):
                total += info.file_size
            elif info.filename.endswith(".so"):
                blob = z.read(info)
                big = [t for t in weights.values() if t.numel() * t.element_size() >= 16 * 1024]
                total += sum(t.numel() * t.element_size() for t in big
                             if t.contiguous().view(torch.uint8).flatten()[:256].numpy().tobytes() in blob)
    return total


@pytest.mark.parametrize("target", ["eager", "aoti"])
def test_demo_export_holds_one_copy_of_the_weights(demo_export, tiny_model, target):
    m = json.loads((demo_export / "manifest.json").read_text())
    files = {f for g in GRAPHS for f in m["graphs"][g]["artifacts"][target]["files"]}
    assert WEIGHTS_FILE in files
    weights = shared_tensors(demo_export, None)
    stored = (demo_export / WEIGHTS_FILE).stat().st_size
    embedded = sum(_embedded_weight_bytes(demo_export / f, weights) for f in files if f.endswith(".pt2"))
    model_bytes = sum(t.numel() * t.element_size() for t in {id(t): t for t in tiny_model.parameters()}.values())
    print(f"{target}: {stored} bytes in {WEIGHTS_FILE} + {embedded} inside the graph files, for a {model_bytes}-byte "
          f"model ({(stored + embedded) / model_bytes:.3f}x)")
    assert stored + embedded <= 1.05 * model_bytes
