"""PACT: "Pruning and Clustering-Based Token Reduction for Faster Visual Language Models" (Dhouib et al., CVPR
2025; official code orailix/PACT: `transformers/PACT/utils.py`, the reduction loop of `modeling_qwen2.py`).

Before decoder layer `layer_for_reduction` runs, on the hidden states entering it and with its own norm and
projections (`ALGORITHMS.md` §5):
1. **Prune** (EUTI, `pact_pruning.py`): keep int(n·λ) image tokens by importance, λ =
   `pruning_tokeep_percentage_value` (or by the IQR rule, whose count depends on the data).
2. **Cluster** (DBDPC, `dbdpc.py`) the kept tokens on the chosen vectors (RoPE'd keys by default) with cutoff c.
3. **Retrieve**: a pruned image token joins its nearest centre if within `coef_pruned`·c.
4. **Merge**: every cluster becomes the plain mean of its members at its centre's position id (P1), with its
   size biasing every later layer's attention to it (log size, prefill and decode).
The number of clusters depends on the image, so the image span holds the maximum (the kept count) as slots and
marks the unused ones invalid (`clusters.py`): the result equals the official shorter sequence.

The baselines of the same options file swap step 2 (with `use_DBDPC: false`; no retrieval): `use_dpc`
(`dpc.py`) and `use_agglomerative` (`agglomerative.py`) form up to int(p·m) clusters of the m kept tokens,
`use_kmeans` (`kmeans.py`) int(p·n) of the n image tokens (at most m), `use_dbscan` (`dbscan.py`) as many as
DBSCAN finds; `use_tome` (`pact_tome.py`) merges before every layer. The recipe takes PACT's options under their
own names (`pact_options.py`; `configs/pact.json` loads with `method: PACT`), unset options take that file's
values, then the official `load_config` defaults. Differences from the official
code: every score and distance is fp32 whatever the model dtype; density-rank and tie orders go to the lower
index (the official argsorts leave them open); every sample of a batch clusters its own tokens; with
`get_mean_position_id` every member counts, retrieved ones too (the official code then indexes past its kept
tokens and fails); the IQR rule ranks the image scores (the official line names an undefined variable).
`keep_casual` false gives the same graph (the causal mask plus log sizes either way).

The pruning's scores and the clustering's distance matrices (DBDPC: between the image tokens, and from each one
to the kept ones for the retrieval; DPC, DBSCAN and agglomerative: between the kept tokens, and agglomerative
also each point's distance to its cluster's mean; ToMe: its A·Bᵀ similarities) go through `ctx.decision`
(`Step.scored`), so a graph whose selection or clusters differ from eager's at a near-tie is checked by
replaying it. `use_kmeans` does not report its decisions (each of its iterations decides on distances to
centroids computed from the last).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from tokcompile.errors import RecipeError
from tokcompile.reduce.agglomerative import agglomerative_labels
from tokcompile.reduce.base import REDUCERS, Entering
from tokcompile.reduce.clusters import write_clusters
from tokcompile.reduce.dbdpc import find_centres, nearest_centre
from tokcompile.reduce.dbscan import dbscan_labels
from tokcompile.reduce.dpc import dpc_labels
from tokcompile.reduce.kmeans import kmeans_labels
from tokcompile.reduce.ops import gather_tokens, topk_sorted
from tokcompile.reduce.pact_options import KMEANS_ITERATIONS, PACTOptions
from tokcompile.reduce.pact_pruning import euti_scores, keep_by_score
from tokcompile.reduce.pact_tome import merges_per_layer, tome_step
from tokcompile.reduce.prune import keep_image_tokens
from tokcompile.reduce.schedule import Output, Positions, Schedule, Site, Step

if TYPE_CHECKING:
    from torch import Tensor

    from tokcompile.models.geometry import Geometry
    from tokcompile.reduce.context import DecoderContext
    from tokcompile.reduce.state import TokenState


@REDUCERS.register("pact")
@dataclass(frozen=True)
class PACTConfig(PACTOptions):
    """PACT (`pact_options.py` lists its options)."""

    method: ClassVar[str] = "PACT"
    sites: ClassVar[frozenset[Site]] = frozenset({Site.DECODER_LAYER})

    def _exact_count(self) -> bool:
        """The kept count is known at plan time: the percentage rule with its tie fill, and no clustering."""
        return (not self.clusters() and self.token_pruning and self.pruning_filter_wth_percentage
                and self.avoid_numerical_instability_prune)

    def plan(self, geom: Geometry, key: str, entering: Entering) -> Schedule:
        self.check(geom, key)
        n = entering.image_tokens
        if self.use_tome:
            return self._plan_tome(geom, n)
        slots = n
        if self.prune_with_norm or (self.token_pruning and self.pruning_filter_wth_percentage):
            lam = self.pruning_tokeep_percentage_value
            if not 0 < lam <= 1 or self.n_keep(n) < 1:
                raise RecipeError(f"{key}.pruning_tokeep_percentage_value",
                                  f"{lam} keeps {self.n_keep(n)} of {n} image tokens; use a fraction in (0, 1]")
            slots = self.n_keep(n)
        if (share := self._share()) is not None:
            name, p = share
            k = int((n if self.use_kmeans else slots) * p)  # k-means: int(p·n) of the n image tokens, as official
            if not 0 < p <= 1 or k < 1:
                raise RecipeError(f"{key}.{name}", f"{p} makes {k} clusters of {slots} tokens; use a fraction in "
                                                   "(0, 1]")
            if k > slots:
                raise RecipeError(f"{key}.{name}", f"{p} asks for {k} clusters of the {slots} tokens the pruning "
                                                   "keeps (k-means needs at least k points); lower it or raise "
                                                   "pruning_tokeep_percentage_value")
            slots = k  # the most clusters: int(p·m) of at most `slots` kept tokens (k-means: int(p·n))
        output = Output.KEPT if self._exact_count() else Output.CLUSTER
        positions = Positions.RENUMBER if self.change_position_ids else Positions.KEEP
        sizes = self.clusters() and not self.no_proportional_attention
        return (Step("pact", Site.DECODER_LAYER, self.layer_for_reduction, n, slots, output, positions, sizes,
                     scored=self.decisions()),)

    def decisions(self) -> int | None:
        """Score vectors the step decides on (`Step.scored`): the pruning's scores, then the clustering's
        distances between the image tokens and, for DBDPC, from each one to the kept ones (the retrieval), for
        agglomerative, of each point to its cluster's mean (the centre); None for k-means, whose iterations each
        decide on distances to centroids that move."""
        if self.use_kmeans:
            return None
        clustering = 2 if self.use_DBDPC or self.use_agglomerative else 1 if self.clusters() else 0
        return int(self.prunes()) + clustering

    def _plan_tome(self, geom: Geometry, n: int) -> Schedule:
        """One merging step before every layer whose r_l is above 0 (`pact_tome.py`)."""
        positions = Positions.RENUMBER if self.change_position_ids else Positions.KEEP
        steps = []
        rs = merges_per_layer(n, geom.n_layers, self.perc_tokeep_tome_total, self.tome_equivalant_layer_for_reduction)
        for layer, r in enumerate(rs):
            if r > 0:
                steps.append(Step("pact", Site.DECODER_LAYER, layer, n, n - r, Output.ASSIGN, positions, True,
                                  scored=1))  # its similarities
                n -= r
        return tuple(steps)

    def scoring_flops(self, step: Step, geom: Geometry, n_tokens: int) -> int:
        """EUTI: the layer's q and k projections again over the sequence (2·T·D·(H + Hkv)·d) and one score row
        per head (2·T·H·d); DBDPC at its slot count S over F-dim vectors: the distances (2·S²·F), its n // 10 + 1
        rounds and S scan steps over S² masks, and the retrieval distances (2·n·S·F). ToMe: the vectors over
        the sequence (2·T·D·F) and the A-to-B similarities (2·(n/2)²·F)."""
        d, T, n, S = geom.head_dim, n_tokens, step.n_in, step.n_out
        F = (geom.n_kv_heads if "_k" in self.vector_to_use_in_distance_clustering else geom.n_heads) * d
        if self.use_tome:
            return 2 * T * geom.hidden_size * F + 2 * (n // 2) * (n - n // 2) * F
        flops = 2 * T * geom.hidden_size * (geom.n_heads + geom.n_kv_heads) * d + 2 * T * geom.n_heads * d
        if self.clusters():
            flops += 2 * S * S * F + (S // 10 + 1 + S) * S * S + 2 * n * S * F
        return flops

    def _vectors(self, ctx: DecoderContext) -> Tensor:
        """(B, T, F) the clustering vectors of every token, heads flattened."""
        st, name = ctx.state, self.vector_to_use_in_distance_clustering
        rope = name.endswith("_cosine")
        fn = ctx.ops.keys if name.startswith("current_k") else ctx.ops.query
        v = fn(ctx.layer, st.hidden, st.positions, rope=rope)  # (B, H or Hkv, T, d)
        return v.transpose(1, 2).flatten(2)  # (B, T, F)

    def labels(self, ctx: DecoderContext, n: int, kept: Tensor, slots: int) -> Tensor:
        """(B, n) every image token's centre (-1: dropped) from the clustering of the `kept` (B, n) tokens into
        at most `slots` clusters."""
        x = gather_tokens(self._vectors(ctx), ctx.image_span(n))  # (B, n, F)
        if self.use_dpc:  # the baselines drop the pruned tokens (no retrieval), as the official code
            return dpc_labels(x, kept, self.percentage_to_keep_dpc, ctx.decision)
        if self.use_agglomerative:
            return agglomerative_labels(x, kept, self.percentage_to_keep_agglomerative, self.linkage, ctx.decision)
        if self.use_dbscan:
            return dbscan_labels(x, kept, self.eps_dbscan, self.noise_as_clusters_dbscan, ctx.decision)
        if self.use_kmeans:
            return kmeans_labels(x, kept, slots, self.kmeans_seed, KMEANS_ITERATIONS)
        centres = find_centres(x, kept, self.cutoff, self.avoid_numerical_instability_DBDPC, ctx.decision)
        cross = 1 - centres.unit @ centres.unit.transpose(1, 2)  # (B, n, n) unclamped, as for retrieved tokens
        dist = torch.where(kept[..., None], centres.dist, cross)  # (B, n, n)
        dist = ctx.decision(dist)  # (B, n, n): each token's nearest centre from these
        pick, best = nearest_centre(dist, centres)  # (B, n)
        if self.include_pruned_in_mean:  # retrieval: everyone within coef·c of its centre
            joins = best <= self.cutoff * self.coef_pruned
        else:
            joins = kept
        idx = torch.arange(n, device=x.device)[None]
        label = torch.where(joins, pick, -1)
        return torch.where(centres.is_centre, idx, label)  # (B, n)

    def apply(
        self, state: TokenState, ctx: DecoderContext, step: Step, forced: Tensor | None = None
    ) -> tuple[TokenState, Tensor]:
        n = step.n_in
        if self.use_tome:
            x = None if forced is not None else gather_tokens(self._vectors(ctx), ctx.image_span(n))  # (B, n, F)
            return tome_step(state, x, step, forced, ctx.decision)
        if forced is not None:  # eager references replay an earlier result
            label = forced
        else:
            scores = euti_scores(self, ctx, n)  # (B, n)
            kept = keep_by_score(self, ctx.decision(scores) if self.prunes() else scores, self.n_keep(n))  # (B, n)
            if step.output is Output.KEPT:
                chosen = topk_sorted(kept.float(), step.n_out)  # (B, k) ascending
                return keep_image_tokens(state, chosen, step), chosen
            if self.clusters():
                label = self.labels(ctx, n, kept, step.n_out)
            else:
                label = torch.where(kept, torch.arange(n, device=kept.device)[None], -1)
        if step.output is Output.KEPT:
            return keep_image_tokens(state, label, step), label
        out = write_clusters(state, label, step, take_mean=self.take_mean or not self.use_DBDPC, with_sizes=step.sizes,
                             mean_positions=self.get_mean_position_id)
        return out, label
