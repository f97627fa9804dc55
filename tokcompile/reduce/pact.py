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

The recipe takes PACT's options under their own names (`configs/pact.json` loads with `method: PACT` added);
unset options take that file's values, then the official `load_config` defaults. Differences from the official
code: every score and distance is fp32 whatever the model dtype; density-rank and tie orders go to the lower
index (the official argsorts leave them open); every sample of a batch clusters its own tokens; with
`get_mean_position_id` every member counts, retrieved ones too (the official code then indexes past its kept
tokens and fails); the IQR rule ranks the image scores (the official line names an undefined variable).
`keep_casual` false gives the same graph (the causal mask plus log sizes either way).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from tokcompile.errors import RecipeError
from tokcompile.reduce.base import REDUCERS, Entering
from tokcompile.reduce.clusters import write_clusters
from tokcompile.reduce.dbdpc import find_centres, nearest_centre
from tokcompile.reduce.ops import gather_tokens, topk_sorted
from tokcompile.reduce.pact_pruning import euti_scores, keep_by_score
from tokcompile.reduce.prune import keep_image_tokens
from tokcompile.reduce.schedule import Output, Positions, Schedule, Site, Step

if TYPE_CHECKING:
    from torch import Tensor

    from tokcompile.models.geometry import Geometry
    from tokcompile.reduce.context import DecoderContext
    from tokcompile.reduce.state import TokenState

VECTORS = ("current_k_cosine", "current_k", "current_q", "current_q_cosine")
LOGGING = {"log_output_path": "aggregated_metrics", "synchro": False, "get_performance_metrics": False,
           "get_reduction_ratio": False}  # PACT's own logging and timing: accepted, without effect
BASELINES = ("use_tome", "use_kmeans", "use_dpc", "use_agglomerative", "use_dbscan")


@REDUCERS.register("pact")
@dataclass(frozen=True)
class PACTConfig:
    """PACT's options, spelled as its configuration file spells them (see the module docstring)."""

    visual_token_reduction: bool = True
    layer_for_reduction: int = 4
    progessive_reduction: bool = False
    use_DBDPC: bool = True
    cutoff: float = 0.21
    vector_to_use_in_distance_clustering: str = "current_k_cosine"
    take_mean: bool = True
    include_pruned_in_mean: bool = True
    do_not_consider_non_image_tokens_as_pruned: bool = True
    coef_pruned: float = 1.5
    avoid_numerical_instability_DBDPC: bool = True
    withdraw_visual_tokens: bool = False
    VTW_equivalant_layer_for_reduction: int = -1
    equivalent_reduc_percentage_vtw: float = 0.0
    use_tome: bool = False
    perc_tokeep_tome_total: float = 1.0
    tome_equivalant_layer_for_reduction: int = 4
    use_kmeans: bool = False
    perc_tokeep_kmeans: float = 1.0
    use_dpc: bool = False
    percentage_to_keep_dpc: float = 1.0
    use_agglomerative: bool = False
    percentage_to_keep_agglomerative: float = 1.0
    linkage: str = "single"
    use_dbscan: bool = False
    eps_dbscan: float = 0.1
    noise_as_clusters_dbscan: bool = False
    token_pruning: bool = True
    use_all_non_text_pruning: bool = True
    prune_with_norm: bool = False
    use_cosine_in_token_pruning: bool = False
    use_attention_in_token_pruning: bool = False
    use_mask_in_use_attention_in_token_pruning: bool = False
    use_IQR_in_token_pruning: bool = False
    alpha_IQR: float = 0.5
    pruning_filter_wth_percentage: bool = True
    pruning_tokeep_percentage_value: float = 0.55
    multiply_by_norm: bool = True
    norm_to_use: float = 2.0
    avoid_numerical_instability_prune: bool = True
    no_proportional_attention: bool = False
    change_position_ids: bool = False
    get_mean_position_id: bool = False
    synchro: bool = False
    need_kq: bool = True
    do_not_upcast_to_full_precision_for_pruning: bool = False
    keep_casual: bool = True
    get_performance_metrics: bool = False
    get_reduction_ratio: bool = False
    use_custom_merging: bool = False
    use_custom_pruning: bool = False
    log_output_path: str = "aggregated_metrics"

    method: ClassVar[str] = "PACT"
    sites: ClassVar[frozenset[Site]] = frozenset({Site.DECODER_LAYER})

    def warnings(self) -> tuple[str, ...]:
        changed = [k for k, default in LOGGING.items() if getattr(self, k) != default]
        return tuple(f"PACT option {k} only concerns PACT's own logging and timing; it has no effect here"
                     for k in changed)

    def _check(self, geom: Geometry, key: str) -> None:
        def refuse(name: str, why: str) -> RecipeError:
            return RecipeError(f"{key}.{name}", why)

        if not self.visual_token_reduction:
            raise refuse("visual_token_reduction", "false turns PACT off; remove the PACT reduction instead")
        on = [b for b in ("use_DBDPC", *BASELINES) if getattr(self, b)]
        if len(on) > 1:
            raise refuse(on[1], f"{on[0]} and {on[1]} are two clusterings; PACT takes one at a time: set one false")
        pruners = [p for p in ("prune_with_norm", "token_pruning", "withdraw_visual_tokens") if getattr(self, p)]
        if len(pruners) > 1:
            raise refuse(pruners[1], f"{pruners[0]} and {pruners[1]} are two pruning rules; set one false")
        for name in BASELINES:
            if getattr(self, name):
                raise refuse(name, "this PACT baseline clustering is not supported yet; use use_DBDPC (PACT)")
        if self.withdraw_visual_tokens or self.VTW_equivalant_layer_for_reduction != -1:
            name = "withdraw_visual_tokens" if self.withdraw_visual_tokens else "VTW_equivalant_layer_for_reduction"
            raise refuse(name, "token withdrawal is the VTW method: use `special: {method: VTW, ...}` instead")
        for name in ("use_custom_merging", "use_custom_pruning"):
            if getattr(self, name):
                raise refuse(name, "PACT's custom hooks are placeholders for user code; write a reducer instead")
        if self.progessive_reduction:
            raise refuse("progessive_reduction", "progressive reduction (PACT's in-decoder ToMe schedule) is not "
                                                 "supported yet; set it false")
        if not self.do_not_consider_non_image_tokens_as_pruned:
            raise refuse("do_not_consider_non_image_tokens_as_pruned", "only pruned image tokens can be retrieved "
                                                                       "into clusters; set it true")
        if not self.need_kq and (self.use_DBDPC or self.token_pruning):
            raise refuse("need_kq", "PACT's pruning and clustering read the layer's keys and queries; set it true")
        if self.token_pruning and self.use_IQR_in_token_pruning == self.pruning_filter_wth_percentage:
            raise refuse("use_IQR_in_token_pruning", "token_pruning needs exactly one of use_IQR_in_token_pruning "
                                                     "and pruning_filter_wth_percentage true")
        if not (self.use_DBDPC or self.token_pruning or self.prune_with_norm):
            raise refuse("use_DBDPC", "with no clustering and no pruning PACT reduces nothing; set use_DBDPC or "
                                      "token_pruning true")
        if self.vector_to_use_in_distance_clustering not in VECTORS:
            raise refuse("vector_to_use_in_distance_clustering", f"{self.vector_to_use_in_distance_clustering!r} "
                                                                 f"is not one of {', '.join(VECTORS)}")
        if not 0 <= self.layer_for_reduction < geom.n_layers:
            raise refuse("layer_for_reduction", f"{self.layer_for_reduction} is outside the decoder's layers "
                                                f"0..{geom.n_layers - 1}")
        for name in ("cutoff", "coef_pruned", "norm_to_use"):
            if not getattr(self, name) > 0:
                raise refuse(name, f"{getattr(self, name)} must be above 0")
        if (self.get_mean_position_id or self.change_position_ids) and geom.rope != "1d":
            name = "get_mean_position_id" if self.get_mean_position_id else "change_position_ids"
            raise refuse(name, f"{geom.family}'s {geom.rope} RoPE keeps the tokens' position ids; set it false")

    def n_keep(self, n: int) -> int:
        """Image tokens the percentage rule keeps: int(n·λ)."""
        return int(n * self.pruning_tokeep_percentage_value)

    def _exact_count(self) -> bool:
        """The kept count is known at plan time: the percentage rule with its tie fill, and no clustering."""
        return (not self.use_DBDPC and self.token_pruning and self.pruning_filter_wth_percentage
                and self.avoid_numerical_instability_prune)

    def plan(self, geom: Geometry, key: str, entering: Entering) -> Schedule:
        self._check(geom, key)
        n = entering.image_tokens
        slots = n
        if self.prune_with_norm or (self.token_pruning and self.pruning_filter_wth_percentage):
            lam = self.pruning_tokeep_percentage_value
            if not 0 < lam <= 1 or self.n_keep(n) < 1:
                raise RecipeError(f"{key}.pruning_tokeep_percentage_value",
                                  f"{lam} keeps {self.n_keep(n)} of {n} image tokens; use a fraction in (0, 1]")
            slots = self.n_keep(n)
        output = Output.KEPT if self._exact_count() else Output.CLUSTER
        positions = Positions.RENUMBER if self.change_position_ids else Positions.KEEP
        sizes = self.use_DBDPC and not self.no_proportional_attention
        return (Step("pact", Site.DECODER_LAYER, self.layer_for_reduction, n, slots, output, positions, sizes),)

    def scoring_flops(self, step: Step, geom: Geometry, n_tokens: int) -> int:
        """EUTI: the layer's q and k projections again over the sequence (2·T·D·(H + Hkv)·d) and one score row
        per head (2·T·H·d); DBDPC at its slot count S over F-dim vectors: the distances (2·S²·F), its n // 10 + 1
        rounds and S scan steps over S² masks, and the retrieval distances (2·n·S·F)."""
        d, T, n, S = geom.head_dim, n_tokens, step.n_in, step.n_out
        flops = 2 * T * geom.hidden_size * (geom.n_heads + geom.n_kv_heads) * d + 2 * T * geom.n_heads * d
        if self.use_DBDPC:
            F = (geom.n_kv_heads if "_k" in self.vector_to_use_in_distance_clustering else geom.n_heads) * d
            flops += 2 * S * S * F + (S // 10 + 1 + S) * S * S + 2 * n * S * F
        return flops

    def _vectors(self, ctx: DecoderContext) -> Tensor:
        """(B, T, F) the clustering vectors of every token, heads flattened."""
        st, name = ctx.state, self.vector_to_use_in_distance_clustering
        rope = name.endswith("_cosine")
        fn = ctx.ops.keys if name.startswith("current_k") else ctx.ops.query
        v = fn(ctx.layer, st.hidden, st.positions, rope=rope)  # (B, H or Hkv, T, d)
        return v.transpose(1, 2).flatten(2)  # (B, T, F)

    def labels(self, ctx: DecoderContext, n: int, kept: Tensor) -> Tensor:
        """(B, n) every image token's centre (-1: dropped) from DBDPC over the `kept` (B, n) tokens."""
        x = gather_tokens(self._vectors(ctx), ctx.image_span(n))  # (B, n, F)
        centres = find_centres(x, kept, self.cutoff, self.avoid_numerical_instability_DBDPC)
        cross = 1 - centres.unit @ centres.unit.transpose(1, 2)  # (B, n, n) unclamped, as for retrieved tokens
        dist = torch.where(kept[..., None], centres.dist, cross)  # (B, n, n)
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
        if forced is not None:  # eager references replay an earlier result
            label = forced
        else:
            kept = keep_by_score(self, euti_scores(self, ctx, n), self.n_keep(n))  # (B, n) bool
            if step.output is Output.KEPT:
                chosen = topk_sorted(kept.float(), step.n_out)  # (B, k) ascending
                return keep_image_tokens(state, chosen, step), chosen
            if self.use_DBDPC:
                label = self.labels(ctx, n, kept)
            else:
                label = torch.where(kept, torch.arange(n, device=kept.device)[None], -1)
        if step.output is Output.KEPT:
            return keep_image_tokens(state, label, step), label
        out = write_clusters(state, label, step, take_mean=self.take_mean, with_sizes=step.sizes,
                             mean_positions=self.get_mean_position_id)
        return out, label
