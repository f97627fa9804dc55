"""Agglomerative clustering into a fixed share of clusters (PACT's `use_agglomerative` baseline; official
`Agglomerative.fit` in orailix/PACT `transformers/PACT/utils.py`, which runs scikit-learn's
`AgglomerativeClustering(n_clusters, linkage, metric="precomputed")` on cosine distances), static.

int(p·m) clusters of the m points taking part; each cluster's centre is the member nearest (cosine) to the mean
of the members' clustering vectors. Linkages:
- **single:** the clusters are the components of the minimum spanning tree without its int(p·m) − 1 longest
  edges. Prim's algorithm grows the tree one point per step (n − 1 masked steps), recording every point's
  parent; the cut points become roots, and ⌈log2 n⌉ + 1 rounds of pointer jumping give every point its root.
- **complete** and **average:** the closest pair of clusters merges, m − int(p·m) times (at most n − 1 masked
  steps over the (n, n) cluster-distance matrix; Lance-Williams updates: the maximum, or the size-weighted mean).
Both equal scikit-learn's result when no two candidate distances tie; on ties the order of merges may differ.
The complete and average forms carry an (n, n) matrix through n − 1 unrolled steps: fine for a few hundred
tokens, heavy beyond.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from tokcompile.reduce.dbdpc import cosine_distances
from tokcompile.reduce.ops import rank_desc

if TYPE_CHECKING:
    from tokcompile.reduce.context import Decide

LINKAGES = ("single", "complete", "average")


def _roots(parent: Tensor) -> Tensor:
    """Follow parent pointers (B, n) to their roots by pointer jumping."""
    for _ in range(math.ceil(math.log2(max(parent.shape[1], 2))) + 1):
        parent = parent.gather(1, parent)
    return parent


def single_linkage(dist: Tensor, member: Tensor, k: Tensor) -> Tensor:
    """(B, n) a root per point: the points of one cluster share it. dist (B, n, n), member (B, n), k (B, 1)."""
    B, n, _ = dist.shape
    idx = torch.arange(n, device=dist.device)[None].expand(B, n)
    start = member.float().argmax(-1, keepdim=True)  # (B, 1) the first point taking part
    in_tree = idx == start  # (B, n)
    best = dist.gather(1, start[..., None].expand(B, 1, n))[:, 0]  # (B, n) distance to the tree
    via = start.expand(B, n)  # (B, n) the tree point at that distance
    parent, edge = idx, torch.full((B, n), float("-inf"), device=dist.device)
    for _ in range(n - 1):
        grow = member & ~in_tree  # (B, n)
        v = torch.where(grow, best, float("inf")).argmin(-1, keepdim=True)  # (B, 1) the nearest outside point
        add = (idx == v) & grow.any(-1, keepdim=True)  # (B, n) one-hot, none once every point is in
        parent = torch.where(add, via, parent)
        edge = torch.where(add, best, edge)
        in_tree = in_tree | add
        dv = dist.gather(1, v[..., None].expand(B, 1, n))[:, 0]  # (B, n)
        closer = dv < best
        best, via = torch.where(closer, dv, best), torch.where(closer, v.expand(B, n), via)
    cut = rank_desc(edge) < (k - 1)  # (B, n): the k - 1 longest tree edges (roots' -inf edges rank last)
    return _roots(torch.where(cut, idx, parent))


def pairwise_linkage(dist: Tensor, member: Tensor, k: Tensor, linkage: str) -> Tensor:
    """(B, n) the cluster representative of every point under complete or average linkage."""
    B, n, _ = dist.shape
    dev = dist.device
    idx = torch.arange(n, device=dev)[None].expand(B, n)
    pair = member[:, :, None] & member[:, None, :] & ~torch.eye(n, dtype=torch.bool, device=dev)[None]
    D = torch.where(pair, dist, float("inf"))  # (B, n, n) distances between live clusters
    active, rep = member, idx  # live clusters (by representative); every point's cluster
    size = member.float()
    for _ in range(n - 1):
        merge = active.sum(-1, keepdim=True) > k  # (B, 1)
        flat = D.flatten(1).argmin(-1, keepdim=True)  # (B, 1) the closest pair (i < j: row-major, symmetric)
        i, j = flat // n, flat % n
        row_i = D.gather(1, i[..., None].expand(B, 1, n))[:, 0]  # (B, n)
        row_j = D.gather(1, j[..., None].expand(B, 1, n))[:, 0]
        if linkage == "complete":
            row = torch.maximum(row_i, row_j)
        else:
            si, sj = size.gather(1, i), size.gather(1, j)  # (B, 1)
            row = (si * row_i + sj * row_j) / (si + sj)
        is_i, is_j = idx == i, idx == j  # (B, n)
        row = torch.where(is_i | is_j | ~active, float("inf"), row)  # (B, n) the merged cluster's distances
        gone = merge & is_j  # (B, n)
        new_d = torch.where(is_i[:, :, None], row[:, None, :], torch.where(is_i[:, None, :], row[:, :, None], D))
        new_d = torch.where(gone[:, :, None] | gone[:, None, :], float("inf"), new_d)
        D = torch.where(merge[..., None], new_d, D)
        size = torch.where(merge & is_i, size + size.gather(1, j), size)
        rep = torch.where(merge & (rep == j), i.expand(B, n), rep)
        active = active & ~gone
    return rep


def agglomerative_labels(x: Tensor, member: Tensor, share: float, linkage: str, decide: Decide | None = None) -> Tensor:
    """(B, n) the centre of every point's cluster (-1 for points that take no part).

    Args:
        x: (B, n, F) the clustering vectors; member: (B, n) bool, the points that take part (m per sample).
        share: int(share·m) clusters per sample; linkage: "single", "complete" or "average".
        decide: maps the (B, n, n) distances (every merge follows from them), then the (B, n) distances of the
            points to their cluster's mean (the centre is the nearest), to the ones decided on (`ctx.decision`).
    """
    decide = decide or (lambda s: s)
    B, n, _ = x.shape
    dist = decide(cosine_distances(F.normalize(x.float(), p=2.0, dim=-1)))  # (B, n, n)
    k = torch.floor(member.sum(-1, keepdim=True).double() * share).long()  # (B, 1) int(share·m)
    group = single_linkage(dist, member, k) if linkage == "single" else pairwise_linkage(dist, member, k, linkage)
    same = (group[:, :, None] == group[:, None, :]) & member[:, None, :] & member[:, :, None]  # (B, n, n)
    w = same.float()
    mean = (w @ x.float()) / w.sum(-1, keepdim=True).clamp(min=1)  # (B, n, F): each point's cluster mean
    unit = x.float() / x.float().norm(dim=-1, keepdim=True)  # as the official code normalises both
    cos = (unit * (mean / mean.norm(dim=-1, keepdim=True))).sum(-1)  # (B, n) to its own cluster's mean
    # the member nearest its cluster's mean (first index on ties)
    score = torch.where(same, decide(1 - cos)[:, None, :], float("inf"))  # (B, n, n): row = point, col = member
    centre = score.argmin(-1)  # (B, n)
    return torch.where(member, centre, -1)
