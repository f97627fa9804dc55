"""Independent eager reference of PACT (CVPR 2025), written the way the official code runs it.

Source read: orailix/PACT, `transformers/PACT/utils.py` (`load_config`, `DBDPC.fit_variant`, `merge_clusters`,
`token_reduction`) and the reduction loop of `transformers/models/qwen2/modeling_qwen2.py` (`get_key_query_value`,
the pruning block, the attention's `weights`). What the official code does, in my words:
* At `layer_for_reduction`, before the layer runs: the layer's input norm, then q/k projections (pre-RoPE) and
  their RoPE'd versions, heads flattened.
* Pruning: the mean of the non-text queries (positions 0..last image token) attends over the non-text keys;
  softmax in fp32, mean over heads, the image columns, times the L2 norm of the residual stream; the threshold
  is the int(n·λ)-th largest score; ties at it are filled in ascending index order to exactly that count.
* DBDPC on the kept tokens: cosine distances (clamped at 0, zero diagonal), Gaussian density with d_c = 2 turned
  into ranks, then rounds: δ to the nearest denser unassigned point, centres where δ > c, points within c of a
  new centre leave; a round with fewer than 10 new centres ends in the sequential scan (candidates with δ <= c,
  by density descending, not within c of a centre; each unmarked one becomes a centre and marks later ones
  within c). Every kept token and every pruned one joins its nearest centre (first in list order on ties);
  with retrieval on, only within coef·c (kept tokens too).
* The DPC baseline (`use_dpc`, `DPC.fit` with d_c = 2) clusters the kept tokens instead: density from raw
  distances, δ and the nearest at-least-as-dense point ("parent"), the int(p·m) points of largest δ·ρ as
  centres, then every other point, by density descending, takes its parent's label; pruned tokens are dropped.
* The agglomerative baseline (`use_agglomerative`) runs scikit-learn's `AgglomerativeClustering(int(p·m),
  linkage, metric="precomputed")` on 1 − cos of the kept tokens and centres each cluster on the member nearest
  (cosine) to the mean of its vectors; pruned tokens are dropped.
* The ToMe baseline (`use_tome`) merges before every layer from 0: even image tokens (A) find their most
  similar odd one (B) by cosine of that layer's vectors, the r_l A tokens with the highest similarity join it
  (topk), components become size-weighted means at B's place; sizes bias attention from that layer on. Sizes
  stay exact here (the official code keeps them as fp16 logarithms between layers).
* The DBSCAN baseline (`use_dbscan`) clusters with cuML there; here scikit-learn's DBSCAN on the same unit
  vectors (min_samples 5, Euclidean), then the official centre rule (most neighbours within eps), which the
  official code reaches only through a call that fails.
* The k-means baseline (`use_kmeans`) runs faiss there (k = int(p·n) of all n image tokens, on the kept ones),
  whose seeding cannot be reproduced; here the static form's definition (k-means++ from a fixed seed, 100 Lloyd
  iterations, k capped at the kept count where faiss would fail), written as plain loops.
* Merge: each cluster is the mean of its members at its centre's place; sizes become log weights added to
  every key's logit in this layer and all later ones; the sequence is cut to text plus centres.

Where this reference differs, as the static form does: density ranks and tie orders go to the lower index (the
official argsorts leave them open); scores and distances are computed in fp32. One unpadded sample, batch 1,
eager attention with an explicit additive causal mask, next-token logits of the prefill only.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.references.pyramiddrop import _rotate_half
from tokcompile.reference import eager_attention as _eager


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


def _key_query(layer: nn.Module, rotary_emb: nn.Module, h: Tensor, positions: Tensor) -> dict[str, Tensor]:
    """The four vectors of `get_key_query_value`, (T, F) each: current_k/q (pre-RoPE), *_cosine (RoPE'd)."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    T, d = x.shape[1], attn.head_dim
    k = attn.k_proj(x).view(1, T, -1, d).transpose(1, 2)  # (1, Hkv, T, d)
    q = attn.q_proj(x).view(1, T, -1, d).transpose(1, 2)  # (1, H, T, d)
    cos, sin = rotary_emb(x, positions)
    flat = lambda v: v.transpose(1, 2).flatten(2, 3)[0]  # noqa: E731  (T, heads·d)
    return {"current_k": flat(k), "current_q": flat(q), "current_k_cosine": flat(_rope(k, cos, sin)),
            "current_q_cosine": flat(_rope(q, cos, sin)), "heads": (q.shape[1], k.shape[1], d)}


def _prune(cfg: dict, vec: dict, h: Tensor, image: list[int], non_text: int) -> list[bool]:
    """The official pruning block: a keep flag per image token."""
    H, Hkv, d = vec["heads"]
    n = len(image)
    if cfg["prune_with_norm"]:
        scores = h[0, image].float().norm(dim=-1)
    else:
        tag = "_cosine" if cfg["use_cosine_in_token_pruning"] else ""
        k_rows = list(range(non_text)) if cfg["use_all_non_text_pruning"] else image
        q = vec["current_q" + tag][:non_text].view(non_text, H, d).transpose(0, 1)  # (H, NT, d)
        k = vec["current_k" + tag][k_rows].view(len(k_rows), Hkv, d).transpose(0, 1)
        k = k.repeat_interleave(H // Hkv, dim=0)  # (H, K, d)
        gq = q if cfg["use_attention_in_token_pruning"] else q.mean(1, keepdim=True)
        if not cfg["do_not_upcast_to_full_precision_for_pruning"]:
            gq, k = gq.float(), k.float()
        s = (gq / math.sqrt(d)) @ k.transpose(1, 2)  # (H, 1 or NT, K)
        if cfg["use_attention_in_token_pruning"] and cfg["use_mask_in_use_attention_in_token_pruning"]:
            tri = torch.triu(torch.ones(non_text, non_text), diagonal=1).bool()
            s = s.masked_fill(tri[:, k_rows] if not cfg["use_all_non_text_pruning"] else tri, float("-inf"))
        s = torch.nan_to_num(torch.softmax(s, dim=-1, dtype=torch.float32).mean(0), nan=0.0)  # (1|NT, K)
        s = s.mean(0)  # (K,)
        scores = s[image] if cfg["use_all_non_text_pruning"] else s
        if cfg["multiply_by_norm"]:
            scores = scores.float() * h[0, image].float().norm(dim=-1, p=cfg["norm_to_use"])
    if cfg["token_pruning"] and cfg["use_IQR_in_token_pruning"]:
        q1, q3 = torch.quantile(scores, 0.25), torch.quantile(scores, 0.75)
        return (scores > q1 + cfg["alpha_IQR"] * (q3 - q1)).tolist()
    if not (cfg["token_pruning"] or cfg["prune_with_norm"]):
        return [True] * n
    keep_n = int(n * cfg["pruning_tokeep_percentage_value"])
    thresh = torch.sort(scores, descending=True).values[keep_n - 1]
    keep = (scores > thresh).tolist()
    if cfg["token_pruning"] and cfg["avoid_numerical_instability_prune"]:
        for i in range(n):
            if sum(keep) < keep_n and float(scores[i]) == float(thresh):
                keep[i] = True
    return keep


def _stable_order(values: list[float], descending: bool) -> list[int]:
    return sorted(range(len(values)), key=lambda i: (-values[i] if descending else values[i], i))


def dbdpc(x: Tensor, cutoff: float, rank_density: bool, stats: dict) -> list[int]:
    """Cluster centres of the rows of x (m, F), in the official list order (duplicates removed)."""
    m = x.shape[0]
    unit = F.normalize(x.float(), p=2.0, dim=1)
    dist = (1 - unit @ unit.t()).clamp(min=0)
    dist.fill_diagonal_(0)
    rho = torch.exp(-(dist / 2) ** 2).sum(1)
    if rank_density:
        ranks = torch.empty(m)
        for r, i in enumerate(_stable_order(rho.tolist(), descending=False)):
            ranks[i] = r
        rho = ranks
    centres: list[int] = []
    unassigned = [True] * m
    stats.update(rounds=0, scan_centres=0)
    while True:
        W = [i for i in range(m) if unassigned[i]]
        if not W:
            break
        stats["rounds"] += 1
        delta = {}
        top = max(float(rho[i]) for i in W)
        for i in W:
            denser = [float(dist[i, j]) for j in W if j != i and not float(rho[i]) > float(rho[j])]
            delta[i] = math.inf if float(rho[i]) == top or not denser else min(denser)
        new = [i for i in W if delta[i] > cutoff]
        if not new:
            break
        centres += new
        for i in W:
            if i in new or any(float(dist[i, c]) <= cutoff for c in new):
                unassigned[i] = False
        if len(new) < 10:
            rest = [i for i in W if delta[i] <= cutoff]
            rest = [rest[p] for p in _stable_order([float(rho[i]) for i in rest], descending=True)]
            rest = [i for i in rest if all(float(dist[i, c]) > cutoff for c in centres)]
            marked = [False] * len(rest)
            for a, i in enumerate(rest):
                if not marked[a]:
                    centres.append(i)
                    stats["scan_centres"] += 1
                    for b in range(a + 1, len(rest)):
                        marked[b] = marked[b] or float(dist[i, rest[b]]) <= cutoff
            break
    return centres


def _tome_layer(h: Tensor, positions: Tensor, image: list[int], sizes: dict[int, float], x: Tensor,
                r: int) -> tuple[Tensor, Tensor, list[int], dict[int, float], Tensor | None]:
    """The official `TOME.fit` and the loop's cut on the image rows `image` of h (1, T, D): (h, positions, the
    new image rows, their sizes, the slot of every entering image token or None when r is 0)."""
    n = len(image)
    r = max(min(r, n // 2 - 2), 0)
    if r == 0:
        return h, positions, image, sizes, None
    xn = x[image].float()
    xn = xn / xn.norm(dim=-1, keepdim=True)
    a_idx, b_idx = torch.arange(0, n, 2), torch.arange(1, n, 2)
    sim = xn[a_idx] @ xn[b_idx].T
    most_similar_b, values = sim.argmax(-1), sim.max(-1).values
    top = torch.topk(values, r).indices
    labels = torch.arange(n)
    labels[a_idx[top]] = b_idx[most_similar_b[top]]
    w = torch.tensor([sizes[t] for t in image])
    new_h = h.clone()
    survivors = sorted(set(labels.tolist()))
    for lab in survivors:
        members = [i for i in range(n) if int(labels[i]) == lab]
        total = float(sum(w[i] for i in members))
        new_h[0, image[lab]] = (sum(h[0, image[i]].float() * w[i] for i in members) / total).to(h.dtype)
        sizes[image[lab]] = total
    gone = {image[i] for i in range(n) if i not in survivors}
    rows = [t for t in range(h.shape[1]) if t not in gone]
    slot = torch.tensor([survivors.index(int(labels[i])) for i in range(n)])
    renum = {t: j for j, t in enumerate(rows)}
    new_image = [renum[image[i]] for i in survivors]
    new_sizes = {renum[t]: v for t, v in sizes.items() if t in renum}
    return new_h[:, rows], positions[..., rows], new_image, new_sizes, slot


def dpc(x: Tensor, share: float) -> dict[int, list[int]]:
    """The official `DPC.fit` (d_c = 2) on the rows of x (m, F): {centre row: member rows}."""
    m = x.shape[0]
    unit = F.normalize(x.float(), p=2.0, dim=1)
    dist = (1 - unit @ unit.t()).clamp(min=0)
    dist.fill_diagonal_(0)
    rho = torch.exp(-(dist / 2) ** 2).sum(1).tolist()
    delta, parent = [], []
    for i in range(m):
        cands = [(float(dist[i, j]), j) for j in range(m) if j != i and not rho[i] > rho[j]]
        d, j = min(cands) if cands else (math.inf, 0)  # first index among equal distances
        delta.append(d)
        parent.append(j)
    gamma = [delta[i] * rho[i] for i in range(m)]
    centres = _stable_order(gamma, descending=True)[: int(share * m)]
    label = [-1] * m
    for c in centres:
        label[c] = c
    for i in _stable_order(rho, descending=True):
        if label[i] == -1:
            label[i] = label[parent[i]]
    out: dict[int, list[int]] = {}
    for i in range(m):
        out.setdefault(label[i], []).append(i)
    return out


def agglomerative(x: Tensor, share: float, linkage: str) -> dict[int, list[int]]:
    """The official `Agglomerative.fit` on the rows of x (m, F): scikit-learn on precomputed cosine distances,
    int(share·m) clusters, each centred on the member nearest (cosine) to the mean of its rows."""
    from sklearn.cluster import AgglomerativeClustering

    xn = x / x.norm(dim=1, keepdim=True)
    dist = (1 - xn @ xn.T).numpy()
    labels = AgglomerativeClustering(n_clusters=int(share * x.shape[0]), linkage=linkage,
                                     metric="precomputed").fit_predict(dist)
    out: dict[int, list[int]] = {}
    for lab in sorted(set(labels.tolist())):
        rows = [i for i in range(x.shape[0]) if labels[i] == lab]
        mean = x[rows].mean(0)
        sims = (x[rows] / x[rows].norm(dim=1, keepdim=True)) @ (mean / mean.norm())
        out[rows[int(torch.argmin(1 - sims))]] = rows
    return out


def dbscan(x: Tensor, eps: float, noise_as_clusters: bool) -> dict[int, list[int]]:
    """The official `DBSCAN.fit` on the rows of x (m, F), with scikit-learn in place of cuML (min_samples 5,
    Euclidean on unit vectors), then each cluster named after its member with the most neighbours within eps
    among the clustered points (lowest index on ties); noise dropped or, with `noise_as_clusters`, alone."""
    from sklearn.cluster import DBSCAN

    xn = x / x.norm(dim=1, keepdim=True)
    labels = DBSCAN(eps=eps, min_samples=5, metric="euclidean").fit_predict(xn.numpy())
    valid = [i for i in range(len(labels)) if noise_as_clusters or labels[i] != -1]
    dist = torch.cdist(xn[valid], xn[valid])
    counts = (dist <= eps).sum(1).tolist()
    out: dict[int, list[int]] = {}
    for lab in sorted(set(labels.tolist()) - {-1}):
        rows = [i for i in range(len(labels)) if labels[i] == lab]
        best = max(rows, key=lambda i: (counts[valid.index(i)], -i))
        out[best] = rows
    if noise_as_clusters:
        out.update({i: [i] for i in range(len(labels)) if labels[i] == -1})
    return out


def kmeans(x: Tensor, k: int, n_uniforms: int, seed: int, iters: int = 100) -> dict[int, list[int]]:
    """k-means on the rows of x (m, F) into k clusters (at most m) as the static baseline defines it (faiss's
    own seeding cannot be reproduced): k-means++ seeding from numpy's `default_rng(seed).random(n_uniforms)`
    (inverse CDF on the sum of D²), `iters` Lloyd iterations (empty clusters keep their centroid), then each
    non-empty cluster named after the member nearest its centroid (the lowest index within a relative 1e-5:
    two-member clusters tie)."""
    m = x.shape[0]
    k = min(k, m)
    u = np.random.default_rng(seed).random(n_uniforms).tolist()
    seeds = [int(math.floor(m * u[0]))]
    d2 = ((x - x[seeds[0]]) ** 2).sum(-1)
    for c in range(1, k):
        w = d2.double()
        running = torch.cumsum(w, 0)
        seeds.append(next(i for i in range(m) if float(running[i]) > u[c] * float(running[-1])))
        d2 = torch.minimum(d2, ((x - x[seeds[-1]]) ** 2).sum(-1))
    cent = x[seeds].clone()
    for _ in range(iters):
        assign = ((x[:, None] - cent[None]) ** 2).sum(-1).argmin(-1)
        for j in range(k):
            rows = (assign == j).nonzero()[:, 0]
            if len(rows):
                cent[j] = x[rows].mean(0)
    assign = ((x[:, None] - cent[None]) ** 2).sum(-1).argmin(-1)
    out: dict[int, list[int]] = {}
    for j in range(k):
        rows = (assign == j).nonzero()[:, 0].tolist()
        if rows:
            d2 = ((x[rows] - cent[j]) ** 2).sum(-1).tolist()
            nearest = min(d2)
            out[next(r for r, v in zip(rows, d2) if v <= nearest * (1 + 1e-5) + 1e-12)] = rows
    return out


@torch.no_grad()
def pact_reference(model: nn.Module, adapter: Any, sample: dict[str, Tensor], *, image_token_id: int,
                   cfg: dict) -> tuple[Tensor, Tensor, dict]:
    """Next-token logits (V,), the cluster of every image token ((n,) int64: the image index of its centre, -1
    when dropped; without clustering: its own index or -1) and stats (rounds, scan_centres, clusters).

    `cfg`: PACT's options by their official names (every one, defaults filled in by the caller).
    """
    lm = adapter.language_model(model)
    ids = sample["input_ids"][0].tolist()
    image = [i for i, t in enumerate(ids) if t == image_token_id]
    n, non_text = len(image), image[-1] + 1
    with _eager(model):
        h = model(**sample, output_hidden_states=True, use_cache=False).hidden_states[0]  # (1, T, D)
    positions = adapter.hf_position_ids(model, sample)  # (1, T) or (R, 1, T)
    log_w = None
    stats: dict = {}
    label = torch.arange(n)
    L = cfg["layer_for_reduction"]
    with _eager(model):
        for idx, layer in enumerate(lm.layers):
            if cfg["use_tome"]:  # ToMe before every layer (the official load_config sets layer 0, progressive)
                vec = _key_query(layer, lm.rotary_emb, h, positions)
                if idx == 0:
                    n_layers, eq = len(lm.layers), cfg["tome_equivalant_layer_for_reduction"]
                    keep_eff = 1 - (1 - cfg["perc_tokeep_tome_total"]) * ((n_layers - eq) / n_layers)
                    r_initial = 6 * n_layers * (1 - keep_eff) / ((n_layers + 1) * (2 * n_layers + 1)) * torch.tensor(n)
                    tome_sizes = {t: 1.0 for t in image}
                    stats["assigns"] = []
                r = int(r_initial * ((n_layers - idx) / n_layers)) + 1
                h, positions, image, tome_sizes, assign = _tome_layer(
                    h, positions, image, tome_sizes, vec[cfg["vector_to_use_in_distance_clustering"]], r)
                stats["assigns"].append(assign)
                log_w = torch.log(torch.tensor([tome_sizes.get(t, 1.0) for t in range(h.shape[1])]))
            if idx == L and not cfg["use_tome"]:
                vec = _key_query(layer, lm.rotary_emb, h, positions)
                keep = _prune(cfg, vec, h, image, non_text)
                kept = [image[i] for i in range(n) if keep[i]]
                pruned = [image[i] for i in range(n) if not keep[i]]
                weight = {t: 1.0 for t in range(h.shape[1])}
                if cfg["use_dpc"] or cfg["use_agglomerative"] or cfg["use_dbscan"] or cfg["use_kmeans"]:
                    x = vec[cfg["vector_to_use_in_distance_clustering"]]
                    if cfg["use_dpc"]:
                        groups = dpc(x[kept], cfg["percentage_to_keep_dpc"])
                    elif cfg["use_kmeans"]:
                        k = int(cfg["perc_tokeep_kmeans"] * n)  # the official k: a share of all image tokens
                        groups = kmeans(x[kept].float(), k, k, cfg["kmeans_seed"])
                    elif cfg["use_dbscan"]:
                        groups = dbscan(x[kept].float(), cfg["eps_dbscan"], cfg["noise_as_clusters_dbscan"])
                    else:
                        groups = agglomerative(x[kept].float(), cfg["percentage_to_keep_agglomerative"],
                                               cfg["linkage"])
                    members = {kept[c]: [kept[i] for i in ms] for c, ms in groups.items()}
                    stats["clusters"] = len(members)
                    h = h.clone()
                    for c, ms in members.items():
                        h[0, c] = h[0, ms].float().mean(0).to(h.dtype)
                        weight[c] = float(len(ms))
                    survivors = set(members)
                    centre_of = {t: c for c, ms in members.items() for t in ms}
                    label = torch.tensor([image.index(centre_of[t]) if t in centre_of else -1 for t in image])
                elif cfg["use_DBDPC"]:
                    x = vec[cfg["vector_to_use_in_distance_clustering"]]
                    order = dbdpc(x[kept], cfg["cutoff"], cfg["avoid_numerical_instability_DBDPC"], stats)
                    order = list(dict.fromkeys(order))
                    unit = F.normalize(x.float(), p=2.0, dim=1)
                    members: dict[int, list[int]] = {kept[c]: [] for c in order}
                    limit = cfg["cutoff"] * cfg["coef_pruned"]
                    for t in kept + (pruned if cfg["include_pruned_in_mean"] else []):
                        if t in members:  # a centre
                            members[t].append(t)
                            continue
                        d = [float(1 - unit[t] @ unit[kept[c]]) for c in order]
                        d = [max(0.0, v) for v in d] if t in kept else d  # kept tokens: the clamped matrix
                        j = min(range(len(order)), key=lambda a: (d[a], a))  # first in list order on ties
                        if cfg["include_pruned_in_mean"] and d[j] > limit:
                            continue  # dropped for good
                        members[kept[order[j]]].append(t)
                    stats["clusters"] = len(members)
                    new_h, original = h.clone(), positions
                    positions = positions.clone()
                    for c, ms in members.items():
                        if cfg["take_mean"]:
                            new_h[0, c] = h[0, ms].float().mean(0).to(h.dtype)
                        weight[c] = float(len(ms))
                        if cfg["get_mean_position_id"]:
                            positions[..., c] = torch.round(original[..., ms].float().mean()).long()
                    h = new_h
                    survivors = set(members)
                    centre_of = {t: c for c, ms in members.items() for t in ms}
                    label = torch.tensor([image.index(centre_of[t]) if t in centre_of else -1 for t in image])
                else:
                    survivors = set(kept)
                    label = torch.tensor([i if keep[i] else -1 for i in range(n)])
                rows = [t for t in range(h.shape[1]) if t not in image or t in survivors]
                h, positions = h[:, rows], positions[..., rows]
                if cfg["change_position_ids"]:
                    positions = torch.arange(len(rows))[None]
                clustered = any(cfg[c] for c in ("use_DBDPC", "use_dpc", "use_agglomerative", "use_dbscan",
                                                 "use_kmeans"))
                if clustered and not cfg["no_proportional_attention"]:
                    log_w = torch.log(torch.tensor([weight[t] for t in rows]))
            T = h.shape[1]
            mask = torch.full((T, T), torch.finfo(h.dtype).min, dtype=h.dtype).triu(1)
            if log_w is not None:
                mask = mask + log_w.to(h.dtype)[None, :]
            rope = lm.rotary_emb(h, positions)
            residual = h
            a = layer.self_attn(layer.input_layernorm(h), attention_mask=mask[None, None], position_embeddings=rope)
            h = residual + (a[0] if isinstance(a, tuple) else a)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
    logits = adapter.lm_head(model)(lm.norm(h))[0, -1]  # (V,)
    return logits.float(), label, stats
