"""How much of the objects FastV keeps on `tiny-trained:shapes`: rank each test image's 256 patches as FastV does
(the last prompt token's attention in decoder layer K-1, mean over heads) and count the patches covered by an
object among the top k, against k/256 for a random choice.

    python tools/fastv_coverage.py --images 64 --layer 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_shapes import patch_targets  # noqa: E402

from tokcompile.data import shapes  # noqa: E402
from tokcompile.eval.batches import answer_batch  # noqa: E402
from tokcompile.models import tiny  # noqa: E402


def main(argv: list[str] | None = None) -> dict[int, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64, help="test images (one question each)")
    ap.add_argument("--layer", type=int, default=1, help="decoder layer whose attention ranks (FastV's K - 1)")
    args = ap.parse_args(argv)
    model = tiny.build_from_path("tiny-trained:shapes").eval()
    model.set_attn_implementation("eager")  # attention probabilities are returned by the eager kernel only
    processor = tiny.build_processor("llava", "shapes")
    items = shapes.samples("test", args.images)
    batch = answer_batch(processor, items)
    with torch.no_grad():
        attn = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"], position_ids=batch["position_ids"],
                     output_attentions=True).attentions[args.layer]  # [B, H, T, T]
    budgets = (64, 128, 192)
    kept, on_objects = dict.fromkeys(budgets, 0), 0
    for b, sample in enumerate(items):
        image = (batch["input_ids"][b] == model.config.image_token_id).nonzero().reshape(-1)  # (256,)
        last = int((batch["labels"][b] != -100).nonzero().min()) - 1  # the prompt's last token
        order = attn[b, :, last, image].mean(0).argsort(descending=True)  # (256,) patches, most attended first
        grid = int(image.numel() ** 0.5)
        covered = patch_targets(sample.items, grid)[:, 0] > 0  # (256,) patch mostly covered by an object
        on_objects += int(covered.sum())
        for k in budgets:
            kept[k] += int(covered[order[:k]].sum())
    share = {k: kept[k] / on_objects for k in budgets}
    print(f"{on_objects / len(items):.1f} object patches per image of 256")
    for k in budgets:
        print(f"FastV keeping {k}: {share[k]:.3f} of the object patches (random choice: {k / 256:.3f})")
    return share


if __name__ == "__main__":
    main()
