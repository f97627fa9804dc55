"""Independent eager reference of VisPruner on Qwen2.5-VL, written the way LightCompress runs it
(`llmc/compression/token_reduction/vispruner.py`: the replacement attention of the tower's last block,
`merger_hook`, `prune_qwenv25vl_hook`), on the HF model itself. What LightCompress does, in my words:
* The attention each image token receives in the tower's last block (as for VisionZip: head mean, summed over
  the queries, the mean over its 2x2 group, back in the processor's order) ranks the N image tokens.
* T = round(N·(1 - prune_ratio)) stay; T_imp = int(T·important_ratio), plus one when N - T_imp is odd; the
  T_imp best-ranked tokens are important, the rest are candidates in rank order.
* Rounds while T - T_imp > 0: r = min(8, R - (T - T_imp)); the candidates' projected features, L2-normalised,
  split into even and odd places; each even one's best cosine to the odd ones; the r most similar even ones
  (`argsort` descending) leave; the survivors are the remaining even ones in that order, then the odd ones.
* The important tokens and the survivors are kept, the sequence cut to them in original order.
Where this reference differs: one sample at a time; ranks break ties to the lower index (stable sorts).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tests.references.visionzip_qwen import run_with_tower_hooks, tower_scores


@torch.no_grad()
def vispruner_qwen_reference(model: nn.Module, sample: dict[str, Tensor], *, image_token_id: int,
                             prune_ratio: float, important_ratio: float) -> tuple[Tensor, Tensor]:
    """Next-token logits (V,) and the kept image tokens ((T,) indices into the span, ascending)."""
    visual = model.model.visual
    ids = sample["input_ids"][0]
    result: dict[str, Tensor] = {}

    def prune(emb: Tensor, seen: dict) -> tuple[Tensor, Tensor]:
        score, _ = tower_scores(visual, seen, sample["image_grid_thw"])
        n = score.shape[0]
        start = int(torch.nonzero(ids == image_token_id)[0])
        feats = emb[0, start:start + n].float()  # (N, D)
        T = round(n * (1 - prune_ratio))
        important = int(T * important_ratio)
        if (n - important) % 2:
            important += 1
        diverse = T - important
        order = torch.sort(score, descending=True, stable=True).indices  # (N,)
        keep, residual = order[:important], order[important:]
        unit = feats / feats.norm(dim=-1, keepdim=True)
        while diverse > 0:
            R = len(residual)
            r = min(8, R - diverse)
            if r <= 0:
                break
            a, b = unit[residual[::2]], unit[residual[1::2]]
            best = (a @ b.t()).max(-1).values  # (R/2,)
            distinct = torch.sort(best, descending=True, stable=True).indices[r:]
            residual = torch.cat([residual[::2][distinct], residual[1::2]])
        kept = torch.cat([keep, residual]) if diverse > 0 else keep
        kept = kept.sort().values
        result["kept"] = kept
        rows = torch.ones(emb.shape[1], dtype=torch.bool)
        rows[start:start + n] = False
        rows[start + kept] = True
        return emb, rows

    logits = run_with_tower_hooks(model, sample, prune)
    return logits, result["kept"]
