"""PACT's options: every name its configuration file (orailix/PACT `configs/pact.json`, `load_config`) knows,
with that file's values as defaults (then `load_config`'s), and the combinations the compiler refuses at --plan.

Every clustering baseline runs: DPC, agglomerative clustering, DBSCAN, k-means (with one new key,
`kmeans_seed`, for its compile-time seeding) and ToMe in every decoder layer (`use_tome`, which implies
`progessive_reduction` and layer 0 as the official `load_config` sets them). The custom hooks (placeholders for
user code) and token withdrawal (the VTW method) are refused with the reason. Logging and timing options are
accepted with a warning.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tokcompile.errors import RecipeError
from tokcompile.reduce.agglomerative import LINKAGES

if TYPE_CHECKING:
    from tokcompile.models.geometry import Geometry

VECTORS = ("current_k_cosine", "current_k", "current_q", "current_q_cosine")
LOGGING = {"log_output_path": "aggregated_metrics", "synchro": False, "get_performance_metrics": False,
           "get_reduction_ratio": False}  # PACT's own logging and timing: accepted, without effect
# the clusterings supported (PACT's own, then baselines with their share-of-clusters option)
SHARES = {"use_dpc": "percentage_to_keep_dpc", "use_agglomerative": "percentage_to_keep_agglomerative",
          "use_kmeans": "perc_tokeep_kmeans"}
KMEANS_ITERATIONS = 100  # the official max_iters
CLUSTERINGS = ("use_DBDPC", *SHARES, "use_dbscan")
BASELINES = ("use_tome", "use_kmeans", "use_dpc", "use_agglomerative", "use_dbscan")


@dataclass(frozen=True)
class PACTOptions:
    """PACT's options, spelled as its configuration file spells them."""

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
    kmeans_seed: int = 0  # not an official key: the seed of the k-means++ seeding, fixed at compile time
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

    def warnings(self) -> tuple[str, ...]:
        changed = [k for k, default in LOGGING.items() if getattr(self, k) != default]
        return tuple(f"PACT option {k} only concerns PACT's own logging and timing; it has no effect here"
                     for k in changed)

    def check(self, geom: Geometry, key: str) -> None:
        """Refuse what the compiler does not run, naming the option and the fix."""
        def refuse(name: str, why: str) -> RecipeError:
            return RecipeError(f"{key}.{name}", why)

        self._check_combinations(refuse)
        self._check_values(geom, refuse)

    def _check_combinations(self, refuse: Callable[[str, str], RecipeError]) -> None:
        """Which methods the options choose, and the combinations the official code refuses or never runs."""
        if not self.visual_token_reduction:
            raise refuse("visual_token_reduction", "false turns PACT off; remove the PACT reduction instead")
        on = [b for b in ("use_DBDPC", *BASELINES) if getattr(self, b)]
        if len(on) > 1:
            raise refuse(on[1], f"{on[0]} and {on[1]} are two clusterings; PACT takes one at a time: set one false")
        pruners = [p for p in ("prune_with_norm", "token_pruning", "withdraw_visual_tokens") if getattr(self, p)]
        if len(pruners) > 1:
            raise refuse(pruners[1], f"{pruners[0]} and {pruners[1]} are two pruning rules; set one false")
        if self.withdraw_visual_tokens or self.VTW_equivalant_layer_for_reduction != -1:
            name = "withdraw_visual_tokens" if self.withdraw_visual_tokens else "VTW_equivalant_layer_for_reduction"
            raise refuse(name, "token withdrawal is the VTW method: use `special: {method: VTW, ...}` instead")
        for name in ("use_custom_merging", "use_custom_pruning"):
            if getattr(self, name):
                raise refuse(name, "PACT's custom hooks are placeholders for user code; write a reducer instead")
        if self.use_tome:
            pruner = next((p for p in ("token_pruning", "prune_with_norm") if getattr(self, p)), None)
            if pruner is not None:
                raise refuse(pruner, "with use_tome it prunes again before every layer (progressive pruning), which "
                                     "is not supported; set it false")
            if self.no_proportional_attention:
                raise refuse("no_proportional_attention", "ToMe's merged tokens carry sizes, which bias attention "
                                                          "here; set it false")
            if not 0 <= self.perc_tokeep_tome_total <= 1:
                raise refuse("perc_tokeep_tome_total", f"{self.perc_tokeep_tome_total} is outside [0, 1]; use the "
                                                       "share of image tokens kept on average")
        elif self.progessive_reduction:
            raise refuse("progessive_reduction", "progressive reduction without use_tome (pruning again before every "
                                                 "layer) is not supported yet; set it false")
        if not self.do_not_consider_non_image_tokens_as_pruned:
            raise refuse("do_not_consider_non_image_tokens_as_pruned", "only pruned image tokens can be retrieved "
                                                                       "into clusters; set it true")
        if not self.need_kq and (self.clusters() or self.use_tome or self.token_pruning):
            raise refuse("need_kq", "PACT's pruning and clustering read the layer's keys and queries; set it true")
        if self.token_pruning and self.use_IQR_in_token_pruning == self.pruning_filter_wth_percentage:
            raise refuse("use_IQR_in_token_pruning", "token_pruning needs exactly one of use_IQR_in_token_pruning "
                                                     "and pruning_filter_wth_percentage true")
        if not (self.clusters() or self.use_tome or self.prunes()):
            raise refuse("use_DBDPC", "with no clustering and no pruning PACT reduces nothing; set use_DBDPC or "
                                      "token_pruning true")
        if self.get_mean_position_id and not self.use_DBDPC:
            raise refuse("get_mean_position_id", "applies to DBDPC only (the official baselines keep the centres' "
                                                 "positions); set it false")

    def _check_values(self, geom: Geometry, refuse: Callable[[str, str], RecipeError]) -> None:
        """The options' values against their ranges and the model."""
        if self.use_kmeans and self.kmeans_seed < 0:
            raise refuse("kmeans_seed", f"{self.kmeans_seed} is negative; use a seed of 0 or more")
        if self.use_dbscan and not self.eps_dbscan > 0:
            raise refuse("eps_dbscan", f"{self.eps_dbscan} must be above 0")
        if self.use_agglomerative and self.linkage not in LINKAGES:
            raise refuse("linkage", f"{self.linkage!r} is not one of {', '.join(LINKAGES)} (the official code runs "
                                    "scikit-learn on precomputed cosine distances, which ward cannot take)")
        if self.vector_to_use_in_distance_clustering not in VECTORS:
            raise refuse("vector_to_use_in_distance_clustering", f"{self.vector_to_use_in_distance_clustering!r} "
                                                                 f"is not one of {', '.join(VECTORS)}")
        if self.use_tome and not 0 <= self.tome_equivalant_layer_for_reduction < geom.n_layers:
            raise refuse("tome_equivalant_layer_for_reduction", f"{self.tome_equivalant_layer_for_reduction} is "
                                                                f"outside the decoder's layers 0..{geom.n_layers - 1}")
        if not self.use_tome and not 0 <= self.layer_for_reduction < geom.n_layers:  # ToMe starts at layer 0
            raise refuse("layer_for_reduction", f"{self.layer_for_reduction} is outside the decoder's layers "
                                                f"0..{geom.n_layers - 1}")
        for name in ("cutoff", "coef_pruned", "norm_to_use"):
            if not getattr(self, name) > 0:
                raise refuse(name, f"{getattr(self, name)} must be above 0")
        if (self.get_mean_position_id or self.change_position_ids) and geom.rope != "1d":
            name = "get_mean_position_id" if self.get_mean_position_id else "change_position_ids"
            raise refuse(name, f"{geom.family}'s {geom.rope} RoPE keeps the tokens' position ids; set it false")

    def prunes(self) -> bool:
        """Image tokens are pruned by score before any clustering."""
        return bool(self.token_pruning or self.prune_with_norm)

    def clusters(self) -> bool:
        """A clustering follows the pruning."""
        return any(getattr(self, c) for c in CLUSTERINGS)

    def _share(self) -> tuple[str, float] | None:
        """(option name, value) of the baseline clustering's share of clusters, or None for DBDPC."""
        name = next((SHARES[c] for c in SHARES if getattr(self, c)), None)
        return None if name is None else (name, getattr(self, name))

    def n_keep(self, n: int) -> int:
        """Image tokens the percentage rule keeps: int(n·λ)."""
        return int(n * self.pruning_tokeep_percentage_value)
