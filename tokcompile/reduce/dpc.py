"""Density-peak clustering with a fixed share of centres (PACT's `use_dpc` baseline; official `DPC.fit` in
orailix/PACT `transformers/PACT/utils.py`), static.

On cosine distances d (clamped at 0, zero diagonal) between the points taking part: density ρ_i = Σ_j
exp(−(d_ij/2)²); δ_i = the distance to the nearest point at least as dense (first index on ties; ∞ for the
densest), whose index is i's "parent"; the int(p·m) points of largest γ = δ·ρ are the centres (m points take
part). Every other point takes its parent's cluster, visited by density descending, so it ends in the cluster of
the first centre up its chain of parents. Here that chain is followed by pointer jumping: ⌈log2 n⌉ + 1 rounds
of parent ← parent[parent] reach every chain's end, a fixed trip count. Points whose chain meets a density tie
before a centre (the official loop leaves them unlabelled) are the one case this does not reproduce.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from tokcompile.reduce.dbdpc import DENSITY_SCALE, cosine_distances
from tokcompile.reduce.ops import rank_desc

if TYPE_CHECKING:
    from tokcompile.reduce.context import Decide


def dpc_labels(x: Tensor, member: Tensor, share: float, decide: Decide | None = None) -> Tensor:
    """(B, n) the centre of every point's cluster (-1 for points that take no part).

    Args:
        x: (B, n) points' clustering vectors (B, n, F).
        member: (B, n) bool, the points that take part (m per sample).
        share: the share of them that become centres: int(share·m) per sample.
        decide: maps the (B, n, n) distances to the ones every decision is taken on (`ctx.decision`).
    """
    B, n, _ = x.shape
    dev = x.device
    dist = cosine_distances(F.normalize(x.float(), p=2.0, dim=-1))  # (B, n, n)
    dist = dist if decide is None else decide(dist)  # density, parents and γ follow from it alone
    rho = (torch.exp(-(dist / DENSITY_SCALE) ** 2) * member[:, None, :]).sum(-1)  # (B, n)
    not_self = ~torch.eye(n, dtype=torch.bool, device=dev)[None]
    denser = (rho[:, None, :] >= rho[:, :, None]) & not_self & member[:, None, :]  # (B, n, n)
    cond = torch.where(denser, dist, float("inf"))  # (B, n, n)
    delta = cond.amin(-1)  # (B, n)
    parent = cond.argmin(-1)  # (B, n): first index on ties, as torch.min
    gamma = torch.where(member, delta * rho, float("-inf"))  # (B, n)
    m = member.sum(-1, keepdim=True)  # (B, 1)
    k = torch.floor(m.double() * share).long()  # (B, 1): int(share·m) in double precision, as Python computes it
    centre = member & (rank_desc(gamma) < k)  # (B, n)
    idx = torch.arange(n, device=dev)[None].expand(B, n)
    parent = torch.where(centre, idx, parent)
    for _ in range(math.ceil(math.log2(max(n, 2))) + 1):
        parent = parent.gather(1, parent)
    return torch.where(member, parent, -1)
