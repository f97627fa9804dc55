"""Near-ties: where a graph may differ from eager without being wrong, and how parity tells.

Two backends round differently, so scores that nearly tie can rank either way and a greedy token whose logit
nearly ties another can flip. A scored step (`Step.scored`) reports the score vectors it decides on; where a
graph's outputs differ from eager's, eager runs again deciding on the graph's own scores (a replay). If the
graph then agrees with it, and the scores it decided on are within the margin of what eager computed, the
difference is recorded as a near-tie with the decision that flipped, never hidden and never a failure. Every
other difference fails.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from tokcompile.errors import ParityError
from tokcompile.layout import EXACT_PREFIXES, SCORE_PREFIX

# Near-ties in half precision: a kept-index selection may differ from the other side's only where the fp32 scores
# at the selection boundary lie within this margin, relative to the k-th best score: |s_i - s_k| <= m·|s_k| for
# every index the two selections do not share. float32 allows none (its selections must be equal).
NEAR_TIE_MARGINS = {"float32": 0.0, "float16": 2e-2, "bfloat16": 1e-1}


def near_tie(scores: Tensor, got: Tensor, ref: Tensor, margin: float) -> dict | None:
    """The near-tie record when the selections `got` and `ref` (k indices each) differ only at the boundary of
    `ref`'s ranking of `scores` (N,): every index in one selection and not the other scores within `margin`
    (relative) of the k-th best score. None when they differ elsewhere (a failure) or margin is 0."""
    s = scores.detach().float().reshape(-1)
    got_set, ref_set = set(got.reshape(-1).tolist()), set(ref.reshape(-1).tolist())
    k = len(ref_set)
    if margin <= 0 or k == 0 or k >= s.numel() or len(got_set) != k:
        return None
    boundary = float(s.sort(descending=True).values[k - 1])
    differ = sorted(got_set ^ ref_set)
    if not all(0 <= i < s.numel() for i in differ):
        return None
    gaps = [abs(float(s[i]) - boundary) for i in differ]
    allowed = margin * abs(boundary)
    if max(gaps) > allowed:
        return None
    return {"indices": differ, "boundary_score": boundary, "max_gap": max(gaps), "margin": margin,
            "allowed_gap": allowed}


# Decision scores (`score_j_c`, fp32) a graph reports for a scored step may differ from eager's by this much,
# relative to the row's largest score. Two backends compute attention in different orders: in float32 they
# differ by a few units in the last place, so two scores closer than that may rank either way. Where a graph's
# outputs differ from eager's, eager is replayed deciding on the graph's own scores (`compare_or_replay`).
SCORE_MARGINS = {"float32": 1e-5, "float16": 2e-2, "bfloat16": 1e-1}


def compare_scores(name: str, out_name: str, got: Tensor, ref: Tensor, margin: float, where: str) -> dict:
    """A graph's decision scores (B, n) against eager's: every gap within `margin` of the row's largest |score|.
    Returns the largest gap, absolute and relative to its row's largest |score|; raises ParityError beyond it."""
    g, r = torch.as_tensor(got).float().cpu(), torch.as_tensor(ref).float().cpu()
    if g.shape != r.shape:
        raise ParityError(f"parity failed for {name}: {out_name} has shape {tuple(g.shape)}, eager {tuple(r.shape)} "
                          f"{where}")
    gap = (g - r).abs()  # (B, n)
    allowed = margin * r.abs().amax(-1, keepdim=True)  # (B, 1)
    if bool((gap > allowed).any()):
        raise ParityError(f"parity failed for {name}: {out_name}, a step's decision scores, differ from eager's by "
                          f"{float(gap.max()):.3g} {where}, beyond the near-tie margin ({margin:g} of the row's "
                          f"largest score)")
    scale = r.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)  # (B, 1)
    return {"max_score_gap": float(gap.max()), "max_relative_gap": float((gap / scale).max())}


def differing(got: dict, ref: dict) -> dict[str, int]:
    """Exact outputs (indices) that differ between two runs' outputs by name: name -> positions that differ."""
    out = {}
    for n, g in got.items():
        if not n.startswith(EXACT_PREFIXES) or n not in ref:
            continue
        g, r = torch.as_tensor(g).cpu(), torch.as_tensor(ref[n]).cpu()
        if g.shape == r.shape and not torch.equal(g.long(), r.long()):
            out[n] = int((g.long() != r.long()).sum())
    return out


REPLAYED = " (eager deciding on the graph's decision scores)"


def compare_or_replay(compare: Callable[[Any, str], Any], eager: Any, outputs: Callable[[Any], dict],
                      graph: dict, replay: Callable[[dict], Any] | None, margin: float, where: str,
                      ties: list) -> Any:
    """`compare(eager, where)`, a comparison of the graph with eager's result that raises ParityError, when it
    passes. Where it fails and the graph reports decision scores (`graph`: its outputs by name), eager again
    deciding on them (`replay(scores)`), compared the same way: when that passes, the graph differed from eager
    only through decisions taken on scores within `margin` of eager's (every vector the replay computed is
    compared with the graph's), and `ties` gets the record. A decision's result may show in an index output (a
    selection) or only in the numbers (a merge's targets). The replay's failure is raised otherwise.

    `outputs(result)` gives a run's outputs by name (index outputs and decision scores at least)."""
    scores = {n: torch.as_tensor(g).cpu() for n, g in graph.items() if n.startswith(SCORE_PREFIX)}  # on the host
    try:
        return compare(eager, where)
    except ParityError:
        if replay is None or not scores:
            raise
    again = replay(scores)
    result = compare(again, where + REPLAYED)
    computed, before = outputs(again), outputs(eager)

    def agrees(prefix: list[str]) -> bool:
        try:
            compare(replay({n: scores[n] for n in prefix}), where + REPLAYED)
        except ParityError:
            return False
        return True

    order = list(scores)
    flipped = flipped_decision(order, agrees)
    # eager's own scores for the flipped decision, computed after the graph's earlier ones (before them, an
    # earlier flip can change what the vector holds: another token's row)
    earlier = order[: order.index(flipped)]
    own = torch.as_tensor(outputs(replay({n: scores[n] for n in earlier}) if earlier else eager)[flipped]).cpu()
    differ = differing(graph, before)
    rel = max(compare_scores("", n, scores[n], computed[n], margin, where)["max_relative_gap"] for n in scores)
    ties.append({"kind": "selection" if differ else "decision", "where": where, "differ": differ,
                 "decision": flipped, **discordance(scores[flipped], own), "max_relative_score_gap": rel,
                 "margin": margin})
    return result


def flipped_decision(order: list[str], agrees: Callable[[list[str]], bool]) -> str:
    """The decision a near-tie record names: the last vector of the shortest prefix of the graph's score vectors
    (in call order) with which eager agrees with the graph (`agrees(prefix)`: eager replayed on that prefix,
    computing the rest), found by a binary search over prefixes (about log2(n) more eager runs; it takes a
    longer prefix never to undo an agreement). Every vector agrees: the caller checked it."""
    lo, hi = 1, len(order)
    while lo < hi:
        mid = (lo + hi) // 2
        if agrees(order[:mid]):
            hi = mid
        else:
            lo = mid + 1
    return order[lo - 1]


def discordance(got: Tensor, ref: Tensor) -> dict:
    """Neighbours in eager's ranking of `ref` (B, n) (score descending, index ascending) that the graph's scores
    `got` compare the other way (one above the other where eager's are equal, equal or reversed where eager's
    differ): how many, and eager's largest score gap between such a pair (absolute, and relative to the row's
    largest |score|). No pair of any distance is compared differently unless some neighbours are. A near-tie
    shows as a few such neighbours with gaps of float rounding, or 0 where eager's scores tie exactly."""
    g, r = got.float(), ref.float()
    order = torch.sort(-r, dim=-1, stable=True).indices  # (B, n): eager's ranking, ties by index
    rs, gs = r.gather(-1, order), g.gather(-1, order)  # (B, n) in eager's order
    flipped = torch.sign(rs[:, :-1] - rs[:, 1:]) != torch.sign(gs[:, :-1] - gs[:, 1:])  # (B, n-1)
    gaps = (rs[:, :-1] - rs[:, 1:]).masked_fill(~flipped, 0)  # (B, n-1)
    scale = r.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)  # (B, 1)
    return {"discordant_neighbours": int(flipped.sum()), "largest_discordant_gap": float(gaps.max()),
            "largest_discordant_gap_relative": float((gaps / scale).max())}


def logit_near_tie(ref_logits: Tensor, got_token: Tensor, ref_token: Tensor, atol: float, rtol: float) -> dict | None:
    """A greedy token that differs from eager's where eager's logits of the two tokens are within what the
    tolerance allows each side (gap <= 2·(atol + rtol·|top-1 logit|)): a near-tie, not a failure."""
    r = ref_logits.detach().float().reshape(-1)
    top, other = float(r[int(ref_token)]), float(r[int(got_token)])
    allowed = 2 * (atol + rtol * abs(top))
    gap = top - other
    if gap > allowed:
        return None
    return {"eager_token": int(ref_token), "token": int(got_token), "logit_gap": gap, "allowed_gap": allowed}


def top1_near_ties(got: Tensor, ref: Tensor, atol: float, rtol: float) -> list[dict] | None:
    """Rows (..., V) whose top-1 differs: their `logit_near_tie` records, or None when one of them is not a
    near-tie."""
    g, r = got.detach().float().reshape(-1, got.shape[-1]), ref.detach().float().reshape(-1, ref.shape[-1])
    ties = []
    for row in (g.argmax(-1) != r.argmax(-1)).nonzero().reshape(-1).tolist():
        tie = logit_near_tie(r[row], g[row].argmax(), r[row].argmax(), atol, rtol)
        if tie is None:
            return None
        ties.append({"row": row, **tie})
    return ties
