"""k-means with a fixed seed and iteration count (PACT's `use_kmeans` baseline), static.

The official code trains faiss's GPU k-means (k = int(p·n) of the n image tokens entering the layer, on the m
kept ones; 100 iterations, L2 on the raw clustering vectors) and names each cluster after the member nearest its
centroid; faiss refuses k > m, which the IQR rule can reach, so here k falls to m then. faiss seeds from its own
random sampling and splits empty clusters, neither of which a static graph can reproduce, so this is the same
algorithm with a seeding that is fixed at compile time:
- **k-means++ seeding** with uniforms u_0..u_{k-1} from numpy's `default_rng(seed)`, fixed at compile time: the
  first centroid is member floor(u_0·m) (in index order), each next one the first member whose running sum of
  D² (squared distance to the nearest chosen centroid) exceeds u_c times its total;
- **Lloyd iterations**, `iters` of them: every member joins its nearest centroid (first on ties), every
  centroid with members moves to their mean (an empty one stays);
- the centre of each cluster that has members is the member nearest its centroid, the lowest index among those
  within a relative 1e-5 of the nearest squared distance (a two-member cluster is an exact tie, which the
  official `torch.cdist` argmin leaves to rounding); the cluster count can fall below k when clusters empty,
  so the step has k slots.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

TIE = 1e-5  # squared distances within this relative margin of the nearest count as tied (a two-member cluster's
# centroid is their midpoint: an exact tie that rounding would otherwise decide)


def _sq_dist(a: Tensor, b: Tensor) -> Tensor:
    """(B, n, F), (B, k, F) -> (B, n, k) squared L2 distances, fp32, in the expanded form |a|² + |b|² − 2a·b
    (memory n·k, not n·k·F)."""
    return ((a * a).sum(-1)[:, :, None] + (b * b).sum(-1)[:, None, :] - 2 * a @ b.transpose(1, 2)).clamp(min=0)


def seeding_uniforms(k: int, seed: int) -> Tensor:
    """The k uniforms of the seeding: numpy's `default_rng(seed).random(k)`, drawn in Python while the graph is
    traced, so the graph holds them as constants (a torch generator would be traced as a random op)."""
    return torch.tensor(np.random.default_rng(seed).random(k), dtype=torch.float64)


def kmeans_labels(x: Tensor, member: Tensor, k_max: int, seed: int, iters: int) -> Tensor:
    """(B, n) the centre of every point's cluster (-1 for points that take no part).

    Args:
        x: (B, n, F) the clustering vectors; member: (B, n) bool, the points that take part (m per sample).
        k_max: the cluster count, min(k_max, m) per sample.
    """
    B, n, _ = x.shape
    dev = x.device
    xf = x.float()
    sq = _sq_dist(xf, xf)  # (B, n, n)
    k = member.sum(-1, keepdim=True).clamp(max=k_max)  # (B, 1)
    u = seeding_uniforms(k_max, seed).to(dev)  # (k_max,)
    order = member.long().cumsum(-1) - 1  # (B, n): rank among the members
    first_rank = torch.floor(member.sum(-1, keepdim=True).double() * u[0]).long()  # (B, 1)
    pick = ((order == first_rank) & member).float().argmax(-1, keepdim=True)  # (B, 1)
    chosen = [pick]
    d2 = sq.gather(1, pick[..., None].expand(B, 1, n))[:, 0]  # (B, n) to the nearest chosen centroid
    for c in range(1, k_max):
        w = torch.where(member, d2, 0.0).double()  # (B, n)
        cum = w.cumsum(-1)
        over = member & (cum > u[c] * cum[:, -1:])  # (B, n)
        pick = torch.where(c < k, over.float().argmax(-1, keepdim=True), chosen[-1])  # (B, 1)
        chosen.append(pick)
        d2 = torch.minimum(d2, sq.gather(1, pick[..., None].expand(B, 1, n))[:, 0])
    seeds = torch.cat(chosen, dim=1)  # (B, k_max)
    live = torch.arange(k_max, device=dev)[None] < k  # (B, k_max) the sample's own k centroids
    cent = xf.gather(1, seeds[..., None].expand(B, k_max, xf.shape[-1]))  # (B, k_max, F)
    slots = torch.arange(k_max, device=dev)

    def members_of(centroids: Tensor) -> tuple[Tensor, Tensor]:
        """Every point's nearest live centroid (B, n) and the membership one-hot (B, n, k_max) of the members."""
        assign = torch.where(live[:, None, :], _sq_dist(xf, centroids), float("inf")).argmin(-1)  # (B, n)
        return assign, ((assign[..., None] == slots) & member[..., None]).float()

    for _ in range(iters):
        _, onehot = members_of(cent)
        count = onehot.sum(1)  # (B, k_max)
        mean = (onehot.transpose(1, 2) @ xf) / count.clamp(min=1)[..., None]
        cent = torch.where((count > 0)[..., None], mean, cent)
    assign, onehot = members_of(cent)  # the final assignment
    own = cent.gather(1, assign[..., None].expand_as(xf))  # (B, n, F) each point's centroid
    d_own = ((xf - own) ** 2).sum(-1)  # (B, n) from the difference: the expanded form cancels between near points
    near = torch.where(onehot.bool(), d_own[..., None], float("inf"))  # (B, n, k_max) members only
    best = near.amin(1, keepdim=True)  # (B, 1, k_max)
    tied = near <= best * (1 + TIE) + 1e-12  # (B, n, k_max): within TIE of the nearest member
    centre_of = tied.float().argmax(1)  # (B, k_max): the lowest-index member among them
    return torch.where(member, centre_of.gather(1, assign), -1)  # (B, n)
