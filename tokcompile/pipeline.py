"""compile(): the one orchestration function, read top to bottom.

recipe -> plan (config only) -> processor, parity inputs, uncompressed baseline -> weights quantized ->
ReducedVLM -> torch.export -> each target -> parity -> manifest -> publish.

The output directory is checked before any weights load (tokcompile.outdir). Everything is written into a
temporary sibling directory, which is swapped into place only after parity passed (tokcompile.publish); a failed
or terminated compile leaves no directory behind and never touches an existing export.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tokcompile import outdir, publish
from tokcompile.devices import to_device
from tokcompile.errors import ExportError, RecipeError
from tokcompile.plan import Plan, check_remote_code, remote_code_warning, resolve
from tokcompile.question import SAVED_DIR as SAVED_QUESTION_DIR
from tokcompile.question import for_plan as question_tokenizer
from tokcompile.recipe import load_recipe

Log = Callable[[str], None]


def plan_recipe(recipe_path: str | Path, out: str | Path | None = None, targets: tuple[str, ...] | None = None,
                trust_remote_code: bool = False, log: Log | None = None, evaluate: bool = True,
                device: str | None = None) -> Plan:
    """Resolve a recipe without loading weights. `log` receives the remote-code warning before any runs.
    `evaluate=False` drops the recipe's `eval:` section (`--no-eval`); `device` overrides `parity.device`."""
    recipe = _without_eval(load_recipe(recipe_path), evaluate)
    check_remote_code(recipe, trust_remote_code)
    if log is not None and (remote := remote_code_warning(recipe)) is not None:
        log(f"warning: {remote}")
    plan = resolve(recipe, out=out, targets=targets, trust_remote_code=trust_remote_code, device=device)
    outdir.check_path(plan.out_dir, _out_key(out))
    return plan


def _without_eval(recipe: Any, evaluate: bool) -> Any:
    from dataclasses import replace

    return recipe if evaluate or recipe.eval is None else replace(recipe, eval=None)


def _out_key(out: str | Path | None) -> str:
    """Where the output directory came from, for error messages: --out, else the recipe's save.save_path."""
    return "--out" if out is not None else "save.save_path"


def compile_recipe(
    recipe_path: str | Path,
    *,
    out: str | Path | None = None,
    targets: tuple[str, ...] | None = None,
    force: bool = False,
    log: Log = print,
    trust_remote_code: bool = False,
    evaluate: bool = True,
    device: str | None = None,
) -> Path:
    """Compile a recipe into a validated export directory and return its path. With an `eval:` section (and
    `evaluate`), the positions it names answer its datasets and the export holds eval.json and eval.md.
    `device` (`--device`) overrides `parity.device`: where the graphs are traced, compiled and checked."""
    t0 = time.perf_counter()
    recipe = _without_eval(load_recipe(recipe_path), evaluate)
    check_remote_code(recipe, trust_remote_code)
    if (remote := remote_code_warning(recipe)) is not None:
        log(f"warning: {remote}")
    plan = resolve(recipe, out=out, targets=targets, trust_remote_code=trust_remote_code, device=device)
    for w in plan.recipe.warnings:  # the recipe's own and its reducers' (see `Reducer`)
        log(f"warning: {w}")
    key = _out_key(out)
    dest = outdir.check_destination(plan.out_dir, force, key)  # before any weights load
    with publish.staging(dest, force, key, log) as staged:
        _compile_into(plan, staged.tmp, log)
        staged.publish()
    log(f"done in {time.perf_counter() - t0:.1f}s: {plan.out_dir}")
    return plan.out_dir


GREEDY_TOKENS = 16  # generated tokens compared token for token per backend


class _Stages:
    """Progress lines with timings: `[name] ...` then `[name] 3.2s`."""

    def __init__(self, log: Log):
        self.log = log
        self.timings: dict[str, float] = {}

    def __call__(self, name: str) -> Callable[[], None]:
        start = time.perf_counter()
        self.log(f"[{name}] ...")

        def done() -> None:
            self.timings[name] = round(time.perf_counter() - start, 2)
            self.log(f"[{name}] {self.timings[name]:.1f}s")

        return done


def _compile_into(plan: Plan, tmp: Path, log: Log) -> None:
    import torch

    from tokcompile import near_ties, parity
    from tokcompile.export import EXPORTERS
    from tokcompile.export.base import ExportRequest
    from tokcompile.generation import GenerationConfig, generate, no_cache_logits, run_prompt
    from tokcompile.graphs import DECODE, PREFILL, VISION, build_modules, eager_runners, graph_specs, replay_runners
    from tokcompile.models.loading import load_model, load_processor

    recipe, g = plan.recipe, plan.geometry
    atol, rtol = plan.atol, plan.rtol  # the recipe's, else the export dtype's defaults
    torch.manual_seed(recipe.base.seed)
    stage = _Stages(log)

    done = stage("load")
    processor = load_processor(recipe.model.path, recipe.model.trust_remote_code)
    model = load_model(recipe.model.path, plan.config, recipe.base.seed, recipe.model.trust_remote_code)
    model.to(plan.device)  # everything from here runs there; the eager runners move what they are fed
    try:
        inputs = parity.make_inputs(
            processor, plan.adapter, g, plan.batch_size, recipe.parity.samples, recipe.base.seed,
            plan.text_len_range[1], question_tokenizer(plan),
        )
    except ValueError as e:
        raise RecipeError("inputs.max_prompt_len", f"{e}; raise it or remove it") from None
    with torch.no_grad():  # the uncompressed model's logits, per unpadded sample, for the drift report
        baseline = []
        for inp in inputs:
            samples = [inp.sample(b) for b in range(len(inp.prompts))]
            baseline.append(torch.cat([model(**to_device(smp, plan.device)).logits[:, -1].cpu() for smp in samples]))
    done()

    evaluation = None
    if recipe.eval is not None:
        from tokcompile.eval.run import Evaluation

        evaluation = Evaluation(recipe.eval, log)
        evaluation.check_prompts(plan, processor)
        if evaluation.wants("pretrain"):
            done = stage("eval pretrain")
            evaluation.eager("pretrain", plan, model, processor, reduce=False)
            done()

    quant_report, quant_layers, int_weights = None, None, None
    if plan.quant is not None:
        done = stage("quantize")
        quant_report, quant_layers, int_weights = _quantize(plan, model, processor, log)
        log(f"  {quant_report.n_layers} Linear layers fake-quantized, max relative weight error "
            f"{quant_report.max_rel_error:.4f}")
        done()

    processor.save_pretrained(str(tmp / "processor"))
    if (question := question_tokenizer(plan)) is not None:  # the runtime tokenizes questions with it
        question.save(tmp / SAVED_QUESTION_DIR)
    if recipe.save.save_fake:
        done = stage("save_fake")
        model.save_pretrained(str(tmp / "fake_quant"), safe_serialization=True)
        processor.save_pretrained(str(tmp / "fake_quant"))
        done()

    if plan.dtype != "float32":  # quantized in float32; the graphs and their eager reference run in the export dtype
        model.to(getattr(torch, plan.dtype))
    if evaluation is not None and (evaluation.wants("fake_quant") or evaluation.wants("transformed")):
        done = stage("eval fake_quant, transformed")
        evaluation.eager("fake_quant", plan, model, processor, reduce=False)
        evaluation.eager("transformed", plan, model, processor, reduce=True)
        done()
    reduced, decode = build_modules(plan, model)
    layout = reduced.layout
    report: dict[str, Any] = {"atol": atol, "rtol": rtol, "dtype": plan.dtype, "greedy_tokens": GREEDY_TOKENS,
                              "artifacts": {}}

    done = stage("eager check")
    # Generation cases: every parity batch (padded when batch > 1) and its first sample alone (batch 1).
    cases = [inp.batch for inp in inputs]
    if plan.batch_size > 1:
        cases += [inp.sample(0) for inp in inputs]
    gcfg = GenerationConfig(max_new_tokens=GREEDY_TOKENS)

    eager_graphs = dict(zip((VISION, PREFILL, DECODE), eager_runners(reduced, decode)))
    eager_decode = eager_graphs[DECODE]
    eager_runs = [generate(*eager_graphs.values(), c, layout=layout, cfg=gcfg, keep_logits=True) for c in cases]
    references = [no_cache_logits(reduced, c, run) for c, run in zip(cases, eager_runs)]
    report["eager_vs_no_cache"] = parity.check_no_cache(eager_runs, references, atol, rtol)
    log(f"  eager generation with KV cache equals the no-cache reference over {GREEDY_TOKENS} tokens "
        f"(max |Δlogit| {report['eager_vs_no_cache']['max_abs_logit_diff']:.2e})")
    eager_prompt_out = [run_prompt(eager_graphs[VISION], eager_graphs[PREFILL], layout, inp.batch) for inp in inputs]
    done()

    done = stage("reference")
    if recipe.parity.reference:
        report["reference"] = _independent_reference(plan, model, eager_prompt_out, inputs, atol, rtol, log)
    report["drift_vs_uncompressed"] = parity.drift(eager_prompt_out, baseline)
    done()

    done = stage("export")
    specs = graph_specs(plan, reduced, decode, to_device(inputs[0].batch, plan.device))  # traced on the device
    programs = {}
    with torch.no_grad():
        for spec in specs:
            try:
                programs[spec.name] = torch.export.export(
                    spec.module, spec.example, dynamic_shapes=spec.dynamic_shapes, strict=False
                )
            except Exception as e:  # tracing raises many types: one line (the traceback with TOKCOMPILE_DEBUG=1)
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise ExportError(f"tracing the {spec.name} graph (torch.export) failed: {first}") from e
    done()

    def as_case(io: Any, batch: dict, out: dict) -> tuple[dict, tuple]:
        feed = {n: batch[n] if n in batch else out[n] for n in io.inputs}
        return feed, tuple(out[n] for n in io.outputs)

    graph_cases = {
        VISION: [as_case(layout.vision, inp.batch, out) for inp, out in zip(inputs, eager_prompt_out)],
        PREFILL: [as_case(layout.prefill, inp.batch, out) for inp, out in zip(inputs, eager_prompt_out)],
        DECODE: [as_case(layout.decode, specs[2].example_dict(), eager_decode(specs[2].example_dict()))],
    }
    margin = near_ties.SCORE_MARGINS[plan.dtype]
    replays = replay_runners(reduced, decode, layout)

    def replay_gen(case: dict) -> Callable[[dict], Any]:
        return lambda forced: generate(*eager_runners(reduced, decode, forced), case, layout=layout, cfg=gcfg,
                                       keep_logits=True)

    artifacts = []
    shared: dict[str, dict] = {}  # per target: what its graphs share while exporting (the ONNX weight file)
    for target in plan.targets:
        done = stage(target)
        runners = {}
        for spec in specs:
            art = EXPORTERS.get(target)(ExportRequest(
                programs[spec.name], tmp, spec.name, spec.input_names, spec.output_names, recipe.export.opset,
                shared=shared.setdefault(target, {}), plan=plan, labels=spec.labels,
            ))
            runners[spec.name] = art.load(tmp, {"device": plan.device})
            report["artifacts"][art.name] = {
                "files": art.files,
                **parity.check_artifact(art.name, runners[spec.name], spec.output_names, graph_cases[spec.name],
                                        atol, rtol, near_ties=plan.dtype != "float32", replay=replays[spec.name],
                                        score_margin=margin),
            }
            artifacts.append(art)
        named = [layout.graph(g).wrap(runners[g]) for g in layout.graphs]
        gen_rows = []
        for i, (c, ref) in enumerate(zip(cases, eager_runs)):
            run = generate(*named, c, layout=layout, cfg=gcfg, keep_logits=True)
            gen_rows.append(parity.check_generation(f"{target} generation", run, ref, atol, rtol, f"on case {i}",
                                                    near_ties=plan.dtype != "float32", replay=replay_gen(c),
                                                    score_margin=margin))
        report["generation"] = report.get("generation", {})
        report["generation"][target] = {"passed": True, "cases": gen_rows}
        ties = sum(len(r.get("near_ties", [])) for r in gen_rows)
        graph_ties = sum(len(report["artifacts"][a.name].get("near_ties", [])) for a in artifacts[-len(specs):])
        log(f"  {target}: vision, prefill and decode parity passed; greedy generation equals eager token for token "
            f"({GREEDY_TOKENS} tokens, {len(cases)} cases, batch sizes {sorted({r['batch'] for r in gen_rows})})"
            + (f"; near-ties recorded in parity.json: {graph_ties} in the graphs, {ties} in generation"
               if ties or graph_ties else ""))
        done()

    int4 = None
    if int_weights:
        done = stage("int4")
        int4 = _int4_onnx(specs, graph_cases, cases, eager_runs, int_weights, tmp, layout, gcfg, atol, rtol, log,
                          shared["onnx"]["onnx_weights"], replays, replay_gen)
        report["int4"] = int4["parity"]
        artifacts.extend(int4.pop("artifacts"))  # the runtime's onnxruntime-int4 backend
        done()

    report["passed"] = True
    _write_json(tmp / "parity.json", report)
    _write_json(tmp / "flops.json", plan.flops)
    from tokcompile.manifest import build_manifest

    quant = {**quant_report.to_dict(), "layerwise": quant_layers} if quant_report else None
    example_outputs = {name: cases_[0][1] for name, cases_ in graph_cases.items()}  # eager, already computed
    manifest = build_manifest(plan, specs, artifacts, layout, example_outputs, quant, stage.timings, tmp)
    if int4 is not None:
        manifest["int4_onnx"] = {k: v for k, v in int4.items() if k != "parity"}
    _write_json(tmp / "manifest.json", manifest)
    if evaluation is not None:
        done = stage("eval")
        evaluation.exported(tmp, plan.device)  # through the runtime, from the files just written
        manifest["eval"] = evaluation.write(tmp)
        _write_json(tmp / "manifest.json", manifest)
        done()


def _quantize(plan: Plan, model: Any, processor: Any, log: Log) -> tuple[Any, dict | None, dict | None]:
    """RTN in one call; GPTQ layer by layer on calibration data (through the reduction if asked).

    Returns the report, GPTQ's per-layer report (or None) and, for `export.weight_format: int4`, every
    quantized weight's integer codes and scales (or None).
    """
    import numpy as np

    from tokcompile.export.int4 import IntWeight
    from tokcompile.models import ReducedVLM
    from tokcompile.quant import GPTQConfig, QuantReport, quantize_, select_linears
    from tokcompile.quant.calib import calibration_batches
    from tokcompile.quant.primitives import compute_qparams, quantize, relative_error
    from tokcompile.quant.sequential import gptq_sequential

    wq = plan.quant.weight
    want_ints = plan.recipe.export.weight_format == "int4"
    linears = select_linears(model, plan.quant_include, plan.quant_ignore)
    ints: dict[str, IntWeight] | None = {} if want_ints else None

    def int_weight(fqn: str, codes: Any, scale: Any, zero: Any) -> IntWeight:
        w = linears[fqn].weight.detach().float().cpu()
        return IntWeight(codes.cpu().numpy().astype(np.int8), scale.cpu().numpy().astype(np.float32),
                         zero.cpu().numpy().astype(np.int8), wq.symmetric, wq.group_size, w.numpy())

    if not isinstance(plan.quant, GPTQConfig):
        grids = {}
        if want_ints:  # the same grid fake_quantize uses, kept before the weights are replaced
            for fqn, m in linears.items():
                scale, zero = compute_qparams(m.weight.detach().float(), wq.bit, wq.symmetric, wq.group_size,
                                              wq.sym_grid)  # (O, G) each
                grids[fqn] = (quantize(m.weight.detach().float(), scale, zero, wq.bit, wq.symmetric, wq.group_size),
                              scale, zero)
        report = quantize_(model, plan.quant, include=plan.quant_include, ignore=plan.quant_ignore)
        if ints is not None:
            ints.update({fqn: int_weight(fqn, *grid) for fqn, grid in grids.items()})
        return report, None, ints
    calib = plan.recipe.quant.calib
    batches = calibration_batches(calib, processor, plan.adapter, plan.geometry, plan.recipe.base.seed,
                                  batch_size=calib.bs if calib.bs > 0 else calib.n_samples,
                                  question=question_tokenizer(plan))
    batches = to_device(batches, plan.device)  # the activations stay there, layer after layer
    original = {n: m.weight.detach().clone() for n, m in linears.items()}
    reduced = ReducedVLM(model, plan.adapter, plan.geometry, plan.schedule, plan.reducers,
                         plan.image_token_id).on_model_device()
    log(f"  GPTQ on {calib.n_samples} {calib.name} calibration samples"
        f"{' through the reduction' if calib.with_reduction else ''}")
    results: dict[str, Any] = {}
    seq = gptq_sequential(reduced, batches, plan.quant, linears, with_reduction=calib.with_reduction, log=log,
                          results=results if want_ints else None)
    if ints is not None:
        ints.update({fqn: int_weight(fqn, r.codes, r.scale, r.zero) for fqn, r in results.items()})
    report = QuantReport(
        method="gptq",
        config={**asdict(plan.quant), "calib": {"name": calib.name, "n_samples": calib.n_samples,
                                                "with_reduction": calib.with_reduction}},
        layers=tuple(linears),
        rel_errors={n: relative_error(original[n], m.weight) for n, m in linears.items()},
        seconds=seq["seconds"],
    )
    return report, seq, ints


def _int4_onnx(specs: list, graph_cases: dict, cases: list, eager_runs: list, int_weights: dict, tmp: Path,
               layout: Any, gcfg: Any, atol: float, rtol: float, log: Log, pool: Any, replays: dict,
               replay_gen: Callable) -> dict:
    """Write `<graph>.int4.onnx` next to each fake-quant ONNX graph that holds quantized weights (prefill and
    decode; the vision graph has none and serves as it is) and check it in onnxruntime: with MatMulNBits at
    accuracy level 0 and with optimisations off it must pass parity (and generate the same tokens); at
    onnxruntime's default accuracy level the drift is reported."""
    import torch

    from tokcompile import parity
    from tokcompile.export.int4 import int4_artifact, ort_session, write_int4_onnx
    from tokcompile.export.tensorrt_check import check_onnx
    from tokcompile.generation import generate

    out: dict[str, Any] = {"graphs": {}, "parity": {}, "artifacts": []}
    sessions: dict[str, dict[str, Any]] = {"exact": {}, "unfused": {}, "default": {}}
    for spec in specs:
        src, dst = tmp / f"{spec.name}.onnx", tmp / f"{spec.name}.int4.onnx"
        if spec.name == "vision":  # no quantized weights: the float graph is the int4 export's vision graph
            sess = ort_session(src, "exact")

            def run_vision(feed: dict, sess: Any = sess, names: list = spec.input_names) -> tuple:
                return tuple(torch.from_numpy(o) for o in sess.run(None, {n: torch.as_tensor(feed[n]).cpu().numpy()
                                                                         for n in names}))

            for mode in sessions:
                sessions[mode][spec.name] = run_vision
            out["graphs"][spec.name] = {"files": [src.name, pool.name], "replaced": 0,
                                        "note": "no quantized weights; the float vision graph serves"}
            out["artifacts"].append(int4_artifact(spec.name, [src.name, pool.name], spec.input_names,
                                                  {"note": out["graphs"][spec.name]["note"]}))
            continue
        stats = write_int4_onnx(src, dst, int_weights)
        stats["tensorrt"] = check_onnx(dst)
        moved = pool.add(dst)  # INT4 codes and scales join the export's weight file; shared tensors are not copied
        float_bytes = _weight_bytes(src)
        out["graphs"][spec.name] = {"files": [dst.name, pool.name], "bytes": moved["bytes"],
                                    "new_bytes": moved["new_bytes"], "float_bytes": float_bytes,
                                    "size_ratio": moved["bytes"] / float_bytes, **stats}
        out["artifacts"].append(int4_artifact(spec.name, [dst.name, pool.name], spec.input_names, stats))
        for mode in sessions:
            sess = ort_session(dst, mode)

            def run(feed: dict, sess: Any = sess, names: list = spec.input_names) -> tuple:
                arrays = {n: torch.as_tensor(feed[n]).cpu().numpy() for n in names}
                return tuple(torch.from_numpy(o) for o in sess.run(None, arrays))

            sessions[mode][spec.name] = run
        for mode in ("exact", "unfused"):
            out["parity"][f"{spec.name}.{mode}"] = parity.check_artifact(
                f"{spec.name}.int4.onnx ({mode})", sessions[mode][spec.name], spec.output_names,
                graph_cases[spec.name], atol, rtol, replay=replays[spec.name])
        drift = 0.0
        for feed, ref in graph_cases[spec.name]:
            drift = max(drift, float((sessions["default"][spec.name](feed)[0] - ref[0].cpu()).abs().max()))
        out["parity"][f"{spec.name}.default_accuracy_drift"] = drift
    rows = []
    for i, (c, ref) in enumerate(zip(cases, eager_runs)):
        named = [layout.graph(spec.name).wrap(sessions["exact"][spec.name]) for spec in specs]
        run = generate(*named, c, layout=layout, cfg=gcfg, keep_logits=True)
        rows.append(parity.check_generation("int4 onnx generation", run, ref, atol, rtol, f"on case {i}",
                                            replay=replay_gen(c)))
    out["parity"]["generation_exact"] = {"passed": True, "cases": rows}
    p = out["graphs"]["prefill"]
    log(f"  int4 ONNX: {p['replaced']} weights as INT4 blocks, prefill {p['bytes'] / 1e6:.1f} MB vs "
        f"{p['float_bytes'] / 1e6:.1f} MB fp32 ({p['size_ratio']:.2f}x); parity passed with MatMulNBits "
        f"exact and unfused; default-accuracy drift {out['parity']['prefill.default_accuracy_drift']:.3g}")
    return out


def _weight_bytes(graph: Path) -> int:
    """Bytes of the tensors an ONNX graph stores (external or inline)."""
    import onnx

    from tokcompile.export.onnx_weights import stored_bytes

    return stored_bytes(onnx.load(str(graph), load_external_data=False))


def _independent_reference(plan: Plan, model: Any, eager_out: list, inputs: list, atol: float, rtol: float,
                           log: Log) -> dict:
    from tokcompile import near_ties, parity
    from tokcompile.reference import fastv_reference

    step = plan.schedule[0] if plan.schedule else None
    if not (step is None or (len(plan.schedule) == 1 and step.method == "fastv")):
        return {"passed": None, "note": "no independent reference for this schedule"}

    def ref(sample: Any, **kw: Any) -> Any:  # kw: forced, scores_out (near-ties in half precision)
        return fastv_reference(
            model, plan.adapter, to_device(sample, plan.device), image_token_id=plan.image_token_id,
            pruning_loc=step.layer if step else None, keep=step.n_out if step else None, **kw,
        )

    result = parity.check_reference(ref, eager_out, inputs, atol, rtol, near_ties.NEAR_TIE_MARGINS[plan.dtype])
    ties = f"; {result['near_ties']} near-tie(s) recorded in parity.json" if result.get("near_ties") else ""
    log(f"  independent eager reference agrees (max |Δlogit| {result['max_abs_diff']:.2e}){ties}")
    return result


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
