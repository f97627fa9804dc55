"""`python -m tokcompile report EXPORT_DIR... --out REPORT_DIR`: several exports of one model (methods, budgets)
in one report: a Markdown and an HTML table, and PNG plots of accuracy against the prefill FLOPs ratio and
against the measured time to first token, one point per export and one series per method.

Accuracy is read from each export's eval.json (the `exported` position, else `transformed`); the FLOPs ratio
from flops.json (`total_exact`: vision, decoder and lm_head); the time to first token is measured here, one
prompt at a time through onnxruntime on the export's own evaluation questions (median of `measure` runs).
Plots need matplotlib (`pip install 'tokcompile[report]'`); without it the tables are still written.
"""

from __future__ import annotations

import html
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokcompile.errors import RecipeError

ACCURACY_POSITIONS = ("exported", "transformed", "fake_quant", "pretrain")


def _read(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RecipeError(str(path), f"is missing; {what}") from None
    except (OSError, ValueError) as e:
        raise RecipeError(str(path), f"could not be read ({e}); recompile the export") from None


def _method(manifest: dict) -> str:
    steps = manifest.get("schedule") or []
    return "+".join(dict.fromkeys(s["method"] for s in steps)) or "none"


def _setting(sparse: Any) -> str:
    """The recipe's reduction parameters as `key=value` lists, one per method named in its `sparse` section
    (nested `special`/`vision` blocks included), e.g. "pruning_loc=2, rate=0.5"; "" without one."""
    found: list[str] = []

    def walk(block: Any) -> None:
        if not isinstance(block, dict):
            return
        if block.get("method") not in (None, "TokenReduction"):
            found.append(", ".join(f"{k}={v}" for k, v in block.items() if k != "method"))
        for value in block.values():
            walk(value)

    walk(sparse)
    return "; ".join(found)


def _ttft_ms(export_dir: Path, questions: list[Any], runs: int) -> float | None:
    """Median seconds from (image, question) to the first answer token, batch 1, onnxruntime; None without an
    ONNX export."""
    from tokcompile.runtime import load

    manifest = _read(export_dir / "manifest.json", "is this an export directory?")
    if "onnxruntime" not in manifest.get("backends", {}):
        return None
    gen = load(export_dir, "onnxruntime")
    q = questions[0]
    gen.generate([q.image], [q.question], max_new_tokens=1)  # warm-up
    times = []
    for i in range(runs):
        q = questions[i % len(questions)]
        start = time.perf_counter()
        gen.generate([q.image], [q.question], max_new_tokens=1)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def collect(export_dirs: list[Path], measure: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """One row per export: name, method and its setting, image tokens reaching the decoder, FLOPs ratio, accuracy
    per dataset, the first dataset's agreement with pretrain and accuracy per question type, and the measured time
    to first token."""
    from tokcompile.eval.datasets import QA

    rows = []
    for d in export_dirs:
        manifest = _read(d / "manifest.json", "is this an export directory?")
        flops = _read(d / "flops.json", "recompile the export")
        evaluation = _read(d / "eval.json", "compile the export with an eval section (eval: {name: [shapes]})")
        accuracy, position = {}, None
        for name, data in evaluation["datasets"].items():
            position = next(p for p in ACCURACY_POSITIONS if p in data["positions"])
            accuracy[name] = data["positions"][position]["accuracy"]
        first = next(iter(evaluation["datasets"].values()))
        scored = first["positions"][next(p for p in ACCURACY_POSITIONS if p in first["positions"])]
        plan = manifest.get("plan", {})
        per_layer = plan.get("image_tokens_per_layer") or [plan.get("image_tokens_to_decoder")]
        tokens = f"{per_layer[0]}" if per_layer[0] == per_layer[-1] else f"{per_layer[0]} to {per_layer[-1]}"
        row = {"export": manifest.get("name", d.name), "dir": str(d), "method": _method(manifest),
               "setting": _setting((manifest.get("recipe") or {}).get("sparse")), "image_tokens": tokens,
               "flops_ratio": flops["total_exact"]["ratio"],
               "accuracy": accuracy, "position": position, "per_type": scored.get("per_type", {}),
               "agreement": scored.get("agreement_with_pretrain"),
               "pretrain": {n: v["positions"]["pretrain"]["accuracy"] for n, v in evaluation["datasets"].items()
                            if "pretrain" in v["positions"]}}
        if measure:
            from tokcompile.eval.datasets import load_dataset

            cfg = evaluation["config"]
            questions: list[QA] = load_dataset(next(iter(evaluation["datasets"])), cfg.get("path"),
                                               min(measure, first["samples"]), cfg.get("split", "test"))
            row["ttft_ms"] = _ttft_ms(d, questions, measure)
            log(f"  {row['export']}: time to first token {row['ttft_ms']:.1f} ms" if row["ttft_ms"] is not None
                else f"  {row['export']}: no ONNX graphs, time to first token not measured")
        rows.append(row)
    return rows


def _table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """One row per export, by method and then falling FLOPs; agreement and the per-type columns are those of the
    first dataset in each export's eval.json, at the position its accuracy comes from."""
    datasets = sorted({n for r in rows for n in r["accuracy"]})
    types = sorted({t for r in rows for t in r.get("per_type", {})})
    head = ["method", "setting", "image tokens (decoder layers)", "FLOPs ratio", *(f"{n} accuracy" for n in datasets),
            "agreement with pretrain", *types, "time to first token (ms)", "export"]
    body = []
    for r in sorted(rows, key=lambda r: (r["method"], -r["flops_ratio"], r["setting"])):
        ttft, agree, per_type = r.get("ttft_ms"), r.get("agreement"), r.get("per_type", {})
        body.append([r["method"], r.get("setting") or "-", str(r["image_tokens"]), f"{r['flops_ratio']:.3f}",
                     *(f"{r['accuracy'][n]:.3f}" if n in r["accuracy"] else "-" for n in datasets),
                     f"{agree:.3f}" if agree is not None else "-",
                     *(f"{per_type[t]:.2f}" if t in per_type else "-" for t in types),
                     f"{ttft:.1f}" if ttft is not None else "-", r["export"]])
    return head, body


def plot_accuracy(rows: list[dict[str, Any]], key: str, label: str, path: Path) -> bool:
    """Accuracy (the first dataset's) against `rows[i][key]`, one series per method, as a PNG at `path`.
    False where matplotlib is missing or no row has `key`."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    dataset = sorted({n for r in rows for n in r["accuracy"]})[0]
    points = [r for r in rows if r.get(key) is not None and dataset in r["accuracy"]]
    if not points:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    colours, markers = plt.get_cmap("tab20").colors, "osD^v<>ph*"  # distinct (colour, marker) for 20 series
    for i, method in enumerate(sorted({r["method"] for r in points})):
        series = sorted((r[key], r["accuracy"][dataset]) for r in points if r["method"] == method)
        ax.plot([x for x, _ in series], [y for _, y in series], marker=markers[i % len(markers)],
                color=colours[i % len(colours)], label=method)
    ax.set_xlabel(label)
    ax.set_ylabel(f"{dataset} accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _plots(rows: list[dict[str, Any]], out: Path) -> list[str]:
    files = []
    for key, label, name in (("flops_ratio", "prefill FLOPs ratio (reduced / dense)", "accuracy_vs_flops.png"),
                             ("ttft_ms", "time to first token (ms, onnxruntime, batch 1)", "accuracy_vs_ttft.png")):
        if plot_accuracy(rows, key, label, out / name):
            files.append(name)
    return files


def write_report(export_dirs: list[Path], out: Path, measure: int = 8,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write report.md, report.html, report.json and the plots into `out`; returns the rows and file names."""
    rows = collect(export_dirs, measure, log)
    out.mkdir(parents=True, exist_ok=True)
    head, body = _table(rows)
    plots = _plots(rows, out)
    md = ["# Accuracy and cost", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(cells) + " |" for cells in body]
    md += [""] + [f"![{p}]({p})" for p in plots]
    if not plots:
        md.append("(plots need matplotlib: pip install 'tokcompile[report]')")
    (out / "report.md").write_text("\n".join(md) + "\n")
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    heads = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    images = "".join(f'<p><img src="{html.escape(p)}" alt="{html.escape(p)}"></p>' for p in plots)
    (out / "report.html").write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>Accuracy and cost"
                                     f"</title></head><body><h1>Accuracy and cost</h1><table border='1'>"
                                     f"<tr>{heads}</tr>{cells}</table>{images}</body></html>\n")
    (out / "report.json").write_text(json.dumps({"rows": rows, "plots": plots}, indent=1) + "\n")
    return {"rows": rows, "plots": plots}
