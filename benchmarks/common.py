"""Helpers shared by the benchmarks: export the vision + prefill chain of a plan, check it, and time it.

`export_chain` exports the vision graph (`VisionEncoder`) and the prefill graph (`Prefill`, with its cache
outputs, as deployed) at the example batch's static shapes with the compiler's own exporters, loads both
with the backend, checks them against eager, and returns one callable that runs vision then prefill on a
processor batch: what "prefill" / time to first token costs now that the image encoder is its own graph.

Measurement helpers for worker processes (Linux): `status_mb` (resident and peak resident memory),
`smaps_mb` (PSS and anonymous memory), `reset_peak` (restart the peak-RSS mark), `timed` (append each call's
wall time to a list) and `processed_batch` (the same processed prompt and image for every variant).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokcompile.layout import EXACT_PREFIXES as GRAPH_EXACT_PREFIXES
from tokcompile.layout import SCORE_PREFIX

# Outputs that must equal eager exactly (every step's selection, masks, sources, and here positions too);
# logits are compared within LOGITS_ATOL.
EXACT_PREFIXES = (*GRAPH_EXACT_PREFIXES, "next_position")
LOGITS_ATOL = 1e-3

Chain = Callable[[dict[str, Any]], dict[str, Any]]


def status_mb(field: str) -> float:
    """A memory field of /proc/self/status ("VmRSS" now, "VmHWM" the peak) in MB; NaN where there is none."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def smaps_mb() -> dict[str, float]:
    """Proportional set size (a page mapped by several sessions counts once) and anonymous memory, now (Linux)."""
    out = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if parts and parts[0] in ("Pss:", "Anonymous:"):
            out[parts[0][:-1].lower()] = int(parts[1]) / 1024
    return out


def reset_peak() -> None:
    """Restart the peak-RSS mark (VmHWM) at the current resident size, so a later peak is this process's own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def timed(fn: Callable[[Any], Any], times: list[float]) -> Callable[[Any], Any]:
    """`fn`, appending the wall time of each call to `times`."""
    def run(feed: Any) -> Any:
        t = time.perf_counter()
        out = fn(feed)
        times.append(time.perf_counter() - t)
        return out

    return run


def processed_batch(processor: Any, manifest: dict, question: str) -> dict[str, Any]:
    """The processor's output for one random image (seed 0) and `question`, at the export's geometry."""
    import numpy as np

    from tokcompile.models import ADAPTERS, Geometry
    from tokcompile.parity import process

    adapter = ADAPTERS.get(manifest["plan"]["model_type"])()
    geom = dict(manifest["plan"]["geometry"])
    geom["image_size"], geom["layout"] = tuple(geom["image_size"]), tuple(geom.get("layout", ()))
    g = Geometry(**geom)
    return process(processor, adapter, g, adapter.random_media(np.random.default_rng(0), 1, g), [question])


def median_time(fn: Callable[[Any], Any], feed: Any, repeats: int) -> float:
    """Median wall time of `fn(feed)` in seconds over `repeats` runs, after one warm-up run."""
    fn(feed)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(feed)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def check_outputs(label: str, got: dict[str, Any], want: dict[str, Any]) -> float:
    """Every exact-prefixed output equal to eager, decision scores within the float32 near-tie margin, logits
    within LOGITS_ATOL; returns the max |Δlogit|."""
    import torch

    from tokcompile.errors import ParityError
    from tokcompile.near_ties import SCORE_MARGINS, compare_scores

    diff = 0.0
    for name, ref in want.items():
        if name not in got:
            raise AssertionError(f"{label}: output {name} is missing")
        g, r = torch.as_tensor(got[name]), torch.as_tensor(ref)
        if name.startswith(SCORE_PREFIX):
            try:
                compare_scores(label, name, g, r, SCORE_MARGINS["float32"], "")
            except ParityError as e:  # reported like every other disagreement
                raise AssertionError(str(e)) from e
        elif name.startswith(EXACT_PREFIXES):
            if g.shape != r.shape or not torch.equal(g.long(), r.long()):
                raise AssertionError(f"{label}: {name} differs from eager")
        elif name == "logits":
            diff = float((g.float() - r.float()).abs().max())
            if not diff < LOGITS_ATOL:
                raise AssertionError(f"{label}: logits differ from eager by {diff:.3g} (limit {LOGITS_ATOL:g})")
    return diff


def export_chain(plan: Any, model: Any, batch: dict[str, Any], backend: str, out_dir: Path, opset: int = 18) -> Chain:
    """Export the plan's vision and prefill graphs at `batch`'s shapes, load them with `backend` ("onnx",
    "aoti", "eager"), check them against eager and return `run(batch) -> the prefill's outputs by name`."""
    import torch

    from tokcompile.errors import ParityError
    from tokcompile.export import EXPORTERS
    from tokcompile.export.base import ExportRequest
    from tokcompile.layout import PREFILL, VISION
    from tokcompile.models import ReducedVLM
    from tokcompile.near_ties import SCORE_MARGINS, compare_or_replay

    reduced = ReducedVLM(model, plan.adapter, plan.geometry, plan.schedule, plan.reducers, plan.image_token_id,
                         with_cache=True).eval()
    layout = reduced.layout
    vision_feed = {n: batch[n] for n in layout.vision.inputs}
    with torch.no_grad():
        seen = reduced.vision.run(vision_feed)
        prefill_feed = {n: batch[n] if n in batch else seen[n] for n in layout.prefill.inputs}
        eager = {**seen, **reduced.prefill.run(prefill_feed)}

    out_dir.mkdir(parents=True, exist_ok=True)
    runners: dict[str, Chain] = {}
    for name, module, io, feed in ((VISION, reduced.vision, layout.vision, vision_feed),
                                   (PREFILL, reduced.prefill, layout.prefill, prefill_feed)):
        example = tuple(torch.as_tensor(feed[n]).contiguous() for n in io.inputs)
        with torch.no_grad():
            program = torch.export.export(module, example, strict=False)
        art = EXPORTERS.get(backend)(ExportRequest(program, out_dir, name, list(io.inputs), list(io.outputs), opset))
        runners[name] = io.wrap(art.load(out_dir))

    vision, prefill = runners[VISION], runners[PREFILL]
    text = [n for n in layout.prefill.inputs if n not in layout.image_outputs]

    def run(b: dict[str, Any]) -> dict[str, Any]:
        image = vision({n: b[n] for n in layout.vision.inputs})
        return prefill({**{n: b[n] for n in text}, **{n: image[n] for n in layout.image_outputs}})

    got_vision = vision(vision_feed)
    got_prefill = run(batch)

    def eager_run(forced: dict) -> dict:  # eager again, deciding on the graphs' own decision scores
        with torch.no_grad():
            out = reduced.vision.run(vision_feed, forced)
            feed = {n: batch[n] if n in batch else out[n] for n in layout.prefill.inputs}
            return {**out, **reduced.prefill.run(feed, forced)}

    def compare(ref: dict, where: str) -> None:
        try:
            check_outputs(f"{backend} vision graph{where}", got_vision, {n: ref[n] for n in layout.vision.outputs})
            check_outputs(f"{backend} vision + prefill{where}", got_prefill,
                          {n: ref[n] for n in layout.prefill.outputs})
        except AssertionError as e:
            raise ParityError(str(e)) from None

    ties: list = []
    try:
        compare_or_replay(compare, {**seen, **eager}, lambda out: out, {**got_vision, **got_prefill}, eager_run,
                          SCORE_MARGINS["float32"], "", ties)
    except ParityError as e:  # reported like every other disagreement
        raise AssertionError(str(e)) from None
    for tie in ties:
        differ = ", ".join(tie["differ"]) or "only the numbers"
        print(f"  {backend}: {tie['kind']} near-tie at {tie['decision']} ({differ} differ from eager); eager "
              "replayed with the graphs' decision scores", flush=True)
    return run
