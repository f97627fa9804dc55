"""python -m tokcompile compile recipe.yml [...]   (the same as python compile.py recipe.yml)
python -m tokcompile generate EXPORT_DIR --image PATH --prompt TEXT [--backend onnxruntime|aoti|eager]
python -m tokcompile report EXPORT_DIR... --out REPORT_DIR   (accuracy against cost, from exports' eval.json)
python -m tokcompile save-model tiny-random:llava DIR        (a built-in model as a Hugging Face directory)
python -m tokcompile vtw-search recipe.yml [--eta 0.003]      (VTW's withdrawal layer by its KL criterion)
python -m tokcompile quantize recipe.yml --out DIR          (GPTQ streamed layer by layer over a checkpoint)
python -m tokcompile sweep sweep.yml [--address ADDR]       (a recipe grid compiled as Ray tasks)
python -m tokcompile tune tune.yml [--serial]               (the best reduction within a FLOPs budget)"""

import sys

from tokcompile.cli import generate_main, main, report_main, save_model_main, vtw_search_main

if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] == "generate":
        sys.exit(generate_main(args[1:]))
    if args and args[0] == "save-model":
        sys.exit(save_model_main(args[1:]))
    if args and args[0] == "vtw-search":
        sys.exit(vtw_search_main(args[1:]))
    if args and args[0] == "quantize":
        from tokcompile.quantize_cli import quantize_main

        sys.exit(quantize_main(args[1:]))
    if args and args[0] == "sweep":
        from tokcompile.sweep_cli import sweep_main

        sys.exit(sweep_main(args[1:]))
    if args and args[0] == "tune":
        from tokcompile.tune_cli import tune_main

        sys.exit(tune_main(args[1:]))
    if args and args[0] == "report":
        sys.exit(report_main(args[1:]))
    if args and args[0] == "compile":
        args = args[1:]
    sys.exit(main(args))
