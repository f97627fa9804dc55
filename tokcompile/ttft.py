"""Time to first token of an export, measured through the runtime as a user would run it.

One image at the compiled resolution and one short question, batch 1: the processor, the vision graph, the
prefill graph and the first token (`generate(max_new_tokens=1)`). One warm-up run, then the median of
`repeats`. Run it alone: other work on the machine inflates it.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

QUESTION = "What is in this image?"
# runtime backend per export target, in order of preference: the first target the export holds is timed
BACKEND_OF = {"onnx": "onnxruntime", "aoti": "aoti", "eager": "eager", "tensorrt": "tensorrt"}


def backend_for(targets: list[str]) -> str:
    for t in targets:
        if t in BACKEND_OF:
            return BACKEND_OF[t]
    raise ValueError(f"no runtime backend for the targets {', '.join(targets)}")


def ttft_ms(export_dir: str | Path, backend: str, repeats: int = 5, seed: int = 0) -> float:
    """The median time to first token (ms) of `export_dir` on `backend`, batch 1. The export must be one this
    process built or trusts (backends other than onnxruntime run code from it)."""
    from tokcompile.runtime import load

    gen = load(export_dir, backend, trust_export=True)
    media = gen.adapter.random_media(np.random.default_rng(seed), 1, gen.geometry)
    gen.generate(media, [QUESTION], max_new_tokens=1)  # warm-up: sessions, allocations
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        gen.generate(media, [QUESTION], max_new_tokens=1)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)
