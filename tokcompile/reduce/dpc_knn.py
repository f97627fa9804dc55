"""Density-peak clustering with k nearest neighbours into a fixed number of clusters (DPC-kNN), as SparseVLM
recycles pruned tokens (LightCompress `token_reduction/sparsevlm.py`, `cluster_and_merge`), static.

For m points x (B, m, C): distances d_ij = ‖x_i − x_j‖ / √C; density ρ_i = exp(−mean of the c smallest d_ij²)
(itself included); δ_i = the distance to the nearest strictly denser point (the largest distance of the sample
for the densest); the c points of largest γ = δ·ρ are the centres, in γ order; every point joins its nearest
centre (the first on ties), a centre its own; each cluster becomes Σ x_i / (members + 1e-6), LightCompress's
equal-weight average with its 1e-6 guard.

LightCompress adds uniform noise of 1e-6 to the density "to ensure no tokens have the same density"; here the
noise is off and ties rank by (γ descending, position ascending), so every backend agrees. Every quantity a
decision is taken on goes through `decide` (a step's `ctx.decision`): the density (which point is denser), γ
(the centres) and the point-to-centre distances (the nearest centre), so that a near-tie in a graph can be
replayed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from tokcompile.reduce.ops import first_argmax, gather_tokens, rank_desc


def distances(x: Tensor) -> Tensor:
    """(B, m, m) ‖x_i − x_j‖ / √C in fp32, from the differences themselves, as LightCompress computes them.

    x: (B, m, C) the points."""
    xf = x.float()
    return (xf[:, :, None, :] - xf[:, None, :, :]).norm(dim=-1) / x.shape[-1] ** 0.5  # (B, m, m)


def gamma_rank(dist: Tensor, clusters: int, decide: Callable[[Tensor], Tensor] = lambda s: s) -> Tensor:
    """(B, m) every point's rank by γ = δ·ρ (0 = the first centre; ties to the earlier point).

    dist: (B, m, m) `distances`; clusters: the neighbours ρ averages over, as LightCompress (k = clusters);
    decide: sees the density, then γ."""
    nearest = torch.topk(dist, clusters, dim=-1, largest=False).values  # (B, m, c): values only, no tie order
    density = decide(torch.exp(-(nearest**2).mean(-1)))  # (B, m)
    denser = density[:, None, :] > density[:, :, None]  # (B, m, m): [i, j] j strictly denser than i
    dist_max = dist.flatten(1).amax(-1)[:, None, None]  # (B, 1, 1)
    delta = torch.where(denser, dist, dist_max).amin(-1)  # (B, m)
    return rank_desc(decide(delta * density))  # (B, m)


def dpc_knn(x: Tensor, clusters: int, decide: Callable[[Tensor], Tensor] = lambda s: s) -> tuple[Tensor, Tensor]:
    """Cluster m points into `clusters` (a Python int, at most m) clusters.

    Args:
        x: (B, m, C) the points, in the order whose earlier entries win ties.
        decide: sees the density, γ, then the (B, m, c) point-to-centre distances.

    Returns:
        centre (B, c) the centres' indices among the m points, by γ descending (the clusters' order), and
        slot (B, m) the cluster (0..c-1) every point joins.
    """
    dist = distances(x)  # (B, m, m)
    rank = gamma_rank(dist, clusters, decide)  # (B, m)
    centre = torch.topk(-rank.float(), clusters, dim=-1).indices  # (B, c): ranks 0..c-1 in order
    to_centre = gather_tokens(dist.transpose(1, 2), centre).transpose(1, 2)  # (B, m, c): point -> each centre
    to_centre = decide(to_centre)  # (B, m, c)
    slot = first_argmax(-to_centre)  # (B, m): nearest centre, the first on ties
    slot = torch.where(rank < clusters, rank, slot)  # a centre joins its own cluster
    return centre, slot


def merge_clusters(x: Tensor, slot: Tensor, clusters: int) -> Tensor:
    """(B, c, C) every cluster's Σ x_i / (members + 1e-6), in x's dtype.

    Args:
        x: (B, m, C) the points; slot: (B, m) each point's cluster."""
    onehot = (slot[:, None, :] == torch.arange(clusters, device=x.device)[None, :, None]).float()  # (B, c, m)
    weights = onehot / (onehot.sum(-1, keepdim=True) + 1e-6)  # (B, c, m)
    return (weights @ x.float()).to(x.dtype)  # (B, c, C)
