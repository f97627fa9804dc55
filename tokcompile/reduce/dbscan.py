"""DBSCAN with a most-connected centre per cluster (PACT's `use_dbscan` baseline; official `DBSCAN` in
orailix/PACT `transformers/PACT/utils.py`), static.

The official code runs cuML's DBSCAN (`min_samples` 5, Euclidean metric) on the unit clustering vectors, then
names each cluster after its member with the most neighbours within eps, counted among the clustered points (all
points with `noise_as_clusters_dbscan`, where every noise point is a cluster of its own; otherwise noise is
dropped). Its centre step calls `compute_pairwise_distances` with an argument that function does not take, so
the official path stops there; this file follows what it evidently means (Euclidean distances of the unit
vectors), and DBSCAN's own semantics as scikit-learn implements them:
- core points have at least `min_samples` points within eps (themselves included);
- clusters are the connected components of the core points (within eps of each other), found here by
  ⌈log2 n⌉ + 1 squarings of the reachability matrix, a fixed trip count;
- a border point (not core, within eps of a core point) joins the cluster found first by scikit-learn's scan,
  the one whose lowest core index is lowest among its core neighbours' clusters.
Ties in the neighbour count go to the lower index. The cluster count depends on the data: the step has slots.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from tokcompile.reduce.context import Decide

MIN_SAMPLES = 5  # the official token_reduction_dbscan's default, which its caller keeps


def dbscan_labels(x: Tensor, member: Tensor, eps: float, noise_as_clusters: bool,
                  decide: Decide | None = None) -> Tensor:
    """(B, n) the centre of every point's cluster; -1 for noise (without `noise_as_clusters`) and for points
    that take no part.

    Args:
        x: (B, n, F) the clustering vectors; member: (B, n) bool, the points that take part.
        eps: the neighbourhood radius, in Euclidean distance between unit vectors.
        decide: maps the (B, n, n) squared distances to the ones every decision is taken on (`ctx.decision`).
            Squared, since the square root near 0 (a point and itself, near-duplicates) turns float rounding of
            the cosine into gaps far above the near-tie margin.
    """
    B, n, _ = x.shape
    dev = x.device
    unit = F.normalize(x.float(), p=2.0, dim=-1)
    squared = (2 - 2 * unit @ unit.transpose(1, 2)).clamp(min=0)  # (B, n, n) squared Euclidean, unit vectors
    dist = (squared if decide is None else decide(squared)).sqrt()  # every neighbourhood follows from it alone
    both = member[:, :, None] & member[:, None, :]
    near = (dist <= eps) & both | (torch.eye(n, dtype=torch.bool, device=dev)[None] & both)  # (B, n, n), self in
    core = member & (near.sum(-1) >= MIN_SAMPLES)  # (B, n)
    reach = near & core[:, :, None] & core[:, None, :]  # (B, n, n): core to core
    for _ in range(math.ceil(math.log2(max(n, 2))) + 1):  # transitive closure by squaring
        reach = reach | ((reach.float() @ reach.float()) > 0)
    idx = torch.arange(n, device=dev)[None].expand(B, n)
    big = n  # "no core": above every index
    comp = torch.where(reach, idx[:, None, :], big).amin(-1)  # (B, n): lowest core index of a core's component
    via_core = near & core[:, None, :]  # (B, n, n): i within eps of core j
    border = torch.where(via_core, comp[:, None, :], big).amin(-1)  # (B, n): earliest neighbouring cluster
    cluster = torch.where(core, comp, border)  # (B, n), big for noise
    noise = member & (cluster == big)
    clustered = member & ~noise if not noise_as_clusters else member  # the points counted as neighbours
    counts = (near & clustered[:, None, :]).sum(-1)  # (B, n) neighbours among the clustered points
    same = (cluster[:, :, None] == cluster[:, None, :]) & ~noise[:, :, None] & member[:, None, :]  # (B, n, n)
    score = torch.where(same, counts[:, None, :] * (n + 1) - idx[:, None, :], -1)  # most neighbours, lowest index
    centre = score.argmax(-1)  # (B, n): the centre of every clustered point's cluster
    if noise_as_clusters:
        return torch.where(member, torch.where(noise, idx, centre), -1)
    return torch.where(member & ~noise, centre, -1)
