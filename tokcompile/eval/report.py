"""Markdown for evaluation results (`eval.json` -> `eval.md`)."""

from __future__ import annotations

from typing import Any


def markdown_table(doc: dict[str, Any]) -> str:
    """One table per dataset: a row per position with accuracy, agreement and first-token KL against
    `pretrain`, and accuracy per question type where the dataset has types."""
    lines = ["# Evaluation", ""]
    for name, data in doc["datasets"].items():
        positions = data["positions"]
        types = sorted({t for row in positions.values() for t in row["per_type"]})
        lines += [f"## {name} ({data['samples']} samples)", ""]
        head = ["position", "accuracy", "agreement with pretrain", "first-token KL vs pretrain", *types, "seconds"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for pos, row in positions.items():
            agree = f"{row['agreement_with_pretrain']:.3f}" if "agreement_with_pretrain" in row else "-"
            kl = f"{row['kl_first_token_vs_pretrain']:.2e}" if "kl_first_token_vs_pretrain" in row else "-"
            cells = [pos, f"{row['accuracy']:.3f}", agree, kl, *(f"{row['per_type'].get(t, 0):.3f}" for t in types),
                     f"{row['seconds']:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)
