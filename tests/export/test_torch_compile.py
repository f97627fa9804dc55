"""The torch_compile target and backend: saved programs bound to the shared weights and run through
`torch.compile`, without recompiling for new lengths, and the runtime's answers on the demo export."""

from __future__ import annotations

import numpy as np
import torch
from torch._dynamo.utils import counters

from tests.export.test_weight_copies import Tied
from tokcompile.export import torch_compile
from tokcompile.export.base import ExportRequest


def test_compiled_program_equals_eager_and_new_lengths_do_not_recompile(tmp_path):
    torch.manual_seed(0)
    model = Tied().eval()
    ids = torch.randint(0, 16, (2, 5))
    dims = ({0: torch.export.Dim("batch", min=1, max=4), 1: torch.export.Dim("length", min=2, max=64)},)
    program = torch.export.export(model, (ids,), dynamic_shapes=dims, strict=False)
    art = torch_compile.export_torch_compile(ExportRequest(program, tmp_path, "prefill", ["ids"], ["logits"]))
    assert art.files == ["prefill.ep.pt2", "weights.safetensors"] and art.backend == "torch_compile"
    run = art.load(tmp_path, {})
    before = counters["stats"]["unique_graphs"]
    # Inductor fuses and reorders the sums: logits up to ~20 in size from 8 terms each, so fp32 rounding alone
    # reaches ~2e-5 near zero (atol); an exact match of the order is not what this checks
    for shape in ((2, 5), (2, 9), (3, 17)):  # one compile: new batch sizes (>= 2) and lengths reuse it
        x = torch.randint(0, 16, shape)
        torch.testing.assert_close(run({"ids": x})[0], model(x)[0], rtol=1e-5, atol=1e-4)
    x = torch.randint(0, 16, (4, 12))[:, ::2]  # a strided input is made contiguous, not a new graph
    torch.testing.assert_close(run({"ids": x})[0], model(x)[0], rtol=1e-5, atol=1e-4)
    assert counters["stats"]["unique_graphs"] - before == 1


def test_runtime_backend_answers_as_eager(demo_export, monkeypatch):
    """The runtime's torch_compile backend on the demo export's eager programs (the same files), one prompt and
    a few tokens. CI traces with dynamo's "eager" backend (about 30 s on 2 cores; inductor's generated kernels
    for the three graphs take about 110 s): this covers the backend's loading, weight binding, dynamo capture and
    guards; the test above covers inductor's kernels on a small program, and a compile with the torch_compile
    target checks the demo's graphs with inductor by the parity every target passes."""
    from PIL import Image

    from tokcompile.runtime import load

    monkeypatch.setattr(torch_compile, "SETTINGS", {"backend": "eager"})
    image = Image.fromarray((np.random.default_rng(2).random((40, 50, 3)) * 255).astype("uint8"))
    answers = {b: load(demo_export, b, trust_export=True).generate([image], ["What is this?"], max_new_tokens=3,
                                                                  stop_at_eos=False)
               for b in ("eager", "torch_compile")}
    assert answers["torch_compile"].token_ids == answers["eager"].token_ids
    assert answers["torch_compile"].kept == answers["eager"].kept
