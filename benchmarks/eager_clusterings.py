"""PACT's clusterings in eager PyTorch with dynamic shapes, written the way the official code runs them
(orailix/PACT `transformers/PACT/utils.py`), for benchmarks/hooked_pact.py to time. Each takes the clustering
vectors x (m, F) of the kept tokens and returns the row of every row's centre ((m,) int64, -1 when dropped).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def _cosine_distances(x: Tensor) -> Tensor:
    """(m, m) 1 − cos, clamped at 0, zero diagonal (`normal_compute_pairwise_distances` as DBDPC and DPC use it)."""
    unit = F.normalize(x, p=2.0, dim=1)
    dist = (1 - unit @ unit.t()).clamp(min=0)
    dist.fill_diagonal_(0)
    return dist


def _delta(dist: Tensor, rho: Tensor) -> tuple[Tensor, Tensor]:
    """δ and its argmin: the distance to the nearest point at least as dense, (k,) each."""
    at_least = ~(rho[:, None] > rho[None, :])  # (k, k)
    at_least.fill_diagonal_(False)
    return torch.where(at_least, dist, torch.full_like(dist, float("inf"))).min(dim=1)


def dbdpc(x: Tensor, cutoff: float, rank_density: bool, extra: Tensor | None, coef: float) -> Tensor:
    """`DBDPC.fit_variant` (d_c = 2): rounds on the shrinking unassigned set, the sequential completion as a
    Python loop; every row (then every row of `extra`, the pruned tokens) to its nearest centre, within coef·c
    when `extra` is given. (m + r,)."""
    dist = _cosine_distances(x)  # (m, m)
    rho = torch.exp(-(dist / 2) ** 2).sum(1)  # (m,)
    if rank_density:
        order = torch.argsort(rho, stable=True)
        rho = torch.empty_like(rho).scatter_(0, order, torch.arange(len(rho), dtype=rho.dtype))  # density ranks
    centres: list[int] = []
    unassigned = torch.ones(len(x), dtype=torch.bool)
    while True:
        idx = torch.nonzero(unassigned).flatten()  # (k,)
        if idx.numel() == 0:
            break
        delta, _ = _delta(dist[idx][:, idx], rho[idx])
        delta[rho[idx] == rho[idx].max()] = float("inf")
        new = idx[delta > cutoff]
        if new.numel() == 0:
            break
        centres += new.tolist()
        unassigned[idx[(dist[idx][:, new] <= cutoff).any(1)]] = False
        unassigned[new] = False
        if new.numel() < 10:  # the sequential completion
            rest = idx[delta <= cutoff]
            rest = rest[torch.argsort(-rho[rest], stable=True)]
            rest = rest[(dist[rest][:, centres] > cutoff).all(1)]
            near = dist[rest][:, rest] <= cutoff  # (s, s)
            near.fill_diagonal_(False)
            marked = torch.zeros(len(rest), dtype=torch.bool)
            for a in range(len(rest)):
                if not marked[a]:
                    centres.append(int(rest[a]))
                    marked[a + 1:] |= near[a, a + 1:]
            break
    c = torch.tensor(centres)
    if extra is None:
        label = c[dist[:, c].argmin(1)]
    else:
        to_extra = 1 - F.normalize(extra, p=2.0, dim=1) @ F.normalize(x[c], p=2.0, dim=1).t()  # (r, C)
        best, pick = torch.cat((dist[:, c], to_extra)).min(1)  # (m + r,)
        label = torch.where(best <= cutoff * coef, c[pick], -1)
    label[c] = c
    return label


def dpc(x: Tensor, share: float) -> Tensor:
    """`DPC.fit` (d_c = 2): the int(share·m) points of largest δ·ρ are centres, every other point, by density
    descending, takes its nearest denser point's label (a Python loop, as the official code)."""
    dist = _cosine_distances(x)
    rho = torch.exp(-(dist / 2) ** 2).sum(1)
    delta, parent = _delta(dist, rho)
    centres = torch.argsort(-(delta * rho), stable=True)[: int(share * len(x))]
    label = torch.full((len(x),), -1)
    label[centres] = centres
    for i in torch.argsort(-rho, stable=True).tolist():
        if label[i] == -1:
            label[i] = label[parent[i]]
    return label


def agglomerative(x: Tensor, share: float, linkage: str) -> Tensor:
    """`Agglomerative.fit`: scikit-learn on the precomputed cosine distances, each cluster centred on the member
    nearest (cosine) to the mean of its vectors."""
    from sklearn.cluster import AgglomerativeClustering

    unit = x / x.norm(dim=1, keepdim=True)
    found = AgglomerativeClustering(n_clusters=int(share * len(x)), linkage=linkage,
                                    metric="precomputed").fit_predict((1 - unit @ unit.t()).numpy())
    return _name_clusters(torch.from_numpy(found).long(), lambda rows: int(torch.argmax(
        unit[rows] @ F.normalize(x[rows].mean(0), dim=0))))


def dbscan(x: Tensor, eps: float, noise_as_clusters: bool) -> Tensor:
    """`DBSCAN.fit`, scikit-learn in place of cuML (min_samples 5, Euclidean on unit vectors), each cluster named
    after its member with the most neighbours within eps; noise dropped or alone."""
    from sklearn.cluster import DBSCAN

    unit = x / x.norm(dim=1, keepdim=True)
    found = torch.from_numpy(DBSCAN(eps=eps, min_samples=5, metric="euclidean").fit_predict(unit.numpy())).long()
    valid = torch.ones_like(found, dtype=torch.bool) if noise_as_clusters else found >= 0
    neighbours = torch.zeros(len(x), dtype=torch.long)
    neighbours[valid] = (torch.cdist(unit[valid], unit[valid]) <= eps).sum(1)
    label = _name_clusters(found, lambda rows: int(torch.argmax(neighbours[rows])))
    if noise_as_clusters:
        noise = torch.nonzero(found < 0).flatten()
        label[noise] = noise
    return label


def kmeans(x: Tensor, k: int, seed: int) -> Tensor:
    """`token_reduction_kmeans` with scikit-learn's KMeans in place of faiss (k-means++, one run, 100
    iterations): each cluster named after the member nearest its centroid."""
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=min(k, len(x)), n_init=1, max_iter=100, random_state=seed).fit(x.numpy())
    centroids = torch.from_numpy(km.cluster_centers_).to(x.dtype)
    found = torch.from_numpy(km.labels_).long()
    return _name_clusters(found, lambda rows: int(torch.cdist(x[rows], centroids[found[rows[0]]][None]).argmin()))


def _name_clusters(found: Tensor, pick: Callable[[Tensor], int]) -> Tensor:
    """Every row's centre row from cluster ids `found` (m,) (-1: noise, dropped): `pick(rows)` chooses the centre
    among a cluster's rows (an index into `rows`)."""
    label = torch.full_like(found, -1)
    for cluster in torch.unique(found[found >= 0]).tolist():
        rows = torch.nonzero(found == cluster).flatten()
        label[rows] = rows[pick(rows)]
    return label
