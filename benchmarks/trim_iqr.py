"""How many patches TRIM's IQR rule selects, and how often that count exceeds the static `max_tokens`.

    python benchmarks/trim_iqr.py                     # medium LLaVA (576 patches), 64 random image/question pairs
    python benchmarks/trim_iqr.py --size tiny --samples 256

The static TRIM pads the IQR count n* (the official code's `int(P · count / P)`) to `max_tokens` slots; where n*
is larger the lowest-scoring excess joins the aggregated token and the compile warns. This script runs the
vision tower (built-in random LLaVA) and the built-in CLIP (random weights) on random images and questions of
random length, computes n* exactly as the reducer does (eager, fp32), and prints its distribution and the share
of samples above each candidate `max_tokens`. Random weights make the figures a property of the mechanics, not
of a trained CLIP: measure on your own checkpoint and data before choosing `max_tokens`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = ("red", "blue", "circle", "square", "left", "right", "how", "many", "is", "there", "a", "the", "what",
         "colour", "shape", "of", "on", "large", "small", "picture", "count", "which", "side")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="medium", help="built-in LLaVA size: medium (default) or tiny")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import numpy as np
    import torch

    from tokcompile.models import ADAPTERS
    from tokcompile.models.reduced import VisionSteps
    from tokcompile.models.tiny import build_model, build_processor
    from tokcompile.parity import process
    from tokcompile.question import QuestionTokenizer, QuestionTokens
    from tokcompile.reduce.base import Entering
    from tokcompile.reduce.clip_text import QuestionHead
    from tokcompile.reduce.context import ImageContext
    from tokcompile.reduce.state import ImageTokens
    from tokcompile.reduce.trim import TRIMConfig, iqr_counts, outlier_count_table

    model = build_model("llava", seed=0, size=args.size).eval()
    processor = build_processor("llava", args.size)
    adapter = ADAPTERS.get("llava")()
    g = adapter.geometry(model.config, None)
    cfg = TRIMConfig(text_encoder=f"tiny-random:clip@{g.vision_hidden_size}")
    (step,) = cfg.plan(g, "sparse.special", Entering.start_for(g, adapter))
    head, tok = QuestionHead.load(cfg.text_encoder), QuestionTokenizer.load(cfg.question("sparse.special"))
    rng = np.random.default_rng(args.seed)
    P = g.n_image_tokens
    table = torch.tensor(outlier_count_table(P))
    counts = []
    for _ in range(args.samples):
        question = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 16)))) + "?"
        batch = process(processor, adapter, g, adapter.random_media(rng, 1, g), [question])
        q = QuestionTokens(*tok([question]).values())
        with torch.no_grad():  # the selected layer's tokens (CLS first), as TRIM receives them
            tokens = adapter.vision_tokens(model, batch["pixel_values"], VisionSteps((), (), ()))
            feats = torch.cat([tokens.hidden[:, :1] * 0, tokens.hidden], dim=1)  # (1, 1 + P): a CLS slot, unscored
            ctx = ImageContext(module=head, question=q)  # what TRIM reads from its context
            scores = cfg.scores(ImageTokens(feats, tokens.source, None, 1), ctx)  # (1, P)
        counts.append(int(table[iqr_counts(scores)][0]))
    c = np.array(counts)
    print(f"TRIM IQR count on the built-in {args.size} LLaVA ({P} patches) and CLIP, random weights, "
          f"{args.samples} random image/question pairs:")
    print(f"  n*: min {c.min()}, median {int(statistics.median(counts))}, mean {c.mean():.1f}, max {c.max()} "
          f"({100 * c.mean() / P:.1f}% of the patches on average)")
    for m in sorted({step.n_out - 2, 64, 128, 192} & set(range(1, P - 1))):
        print(f"  max_tokens {m:4d}: {100 * float((c > m).mean()):5.1f}% of samples exceed it")


if __name__ == "__main__":
    main()
