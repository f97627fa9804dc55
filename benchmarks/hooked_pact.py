"""PACT on a Hugging Face LLaVA in eager PyTorch, by forward hooks, the way the official code runs it
(orailix/PACT: the reduction block of `transformers/models/qwen2/modeling_qwen2.py`, `DBDPC.fit_variant`, `DPC.fit`,
`Agglomerative.fit`, `DBSCAN.fit` and `token_reduction_kmeans` of `transformers/PACT/utils.py`): the
official-style eager implementation that benchmarks/methods.py times beside the exported graphs.

At prefill (more than one query token), a pre-hook on layer `layer_for_reduction`:
- computes that layer's norm and q/k projections, pre-RoPE and RoPE'd, heads flattened;
- prunes with EUTI as the official block does (the mean non-text query over the non-text keys, softmax in fp32,
  mean over heads, times the residual norm; the int(n·λ)-th score as threshold, ties filled in index order);
- clusters the kept tokens with dynamic shapes: DBDPC's rounds as tensor ops on the shrinking unassigned set and
  its sequential completion as a Python loop, DPC's label propagation as a Python loop, scikit-learn's
  AgglomerativeClustering and DBSCAN as the official code calls them (scikit-learn in place of cuML), and
  scikit-learn's KMeans (k-means++, one run, 100 iterations) in place of faiss;
- merges every cluster into its centre (index_add means), cuts the sequence to the text and the centres and
  passes the later layers a float mask: causal plus log cluster size on every key (proportional attention).
The layers after it get the same cut inputs through their own pre-hooks. Batch 1, as the official code.
The in-decoder ToMe baseline (`use_tome`) hooks every layer instead: that layer's vectors, the official r_l,
the bipartite match of even image tokens to odd ones with the top r_l edges merged (size-weighted means), the cut,
and log sizes on the keys from then on. Not covered (ValueError): the IQR rule, the attention and norm-only pruning
variants, position-id options, `progessive_reduction`, pruned text tokens (`do_not_consider_non_image_tokens_as_
pruned: false`).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
from torch import Tensor

from benchmarks.eager_clusterings import agglomerative, dbdpc, dbscan, dpc, kmeans
from benchmarks.hooked_fastv import image_span
from tokcompile.reduce.pact_options import PACTOptions

UNCOVERED = ("use_IQR_in_token_pruning", "use_attention_in_token_pruning", "prune_with_norm",
             "get_mean_position_id", "change_position_ids", "progessive_reduction", "withdraw_visual_tokens")


class HookedPACT:
    """PACT hooks on an HF LLaVA (`LlavaForConditionalGeneration`); `remove()` takes them off. After each
    prefill, `label` holds every image token's centre (index within the image span, -1 when dropped)."""

    def __init__(self, model: Any, image_token_id: int, options: PACTOptions):
        on = [k for k in UNCOVERED if getattr(options, k)]
        if on or not options.do_not_consider_non_image_tokens_as_pruned:
            raise ValueError(f"the official-style eager PACT does not cover {on or 'pruned text tokens'}")
        lm = model.model.language_model
        self.o, self.image_token_id = options, image_token_id
        self.label: Tensor | None = None
        self._span = (0, 0)
        self._cut: dict[str, Any] = {}
        self._handles = [lm.embed_tokens.register_forward_pre_hook(self._find_span)]
        if options.use_tome:
            self.slots: list[Tensor] = []  # per merging layer: the slot of every entering image token
            self._handles += [layer.register_forward_pre_hook(partial(self._tome, i, len(lm.layers)),
                                                              with_kwargs=True) for i, layer in enumerate(lm.layers)]
            return
        L = options.layer_for_reduction
        self._handles.append(lm.layers[L].register_forward_pre_hook(self._reduce, with_kwargs=True))
        self._handles += [lm.layers[i].register_forward_pre_hook(self._follow, with_kwargs=True)
                          for i in range(L + 1, len(lm.layers))]

    def result(self) -> tuple[str, Tensor | list[Tensor]]:
        """("cluster", every image token's centre), or for ToMe ("assign", each merge's slots), of the last
        prefill."""
        return ("assign", self.slots) if self.o.use_tome else ("cluster", self.label)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def _find_span(self, module: Any, args: tuple) -> None:
        if args[0].shape[1] > 1:
            self._span = image_span(args[0], self.image_token_id)

    def _follow(self, layer: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        return None if args[0].shape[1] == 1 else (args, {**kwargs, **self._cut})

    def _vectors(self, layer: Any, h: Tensor, cos: Tensor, sin: Tensor) -> dict[str, Tensor]:
        """`get_key_query_value`: current_k/q (pre-RoPE) and current_k/q_cosine (RoPE'd), (T, heads·d) each."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        attn = layer.self_attn
        x = layer.input_layernorm(h)  # (1, T, D)
        T, d = x.shape[1], attn.head_dim
        k = attn.k_proj(x).view(1, T, -1, d).transpose(1, 2)  # (1, Hkv, T, d)
        q = attn.q_proj(x).view(1, T, -1, d).transpose(1, 2)  # (1, H, T, d)
        q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin)
        flat = lambda v: v.transpose(1, 2).flatten(2)[0]  # noqa: E731  (T, heads·d)
        return {"current_k": flat(k), "current_q": flat(q), "current_k_cosine": flat(k_rot),
                "current_q_cosine": flat(q_rot)}

    def _euti(self, vec: dict[str, Tensor], h: Tensor, start: int, n: int, heads: tuple[int, int, int]) -> Tensor:
        """The official pruning block: a keep flag per image token, (n,) bool."""
        o, (H, Hkv, d) = self.o, heads
        if not o.token_pruning:
            return torch.ones(n, dtype=torch.bool)
        non_text = start + n
        tag = "_cosine" if o.use_cosine_in_token_pruning else ""
        keys = vec["current_k" + tag][:non_text] if o.use_all_non_text_pruning else \
            vec["current_k" + tag][start:non_text]
        k = keys.view(-1, Hkv, d).transpose(0, 1).repeat_interleave(H // Hkv, dim=0)  # (H, K, d)
        q = vec["current_q" + tag][:non_text].view(non_text, H, d).transpose(0, 1).mean(1, keepdim=True)  # (H, 1, d)
        if not o.do_not_upcast_to_full_precision_for_pruning:
            q, k = q.float(), k.float()
        s = torch.softmax((q / math.sqrt(d)) @ k.transpose(1, 2), dim=-1, dtype=torch.float32).mean(0)[0]  # (K,)
        s = torch.nan_to_num(s, nan=0.0)
        scores = s[start:non_text] if o.use_all_non_text_pruning else s  # (n,)
        if o.multiply_by_norm:
            scores = scores * h[0, start:non_text].float().norm(dim=-1, p=o.norm_to_use)
        keep_n = int(n * o.pruning_tokeep_percentage_value)
        thresh = torch.sort(scores, descending=True).values[keep_n - 1]
        keep = scores > thresh
        if o.avoid_numerical_instability_prune and int(keep.sum()) < keep_n:
            ties = torch.nonzero(scores == thresh).flatten()
            keep[ties[: keep_n - int(keep.sum())]] = True
        return keep

    def _cluster(self, x: Tensor, extra: Tensor | None) -> Tensor:
        """Centre row of every row of x (m, F) then of `extra` (r, F) (retrieval), -1 when dropped; (m + r,)."""
        o = self.o
        if o.use_DBDPC:
            return dbdpc(x, o.cutoff, o.avoid_numerical_instability_DBDPC, extra, o.coef_pruned)
        if o.use_dpc:
            return dpc(x, o.percentage_to_keep_dpc)
        if o.use_agglomerative:
            return agglomerative(x, o.percentage_to_keep_agglomerative, o.linkage)
        if o.use_dbscan:
            return dbscan(x, o.eps_dbscan, o.noise_as_clusters_dbscan)
        if o.use_kmeans:
            return kmeans(x, int(o.perc_tokeep_kmeans * self._span[1]), o.kmeans_seed)
        return torch.arange(x.shape[0])  # pruning only: every kept token is its own centre

    @torch.no_grad()
    def _reduce(self, layer: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        h = args[0]  # (1, T, D)
        if h.shape[1] == 1:
            return None
        o, (start, n) = self.o, self._span
        T = h.shape[1]
        cos, sin = kwargs["position_embeddings"]  # (1, T, d) each
        attn = layer.self_attn
        heads = (attn.config.num_attention_heads, attn.config.num_key_value_heads, attn.head_dim)
        vec = self._vectors(layer, h, cos, sin)
        keep = self._euti(vec, h, start, n, heads)  # (n,)
        kept = start + torch.nonzero(keep).flatten()  # (m,) sequence indices, ascending
        pruned = start + torch.nonzero(~keep).flatten()  # (n - m,)
        x = vec[o.vector_to_use_in_distance_clustering].float()
        retrieve = o.use_DBDPC and o.include_pruned_in_mean
        members = torch.cat((kept, pruned)) if retrieve else kept  # the rows `centre` indexes
        centre = self._cluster(x[kept], x[pruned] if retrieve else None)  # (len(members),) row of its centre
        joined = centre >= 0
        centres = torch.unique(centre[joined])  # rows of `members` that are centres
        slot = torch.searchsorted(centres, centre[joined])  # (j,) cluster of every joined member
        sums = torch.zeros(len(centres), h.shape[-1], dtype=h.dtype).index_add_(0, slot, h[0, members[joined]])
        sizes = torch.bincount(slot, minlength=len(centres)).to(h.dtype)  # (C,)
        centre_tokens = members[centres]  # (C,) sequence index of every cluster's centre
        h = h.clone()
        if o.take_mean:
            h[0, centre_tokens] = sums / sizes[:, None]
        label = torch.full((n,), -1)
        label[members[joined] - start] = members[centre[joined]] - start
        self.label = label
        survives = torch.ones(T, dtype=torch.bool)
        survives[start:start + n] = False
        survives[centre_tokens] = True
        rows = torch.nonzero(survives).flatten()  # (T',) text and centres, in order
        log_w = torch.zeros(T, dtype=h.dtype)
        if o.clusters() and not o.no_proportional_attention:
            log_w[centre_tokens] = torch.log(sizes)
        log_w = log_w[rows]
        t = len(rows)
        mask = torch.full((t, t), torch.finfo(h.dtype).min, dtype=h.dtype).triu(1) + log_w[None, :]  # (T', T')
        self._cut = {"position_ids": kwargs["position_ids"][..., rows] if kwargs.get("position_ids") is not None
                     else rows[None],
                     "position_embeddings": (cos[:, rows], sin[:, rows]), "attention_mask": mask[None, None]}
        if kwargs.get("cache_position") is not None:
            self._cut["cache_position"] = kwargs["cache_position"][:t]
        return (h[:, rows], *args[1:]), {**kwargs, **self._cut}

    @torch.no_grad()
    def _tome(self, idx: int, n_layers: int, layer: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """The official `use_tome` block before layer `idx`: merge, cut, proportional attention."""
        h = args[0]  # (1, T, D)
        if h.shape[1] == 1:
            return None
        o = self.o
        if idx == 0:  # the prompt as the model gives it
            start, n = self._span
            self._image = torch.arange(start, start + n)  # sequence index of every image token
            self._sizes = torch.ones(h.shape[1])  # (T,)
            self.slots = []
            keep = 1 - (1 - o.perc_tokeep_tome_total) * ((n_layers - o.tome_equivalant_layer_for_reduction) / n_layers)
            self._r0 = 6 * n_layers * (1 - keep) / ((n_layers + 1) * (2 * n_layers + 1)) * torch.tensor(n)
            cos, sin = kwargs["position_embeddings"]
            pos = kwargs["position_ids"] if kwargs.get("position_ids") is not None else torch.arange(h.shape[1])[None]
        else:
            (cos, sin), pos = self._cut["position_embeddings"], self._cut["position_ids"]
        m = len(self._image)
        r = max(min(int(self._r0 * ((n_layers - idx) / n_layers)) + 1, m // 2 - 2), 0)
        if r > 0:
            x = self._vectors(layer, h, cos, sin)[o.vector_to_use_in_distance_clustering][self._image].float()
            x = x / x.norm(dim=-1, keepdim=True)  # (m, F)
            a, b = torch.arange(0, m, 2), torch.arange(1, m, 2)
            sim = x[a] @ x[b].t()  # (m_a, m_b)
            best, values = sim.argmax(-1), sim.max(-1).values
            top = torch.topk(values, r).indices
            label = torch.arange(m)
            label[a[top]] = b[best[top]]
            survivors, slot = torch.unique(label, sorted=True, return_inverse=True)  # (m - r,), (m,)
            self.slots.append(slot)
            w = self._sizes[self._image]  # (m,)
            total = torch.zeros(len(survivors)).index_add_(0, slot, w)  # (m - r,)
            merged = torch.zeros(len(survivors), h.shape[-1], dtype=h.dtype).index_add_(
                0, slot, h[0, self._image] * w[:, None].to(h.dtype))
            h = h.clone()
            h[0, self._image[survivors]] = merged / total[:, None].to(h.dtype)
            self._sizes[self._image[survivors]] = total
            alive = torch.ones(h.shape[1], dtype=torch.bool)
            alive[self._image] = False
            alive[self._image[survivors]] = True
            rows = torch.nonzero(alive).flatten()  # (T',)
            new_index = torch.cumsum(alive.long(), 0) - 1  # old sequence index -> new
            self._image = new_index[self._image[survivors]]
            h, self._sizes, cos, sin, pos = h[:, rows], self._sizes[rows], cos[:, rows], sin[:, rows], pos[..., rows]
        t = h.shape[1]
        mask = torch.full((t, t), torch.finfo(h.dtype).min, dtype=h.dtype).triu(1) + torch.log(self._sizes).to(h.dtype)
        self._cut = {"position_ids": pos, "position_embeddings": (cos, sin), "attention_mask": mask[None, None]}
        if kwargs.get("cache_position") is not None:
            self._cut["cache_position"] = kwargs["cache_position"][:t]
        return (h, *args[1:]), {**kwargs, **self._cut}
