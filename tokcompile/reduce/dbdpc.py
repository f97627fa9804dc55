"""DBDPC (density-based density-peak clustering, PACT's clustering; `ALGORITHMS.md` §5 step 2) in static shapes.

The official loop picks cluster centres in rounds over the unassigned points, then finishes with a sequential
scan; both have data-dependent trip counts and the number of clusters depends on the data. Here every sample
runs a fixed number of masked rounds and a fixed-length masked scan, and the result is the same set of centres:
- **Rounds.** A round that does not end the loop finds at least 10 new centres and removes them from the
  unassigned set, so after k such rounds at most n - 10k points are left and round n // 10 + 1 always ends it
  (too few new centres, or nobody left). `n // 10 + 1` masked rounds are therefore enough; a sample whose loop
  has ended keeps its state through the remaining rounds.
- **Scan.** The sequential completion visits at most n candidates in (density descending) order; it runs as n
  masked steps, each deciding one candidate from the ones before it.
Points are the image tokens marked `member` (pruning may keep a data-dependent count); the others take no part.
Distances are cosine distances in fp32, clamped at 0 with a zero diagonal, as the official code computes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from tokcompile.reduce.ops import rank_desc

if TYPE_CHECKING:
    from tokcompile.reduce.context import Decide

NEW_CENTRES_TO_CONTINUE = 10  # a round with fewer new centres hands over to the sequential scan
DENSITY_SCALE = 2.0  # d_c of the Gaussian density exp(-(d / d_c)^2)


@dataclass(frozen=True)
class Centres:
    """The centres of every sample.

    Args:
        is_centre: (B, n) bool.
        order: (B, n) long, the official list order of the centres (round, then index; the scan's centres
            after every round's, in scan order): nearest-centre ties go to the earlier one.
        dist: (B, n, n) fp32 cosine distances between the points.
        unit: (B, n, F) fp32 unit vectors of the points.
    """

    is_centre: Tensor
    order: Tensor
    dist: Tensor
    unit: Tensor


def cosine_distances(unit: Tensor) -> Tensor:
    """unit (B, n, F) -> (B, n, n) max(0, 1 - cos), zero diagonal."""
    n = unit.shape[1]
    dist = (1 - unit @ unit.transpose(1, 2)).clamp(min=0)  # (B, n, n)
    return dist.masked_fill(torch.eye(n, dtype=torch.bool, device=unit.device)[None], 0.0)


def density(dist: Tensor, member: Tensor, as_rank: bool) -> Tensor:
    """(B, n) Gaussian density over the members; `as_rank`: replaced by its rank 0.. ascending among the members
    (ties to the lower index; the official argsort leaves them open)."""
    rho = (torch.exp(-(dist / DENSITY_SCALE) ** 2) * member[:, None, :]).sum(-1)  # (B, n)
    if not as_rank:
        return rho
    idx = torch.arange(rho.shape[1], device=rho.device)
    other, me = rho[:, None, :], rho[:, :, None]  # (B, 1, n) over j, (B, n, 1) over i
    below = (other < me) | ((other == me) & (idx[None, None, :] < idx[None, :, None]))  # (B, n, n)
    return (below & member[:, None, :]).sum(-1).to(rho.dtype)  # (B, n)


def find_centres(x: Tensor, member: Tensor, cutoff: float, rank_density: bool = True,
                 decide: Decide | None = None) -> Centres:
    """The official `DBDPC.fit_variant` centre selection, static.

    Args:
        x: (B, n, F) the clustering vectors.
        member: (B, n) bool, the points that take part.
        cutoff: c, the distance within which a centre claims points.
        rank_density: replace the density by its rank (`avoid_numerical_instability_DBDPC`).
        decide: maps the (B, n, n) distances to the ones every decision is taken on (`ctx.decision`): the
            density, its ranks and every comparison with c follow from them alone.
    """
    B, n, _ = x.shape
    dev = x.device
    unit = F.normalize(x.float(), p=2.0, dim=-1)  # (B, n, F)
    dist = cosine_distances(unit)  # (B, n, n)
    if decide is not None:
        dist = decide(dist)
    rho = density(dist, member, rank_density)  # (B, n)
    not_self = ~torch.eye(n, dtype=torch.bool, device=dev)[None]  # (1, n, n)
    denser = (rho[:, None, :] >= rho[:, :, None]) & not_self  # (B, n, n): j at least as dense as i
    near = dist <= cutoff  # (B, n, n)
    inf = float("inf")
    idx = torch.arange(n, device=dev)[None].expand(B, n)  # (B, n)

    unassigned = member.clone()
    active = torch.ones(B, dtype=torch.bool, device=dev)  # the loop still runs
    is_centre = torch.zeros_like(member)
    order = torch.full((B, n), 2 * n * n, dtype=torch.long, device=dev)  # non-centres last
    scan = torch.zeros_like(member)  # the points the sequential scan considers
    for rnd in range(n // NEW_CENTRES_TO_CONTINUE + 1):
        cand = denser & unassigned[:, None, :]  # (B, n, n)
        delta = torch.where(cand, dist, inf).amin(-1)  # (B, n): to the nearest denser unassigned point
        top = torch.where(unassigned, rho, -inf).amax(-1, keepdim=True)  # (B, 1)
        delta = torch.where(unassigned & (rho == top), inf, delta)  # the densest points have no denser one
        new = unassigned & (delta > cutoff) & active[:, None]  # (B, n)
        is_centre = is_centre | new
        order = torch.where(new, rnd * n + idx, order)
        claimed = (near & new[:, None, :]).any(-1)  # (B, n): within c of a new centre
        ending = active & (new.sum(-1) < NEW_CENTRES_TO_CONTINUE)  # (B,)
        ends_here, still_on = ending[:, None], active[:, None]  # (B, 1); bool blends (ONNX Where takes no bool)
        scan = (ends_here & unassigned & (delta <= cutoff)) | (~ends_here & scan)
        unassigned = unassigned & ~(still_on & (claimed | new))
        active = active & ~ending

    # Sequential completion: the scan's points that no centre claims, by density descending (ties to the lower
    # index), each one a centre unless an earlier new centre of the scan lies within c.
    scan = scan & ~(near & is_centre[:, None, :]).any(-1)  # (B, n)
    position = rank_desc(torch.where(scan, rho, -inf))  # (B, n): scan position, the scan's points first
    perm = torch.empty_like(position).scatter_(1, position, idx)  # (B, n): the point at each scan position
    in_scan = scan.gather(1, perm)  # (B, n) in scan order
    near_s = near.gather(1, perm[:, :, None].expand(B, n, n)).gather(2, perm[:, None, :].expand(B, n, n))
    claims = near_s & (idx[:, None, :] > idx[:, :, None])  # (B, n, n): scan point i claims later point j
    # A scan point is a centre iff no earlier scan centre claims it, so one pass that marks, at step s, what s
    # claims when it is still free leaves exactly the centres free (marks only go to later points).
    free = in_scan  # (B, n) scan order
    for s in range(n):
        free = free & ~(free[:, s : s + 1] & claims[:, s])
    new_s = free
    new = new_s.gather(1, position)  # (B, n) original order
    order = torch.where(new, (n // NEW_CENTRES_TO_CONTINUE + 1) * n + position, order)
    return Centres(is_centre | new, order, dist, unit)


def nearest_centre(dist_to: Tensor, centres: Centres) -> tuple[Tensor, Tensor]:
    """(B, m) index of every row's nearest centre (ties to the earlier centre in the official order) and (B, m)
    its distance, from dist_to (B, m, n) distances of m points to the n points."""
    c = centres.is_centre[:, None, :]  # (B, 1, n)
    best = torch.where(c, dist_to, float("inf")).amin(-1)  # (B, m)
    tie = c & (dist_to == best[..., None])  # (B, m, n)
    pick = torch.where(tie, centres.order[:, None, :], torch.iinfo(torch.long).max).argmin(-1)  # (B, m)
    return pick, best
