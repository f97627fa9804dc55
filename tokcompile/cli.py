"""Command line: `python compile.py recipe.yml [--plan] [--out DIR] [--targets onnx,aoti] [--force]
[--trust-remote-code]`.

User errors print one line (`error: <key>: <what and the fix>`) and exit 2; a parity or export failure
prints one line and exits 1. No traceback unless TOKCOMPILE_DEBUG=1.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from tokcompile.errors import TokcompileError, one_line


def _report(e: TokcompileError, debug: bool) -> int:
    """One line on stderr and the error's exit code; the traceback only with TOKCOMPILE_DEBUG=1."""
    if debug:
        raise e
    print(f"error: {one_line(str(e))}", file=sys.stderr)
    return e.exit_code


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="compile.py",
        description="Compile a VLM recipe (fake quantization + static token reduction) into validated artifacts.",
    )
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("--plan", action="store_true", help="print the resolved schedule and FLOPs without loading weights")
    p.add_argument("--out", help="output directory (default: save.save_path, else exported/<recipe name>)")
    p.add_argument("--targets", help="comma-separated export targets, overriding export.targets (onnx,aoti)")
    p.add_argument("--force", action="store_true", help="replace an existing export directory")
    p.add_argument("--no-eval", action="store_true",
                   help="skip the recipe's eval section (accuracy of the positions it names on its datasets)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="confirm the recipe's model.trust_remote_code: true (runs the checkpoint's Python code)")
    p.add_argument("--device", help="where the graphs are traced, compiled and checked: cpu, cuda or cuda:N "
                                    "(overrides parity.device; default cpu)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only warnings, errors and the result")
    return p


def _targets(text: str | None) -> tuple[str, ...] | None:
    """`--targets onnx,aoti` as a tuple; None when the flag is absent (the recipe's export.targets apply)."""
    if text is None:
        return None
    targets = tuple(t.strip().lower() for t in text.split(",") if t.strip())
    if not targets:
        from tokcompile.errors import RecipeError

        raise RecipeError("--targets", "is empty; give a comma-separated list such as onnx,aoti, or leave the flag "
                                       "out to use export.targets")
    return targets


def main(argv: list[str] | None = None) -> int:
    import signal

    from tokcompile.publish import Terminated

    args = _parser().parse_args(argv)
    debug = os.environ.get("TOKCOMPILE_DEBUG") == "1"
    try:
        targets = _targets(args.targets)
        if args.plan:
            from tokcompile.pipeline import plan_recipe
            from tokcompile.plan import format_plan

            plan = plan_recipe(args.recipe, out=args.out, targets=targets, trust_remote_code=args.trust_remote_code,
                               log=lambda line: print(line, file=sys.stderr, flush=True), evaluate=not args.no_eval,
                               device=args.device)
            for w in plan.recipe.warnings:
                print(f"warning: {w}", file=sys.stderr)
            print(format_plan(plan))
            return 0
        if not debug:
            warnings.filterwarnings("ignore")
            os.environ.setdefault("TORCH_LOGS", "-all")
        from tokcompile.pipeline import compile_recipe

        def log(msg: str) -> None:
            if msg.startswith("warning:"):
                print(msg, file=sys.stderr, flush=True)
            elif not args.quiet or msg.startswith("done"):
                print(msg, flush=True)

        compile_recipe(args.recipe, out=args.out, targets=targets, force=args.force, log=log,
                       trust_remote_code=args.trust_remote_code, evaluate=not args.no_eval, device=args.device)
        return 0
    except TokcompileError as e:
        return _report(e, debug)
    except KeyboardInterrupt:
        print("error: interrupted; nothing was published", file=sys.stderr)
        return 130
    except Terminated as e:  # SIGTERM during the compile
        print(f"error: {e}", file=sys.stderr)
        return 128 + signal.SIGTERM


def _generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tokcompile generate",
        description="Answer image questions with a compiled export (no recipe or checkpoint needed).",
    )
    p.add_argument("export_dir", help="an export directory written by compile.py")
    p.add_argument("--image", action="append", required=True, help="image file (repeat for a batch)")
    p.add_argument("--prompt", action="append", required=True,
                   help="question, or prompt formatted with the model's image placeholder (one per --image)")
    p.add_argument("--prompt-format", choices=("auto", "chat", "raw"), default="auto",
                   help="chat: wrap each prompt in the model's chat template; raw: use it as given (it holds the "
                        "image placeholder once, e.g. 'USER: <image>\\nWhat is shown? ASSISTANT:'); auto (default): "
                        "raw when the prompt holds the placeholder, else chat")
    p.add_argument("--backend", default="onnxruntime",
                   help="onnxruntime (default; reads only data, safe for any export), onnxruntime-int4 (the INT4 "
                        "graphs of an export.weight_format: int4 export), aoti, eager, torch_compile or tensorrt "
                        "(these run code stored in the export and need --trust-export)")
    p.add_argument("--trust-export", action="store_true",
                   help="allow the aoti, eager, torch_compile and tensorrt backends, which load a shared library, "
                        "pickled programs or engines from the export directory: only for an export you built or "
                        "trust")
    p.add_argument("--no-prepack", action="store_true",
                   help="onnxruntime: no per-graph pre-packed weight copies; the mapped weight file is the only copy")
    p.add_argument("--device", default="cpu",
                   help="where the graphs run: cpu (default), cuda or cuda:N (onnxruntime needs onnxruntime-gpu; "
                        "aoti needs an export compiled with --device cuda)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the recipe's inputs.max_new_tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--no-eos", action="store_true", help="do not stop at the end-of-sequence token")
    p.add_argument("--show-kept", action="store_true", help="also print the kept image-token indices")
    p.add_argument("--verify", action="store_true", help="check the graph files' sha256 against the manifest")
    return p


def generate_main(argv: list[str] | None = None) -> int:
    args = _generate_parser().parse_args(argv)
    debug = os.environ.get("TOKCOMPILE_DEBUG") == "1"
    if not debug:
        warnings.filterwarnings("ignore")
    try:
        if len(args.image) != len(args.prompt):
            from tokcompile.errors import RecipeError

            n_img, n_prompt = len(args.image), len(args.prompt)
            raise RecipeError("--prompt", f"got {n_img} --image and {n_prompt} --prompt; give one each")
        from pathlib import Path

        from tokcompile.generation import GenerationConfig
        from tokcompile.runtime import load, open_image, read_manifest

        # The manifest, the flags and the images first: each is reported before the export's graphs load.
        read_manifest(Path(args.export_dir))
        GenerationConfig(max_new_tokens=1 if args.max_new_tokens is None else args.max_new_tokens,
                         temperature=args.temperature, top_p=args.top_p)
        from tokcompile.devices import usable

        usable("--device", args.device)
        images = [open_image(path) for path in args.image]
        gen = load(args.export_dir, backend=args.backend, verify=args.verify, trust_export=args.trust_export,
                   prepack=not args.no_prepack, device=args.device)
        ans = gen.generate(
            images, args.prompt, max_new_tokens=args.max_new_tokens, stop_at_eos=not args.no_eos,
            temperature=args.temperature, top_p=args.top_p, seed=args.seed, prompt_format=args.prompt_format,
        )
        for i, text in enumerate(ans.texts):
            print(text)
            if args.show_kept:
                for name, kept in ans.kept.items():
                    print(f"  {name}: {kept[i]}")
        return 0
    except TokcompileError as e:
        return _report(e, debug)


def report_main(argv: list[str] | None = None) -> int:
    """python -m tokcompile report EXPORT_DIR... --out REPORT_DIR [--measure N]"""
    p = argparse.ArgumentParser(
        prog="python -m tokcompile report",
        description="Gather exports compiled with an eval section (methods and budgets of one model) into one "
                    "report: Markdown and HTML tables, and plots of accuracy against FLOPs and time to first token.")
    p.add_argument("export_dirs", nargs="+", help="export directories holding eval.json")
    p.add_argument("--out", required=True, help="the folder to write report.md, report.html and the plots into")
    p.add_argument("--measure", type=int, default=8,
                   help="prompts timed per export for the time to first token (onnxruntime, batch 1); 0 skips it")
    args = p.parse_args(argv)
    if not os.environ.get("TOKCOMPILE_DEBUG") == "1":
        warnings.filterwarnings("ignore")
    try:
        from pathlib import Path

        from tokcompile.eval.compare import write_report

        if args.measure < 0:
            from tokcompile.errors import RecipeError

            raise RecipeError("--measure", f"got {args.measure}; use 0 (no timing) or a number of prompts")
        result = write_report([Path(d) for d in args.export_dirs], Path(args.out), args.measure)
        plots = f" and {len(result['plots'])} plot(s)" if result["plots"] else " (no plots: matplotlib is missing)"
        print(f"wrote {Path(args.out) / 'report.md'}, report.html{plots}")
        return 0
    except TokcompileError as e:
        return _report(e, os.environ.get("TOKCOMPILE_DEBUG") == "1")


def save_model_main(argv: list[str] | None = None) -> int:
    """python -m tokcompile save-model tiny-random:llava DIR"""
    p = argparse.ArgumentParser(
        prog="python -m tokcompile save-model",
        description="Write a built-in model (tiny-random:<family>[@size] or tiny-trained:<name>) as an ordinary "
                    "Hugging Face checkpoint "
                    "directory (config.json, model.safetensors, tokenizer and processor files).")
    p.add_argument("model", help="tiny-random:llava, tiny-random:qwen2_vl@medium, tiny-trained:shapes, ...")
    p.add_argument("out", help="the directory to write (it must not exist, or be empty)")
    p.add_argument("--seed", type=int, default=0, help="the random weights' seed (default 0; not used by "
                                                       "tiny-trained models)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    try:
        from pathlib import Path

        from tokcompile.errors import RecipeError
        from tokcompile.models import tiny
        from tokcompile.models.loading import model_type_of

        if not tiny.is_tiny(args.model):
            raise RecipeError("model", f"'{args.model}' is not a built-in model; use tiny-random:<family>[@size] "
                                       "or tiny-trained:<name>")
        model_type_of(args.model)  # an unknown built-in name: one line listing the known ones
        out = Path(args.out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise RecipeError("out", f"{out} exists and is not an empty directory; choose a new one")
        model = tiny.build_from_path(args.model, seed=args.seed)
        processor = tiny.build_processor(tiny.tiny_family(args.model), tiny.tiny_size(args.model))
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out), safe_serialization=True)
        processor.save_pretrained(str(out))
        print(f"wrote {out}")
        return 0
    except TokcompileError as e:
        return _report(e, os.environ.get("TOKCOMPILE_DEBUG") == "1")


def vtw_search_main(argv: list[str] | None = None) -> int:
    """python -m tokcompile vtw-search recipe.yml [--eta X] [--start K] [--samples N]"""
    p = argparse.ArgumentParser(
        prog="python -m tokcompile vtw-search",
        description="Pick VTW's withdrawal layer K by its KL criterion on the recipe's calibration prompts: the "
                    "first layer whose withdrawal keeps the mean KL(withdrawn || full) of the next token at or "
                    "below eta. Prints every candidate's KL and the recipe line to write.")
    p.add_argument("recipe", help="a recipe whose token reduction is VTW (any pruning_loc)")
    p.add_argument("--eta", type=float, default=None, help="the KL threshold (default: the recipe's VTW eta, "
                                                             "else 0.003 as the official search)")
    p.add_argument("--start", type=int, default=None,
                   help="the first candidate layer (default 5 as the official search, 1 for models of 5 layers "
                        "or fewer)")
    p.add_argument("--samples", type=int, default=None, help="calibration prompts (default: quant.calib.n_samples)")
    p.add_argument("--trust-remote-code", action="store_true", help="confirm the recipe's model.trust_remote_code")
    args = p.parse_args(argv)
    if not os.environ.get("TOKCOMPILE_DEBUG") == "1":
        warnings.filterwarnings("ignore")
    try:
        from tokcompile.vtw_search import format_result, require_choice, search

        result = search(args.recipe, args.eta, args.start, args.samples, args.trust_remote_code)
        print(format_result(result))
        k = require_choice(result)
        print(f"K = {k}: write  sparse: {{special: {{method: VTW, pruning_loc: {k}}}}}  (or quant.token_reduction "
              f"with the same special)")
        return 0
    except TokcompileError as e:
        return _report(e, os.environ.get("TOKCOMPILE_DEBUG") == "1")
