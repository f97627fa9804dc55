"""ToMe: "Token Merging: Your ViT But Faster" (Bolya et al., ICLR 2023, arXiv:2210.09461).

Inside every vision block, between the attention residual and the MLP, the tokens are split by position into
two alternating sets A (even) and B (odd); each A token finds its most similar B token by the cosine of the
block's keys averaged over heads, and the `r` A tokens with the most similar partners are merged into them
by a size-weighted average. The CLS token never merges, so each block removes `min(r, (t-1)//2)` tokens and
the tower's later blocks, the projector and the whole decoder see the shorter sequence (LightCompress runs it
in LLaVA's CLIP tower with sizes reset every block and no proportional attention; ToMe's own default carries
sizes across blocks and adds `log(size)` to every attention logit: `prop_attn: true`).

Static-export deviations from the paper, the official code and LightCompress (`token_reduction/tome.py`):
- The merge is a one-hot (A -> B) matmul into the B slots and the unmerged A tokens come from a constant-k
  top-k, instead of `argsort` + `scatter_reduce`: no shape depends on the data and no atomics decide sums.
- Ties rank by (score descending, A index ascending) (LightCompress's `argsort` is unstable), and an A row
  whose best score is shared goes to the lowest B index, written out so every backend agrees.
- The similarity is computed in fp32 whatever the model dtype; the merge runs in the model dtype. Both
  decisions (each A token's partner, the r A tokens that merge) are taken on the A·Bᵀ matrix alone, which goes
  through `ctx.decision` (`Step.scored` = 1 per block, nA·nB values): a graph whose merges differ from eager's
  at a near-tie is replayed on its own matrix.
- Blocks after LLaVA's feature layer never run (LightCompress merges in them and discards the result).
- Schedule of `r`, as LightCompress reads it: an int (every block), a two-entry list `[start, step]`
  (`r_l = max(int(start + l*step), 0)`), or one entry per block. ToMe's `parse_r` `(r, inflect)` schedule is
  the separate key `inflect`: `min = int(r*(1-inflect))`, `max = 2r - min`, `r_l = int(min + (max-min)/(L-1)*l)`
  with L = the blocks that run (`geom.vision_layers`; the reference's `tome_schedule` takes L from its caller
  and ToMe's `parse_r` uses every block of the ViT). Unlike LightCompress, a negative int r or entry and a
  per-block list of the wrong length are recipe errors, not silently clamped or zero-padded.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from tokcompile.errors import RecipeError
from tokcompile.reduce.base import REDUCERS, Entering, is_int, is_number
from tokcompile.reduce.ops import gather_tokens, rank_desc, topk_sorted
from tokcompile.reduce.schedule import Output, Schedule, Site, Step

if TYPE_CHECKING:
    from torch import Tensor

    from tokcompile.models.geometry import Geometry
    from tokcompile.reduce.context import VisionContext
    from tokcompile.reduce.state import ImageTokens

PROTECTED = 1  # CLIP's CLS token: never a source (`class_token=True`)


@REDUCERS.register("tome")
@dataclass(frozen=True)
class ToMeConfig:
    """ToMe parameters under LightCompress's names.

    Args:
        r: tokens merged away per block: an int, `[start, step]`, or one entry per vision block (the blocks
            that run, or LLaVA-1.5's whole tower, whose last block never runs: its entry is ignored).
        inflect: with an int r, ToMe's `(r, inflect)` schedule (-1 <= inflect <= 1 sensible; None: constant).
        prop_attn: carry token sizes across blocks and add log(size) to the attention logits (official ToMe);
            false (LightCompress) resets sizes to 1 in every block.
    """

    r: Any = 16
    inflect: Any = None
    prop_attn: bool = False

    method: ClassVar[str] = "ToMe"
    sites: ClassVar[frozenset[Site]] = frozenset({Site.VISION_BLOCK})

    def per_block(self, geom: Geometry, key: str) -> list[int]:
        """r_l for each vision block that runs (before the (t-1)//2 clamp)."""
        L, r = geom.vision_layers, self.r
        if self.inflect is not None:
            if not is_number(self.inflect):
                raise RecipeError(f"{key}.inflect", f"expected a number, got {type(self.inflect).__name__} "
                                                    f"{self.inflect!r}")
            if not is_int(r):
                raise RecipeError(f"{key}.inflect", f"ToMe's inflect schedule needs an int r, not {r!r}; give r: "
                                                    "<int> or drop inflect")
            if r < 0:
                raise RecipeError(f"{key}.r", f"{r} is negative; use the tokens merged per block (>= 0)")
            lo = int(r * (1.0 - self.inflect))
            hi = 2 * r - lo
            step = (hi - lo) / (L - 1) if L > 1 else 0.0
            return [max(int(lo + step * i), 0) for i in range(L)]
        if is_int(r):
            if r < 0:
                raise RecipeError(f"{key}.r", f"{r} is negative; use the tokens merged per block (>= 0)")
            return [r] * L
        if not isinstance(r, (list, tuple)) or not all(is_number(v) for v in r):
            raise RecipeError(f"{key}.r", f"expected an int, [start, step] or one int per vision block, got {r!r}")
        if len(r) == 2:  # LightCompress: (start, step), clamped at 0
            start, step = r
            return [max(int(start + i * step), 0) for i in range(L)]
        if len(r) not in (L, L + 1):
            raise RecipeError(f"{key}.r", f"a list gives one r per vision block: {L} entries (the blocks that run) "
                                          f"or {L + 1} (the whole tower), got {len(r)}; or an int, or [start, step] "
                                          "(how every 2-entry list is read)")
        bad = [v for v in r if not is_int(v) or v < 0]
        if bad:
            raise RecipeError(f"{key}.r", f"entry {bad[0]!r} is not an int >= 0")
        return [int(v) for v in r[:L]]

    def plan(self, geom: Geometry, key: str, entering: Entering) -> Schedule:
        if not isinstance(self.prop_attn, bool):
            raise RecipeError(f"{key}.prop_attn", f"expected true or false, got {self.prop_attn!r}")
        t = entering.vision_tokens
        steps = []
        for layer, r_l in enumerate(self.per_block(geom, key)):
            r_eff = min(r_l, (t - PROTECTED) // 2)
            if r_eff <= 0:
                continue
            steps.append(Step("tome", Site.VISION_BLOCK, layer, t, t - r_eff, output=Output.ASSIGN, scored=1))
            t -= r_eff
        if not steps:
            raise RecipeError(f"{key}.r", f"{self.r!r} merges no token in any of the {geom.vision_layers} vision "
                                          "blocks that run; use r >= 1 or remove the ToMe block")
        if t - PROTECTED < 1:
            raise RecipeError(f"{key}.r", f"the schedule leaves {t - PROTECTED} image tokens; lower r")
        return tuple(steps)

    def scoring_flops(self, step: Step, geom: Geometry, n_tokens: int) -> int:
        """The A·Bᵀ similarity of the bipartite split (2·⌈t/2⌉·⌊t/2⌋·dv/H per head-averaged key); the block's
        keys come from its own attention."""
        head_dim = geom.vision_hidden_size // geom.vision_heads
        return 2 * ((n_tokens + 1) // 2) * (n_tokens // 2) * head_dim

    def apply(
        self, state: ImageTokens, ctx: VisionContext, step: Step, forced: Tensor | None = None
    ) -> tuple[ImageTokens, Tensor]:
        x = state.hidden  # (B, t, Dv)
        B, t, _ = x.shape
        dev = x.device
        r = step.n_in - step.n_out
        nA, nB = (t + 1) // 2, t // 2  # A: even positions (CLS first), B: odd positions
        n_unm = nA - r
        cols = torch.arange(nB, device=dev)  # (nB,)
        if forced is None:
            m = ctx.mean_keys().float()  # (B, t, dv) keys averaged over heads
            m = m / m.norm(dim=-1, keepdim=True)  # (B, t, dv)
            S = m[:, 0::2] @ m[:, 1::2].transpose(1, 2)  # (B, nA, nB)
            S = ctx.decision(S)  # (B, nA, nB): both decisions follow from S alone
            protect = torch.arange(nA, device=dev) < state.n_protected  # (nA,)
            S = S.masked_fill(protect[None, :, None], float("-inf"))  # (B, nA, nB)
            node_max = S.amax(dim=-1)  # (B, nA)
            node_idx = torch.where(S == node_max[..., None], cols, nB).amin(dim=-1)  # (B, nA) lowest B on ties
            src = rank_desc(node_max) < r  # (B, nA) the r best A tokens merge
        else:  # eager references replay an assignment made earlier: (B, t) output slots
            fa = forced[:, 0::2]  # (B, nA)
            src = fa >= n_unm  # (B, nA)
            node_idx = (fa - n_unm).clamp(min=0)  # (B, nA)

        # Parity output: the output slot of every entering token.
        slot_a = (~src).long().cumsum(1) - 1  # (B, nA) unmerged A keep their order, CLS first
        assign_a = torch.where(src, n_unm + node_idx, slot_a)  # (B, nA)
        assign_b = (n_unm + cols)[None].expand(B, nB)  # (B, nB)
        assign = torch.stack([assign_a[:, :nB], assign_b], dim=2).reshape(B, 2 * nB)  # (B, 2·nB) interleaved
        if t % 2:
            assign = torch.cat([assign, assign_a[:, nB:]], dim=1)  # (B, t)

        # Size-weighted average into the B slots, as a one-hot matmul.
        if self.prop_attn and state.sizes is not None:
            size = state.sizes.to(x.dtype)  # (B, t)
        else:
            size = torch.ones(B, t, dtype=x.dtype, device=dev)  # (B, t)
        size_a, size_b = size[:, 0::2], size[:, 1::2]  # (B, nA), (B, nB)
        xw = x * size[..., None]  # (B, t, Dv)
        onehot = ((node_idx[..., None] == cols) & src[..., None]).to(x.dtype).transpose(1, 2)  # (B, nB, nA)
        num = xw[:, 1::2] + onehot @ xw[:, 0::2]  # (B, nB, Dv)
        den = size_b + (onehot @ size_a[..., None])[..., 0]  # (B, nB)
        merged = num / den[..., None]  # (B, nB, Dv)

        unm_idx = topk_sorted((~src).float(), n_unm)  # (B, n_unm) unmerged A, ascending (CLS first)
        hidden = torch.cat([gather_tokens(x[:, 0::2], unm_idx), merged], dim=1)  # (B, t', Dv)
        source = torch.cat([gather_tokens(state.source[:, 0::2], unm_idx), state.source[:, 1::2]], dim=1)  # (B, t')
        sizes = torch.cat([gather_tokens(size_a, unm_idx), den], dim=1) if self.prop_attn else None  # (B, t')
        return replace(state, hidden=hidden, source=source, sizes=sizes), assign
