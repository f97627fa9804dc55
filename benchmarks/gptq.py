"""GPTQ against RTN on the ~250M medium random LLaVA, side by side in one run.

    python benchmarks/gptq.py [--samples 16] [--held-out 8] [--size medium]

Prints, in one run:
  - GPTQ time per decoder layer and in total, and peak memory above the loaded model;
  - the error of the 4-bit model's next-token logits against fp32 on held-out samples, for RTN, GPTQ
    calibrated on the full sequence, and GPTQ calibrated through the FastV reduction, each measured on the
    reduced model as it is deployed;
  - INT4 ONNX prefill size and latency (onnxruntime CPU) against the fp32 ONNX prefill, where "prefill" is
    the vision graph then the prefill graph (time to first token's logits); the vision graph stays fp32.
Random weights make absolute errors meaningless; compare the rows of one run.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="medium")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--held-out", type=int, default=8)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--pruning-loc", type=int, default=2)
    p.add_argument("--rate", type=float, default=0.75)
    p.add_argument("--latency-repeats", type=int, default=5)
    args = p.parse_args()

    import numpy as np
    import torch
    import yaml

    from tokcompile.export.int4 import IntWeight, ort_session, write_int4_onnx
    from tokcompile.graphs import PREFILL, VISION, build_modules, graph_specs
    from tokcompile.models import ReducedVLM
    from tokcompile.pipeline import plan_recipe
    from tokcompile.quant import GPTQConfig, RTNConfig, WeightQuantConfig, quantize_, select_linears
    from tokcompile.quant.calib import calibration_batches
    from tokcompile.quant.sequential import gptq_sequential
    from tokcompile.recipe import CalibConfig

    work = Path(tempfile.mkdtemp(prefix="tokcompile-gptq-"))
    recipe = {
        "model": {"path": f"tiny-random:llava@{args.size}" if args.size != "tiny" else "tiny-random:llava"},
        "inputs": {"batch_size": 1},
        "sparse": {"method": "TokenReduction",
                   "special": {"method": "FastV", "pruning_loc": args.pruning_loc, "rate": args.rate}},
    }
    (work / "r.yml").write_text(yaml.safe_dump(recipe))
    plan = plan_recipe(work / "r.yml")
    from tokcompile.models.loading import load_model, load_processor

    processor = load_processor(plan.recipe.model.path, False)
    fp32 = load_model(plan.recipe.model.path, plan.config, 42, False)
    g = plan.geometry
    calib = calibration_batches(CalibConfig(name="synthetic", n_samples=args.samples), processor, plan.adapter, g, 0)
    held = calibration_batches(CalibConfig(name="synthetic", n_samples=args.held_out), processor, plan.adapter, g, 1000)
    wq = WeightQuantConfig(bit=4, symmetric=True, group_size=args.group_size)
    include, ignore = plan.adapter.quant_include, plan.adapter.quant_ignore  # the decoder's Linears

    def reduced_of(model):
        return ReducedVLM(model, plan.adapter, g, plan.schedule, plan.reducers, plan.image_token_id).eval()

    @torch.no_grad()
    def logits(model):
        r = reduced_of(model)
        return torch.cat([r.run({n: b[n] for n in r.input_names})["logits"] for b in held])

    ref = logits(fp32)
    rows = {}

    rtn = copy.deepcopy(fp32)
    quantize_(rtn, RTNConfig(weight=wq), include=include, ignore=ignore)
    rows[f"RTN w4 g{args.group_size}"] = (logits(rtn), None)

    gptq_reports = {}
    for with_reduction in (False, True):
        model = copy.deepcopy(fp32)
        linears = select_linears(model, include, ignore)
        baseline = _status_mb("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        results: dict = {}  # int8 codes for the INT4 export below (a quarter of the fp32 weights)
        rep = gptq_sequential(reduced_of(model), calib, GPTQConfig(weight=wq, actorder=True, static_groups=True),
                              linears, with_reduction=with_reduction, log=lambda m: None,
                              results=results if with_reduction else None)
        rep["peak_over_model_mb"] = _status_mb("VmHWM") - baseline
        name = f"GPTQ w4 g{args.group_size}" + (" (calibrated through FastV)" if with_reduction else "")
        rows[name] = (logits(model), rep)
        gptq_reports[with_reduction] = (model, rep, results)

    print(f"\n{args.size} LLaVA ({sum(p.numel() for p in fp32.parameters()) / 1e6:.0f}M parameters, {g.n_layers} "
          f"decoder layers, d={g.hidden_size}), FastV K={args.pruning_loc} R={args.rate}; {args.samples} calibration "
          f"and {args.held_out} held-out samples; {torch.get_num_threads()} threads")
    print(f"{'weights':<42}{'rel. logit error':>18}{'top-1 agree':>13}{'GPTQ time s':>13}{'peak MB':>10}")
    # peak MB: resident memory above the loaded model while GPTQ runs (the FastV row also keeps int8 codes)
    for name, (lg, rep) in rows.items():
        err = float((lg - ref).norm() / ref.norm())
        top1 = float((lg.argmax(-1) == ref.argmax(-1)).float().mean())
        extra = f"{rep['seconds']:>13.1f}{rep['peak_over_model_mb']:>10.0f}" if rep else f"{'':>13}{'':>10}"
        print(f"{name:<42}{err:>18.4f}{top1:>13.2f}{extra}")
    rep = gptq_reports[True][1]
    per_layer = [f"L{r['layer']} {r['seconds']:.1f}s err {r['rel_output_error']:.3f} ({r['tokens']} tok)"
                 for r in rep["layers"]]
    print("GPTQ per layer (calibrated through FastV): " + ", ".join(per_layer))

    # INT4 ONNX against fp32 ONNX (prefill graph of the GPTQ model)
    model, _, results = gptq_reports[True]
    linears = select_linears(model, include, ignore)
    ints = {n: IntWeight(results[n].codes.numpy(), results[n].scale.numpy(),
                         results[n].zero.numpy().astype(np.int8), True, args.group_size,
                         linears[n].weight.detach().numpy()) for n in linears}
    reduced, decode = build_modules(plan, model)
    specs = {s.name: s for s in graph_specs(plan, reduced, decode, held[0])}
    paths = {}
    for name in (VISION, PREFILL):
        spec = specs[name]
        with torch.no_grad():
            ep = torch.export.export(spec.module, spec.example, dynamic_shapes=spec.dynamic_shapes, strict=False)
        paths[name] = work / f"{name}.onnx"
        torch.onnx.export(ep, f=str(paths[name]), dynamo=True, external_data=True, input_names=spec.input_names,
                          output_names=spec.output_names, opset_version=21)
    vision_path, fp_path, q_path = paths[VISION], paths[PREFILL], work / "prefill.int4.onnx"
    write_int4_onnx(fp_path, q_path, ints)

    def size(path: Path) -> float:
        return (path.stat().st_size + path.with_name(path.name + ".data").stat().st_size) / 1e6

    vision_spec, prefill_spec = specs[VISION], specs[PREFILL]
    vision_feed = {n: held[0][n].numpy() for n in vision_spec.input_names}
    text_feed = {n: held[0][n].numpy() for n in prefill_spec.input_names if n in held[0]}
    image_names = [n for n in prefill_spec.input_names if n not in held[0]]  # image_embeds, image_source
    with torch.no_grad():
        eager_logits = reduced.run(dict(held[0]))["logits"].numpy()

    def chain(vision_sess, prefill_sess):
        """The vision graph, then the prefill graph on its image outputs: the prefill's logits."""
        image = dict(zip(vision_spec.output_names, vision_sess.run(None, vision_feed)))
        return prefill_sess.run(None, {**text_feed, **{n: image[n] for n in image_names}})[0]

    vision_mb = size(vision_path)
    print(f"\nINT4 ONNX prefill, vision graph + prefill graph ({g.n_image_tokens} image tokens, prompt "
          f"{text_feed['input_ids'].shape[1]}; the fp32 vision graph is {vision_mb:.1f} MB of each size):")
    print(f"{'graph':<34}{'size MB':>10}{'x fp32':>8}{'latency ms':>12}{'x fp32':>8}{'max |Δlogit| vs eager':>24}")
    base_ms = None
    for label, path, mode in (("fp32", fp_path, "default"), ("int4, MatMulNBits default", q_path, "default"),
                              ("int4, MatMulNBits accuracy 0", q_path, "exact"), ("int4, unfused", q_path, "unfused")):
        vision_sess, prefill_sess = ort_session(vision_path, mode), ort_session(path, mode)
        out = chain(vision_sess, prefill_sess)
        times = []
        for _ in range(args.latency_repeats):
            t = time.perf_counter()
            chain(vision_sess, prefill_sess)
            times.append(time.perf_counter() - t)
        ms = statistics.median(times) * 1e3
        base_ms = base_ms or ms
        total, fp_total = vision_mb + size(path), vision_mb + size(fp_path)
        print(f"{label:<34}{total:>10.1f}{total / fp_total:>8.2f}{ms:>12.1f}{ms / base_ms:>8.2f}"
              f"{float(np.abs(out - eager_logits).max()):>24.3g}")
    print("(fp32 ONNX holds the fake-quant weights; the vision tower, projector and lm_head stay fp32 in both; "
          "each session pair runs in the row's onnxruntime mode)")


if __name__ == "__main__":
    main()
