"""Static PACT against the independent reference written the official way (tiny LLaVA-OneVision and Qwen2-VL,
PACT's own families, and LLaVA-1.5), DBDPC against the official loop on synthetic data, plan errors, the
official configuration file, and one full compile."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tests.conftest import ROOT, assert_no_data_dependent_ops, compile_recipe, export_matching_eager, padded_family_case
from tests.references.pact import dbdpc, pact_reference
from tokcompile.errors import RecipeError
from tokcompile.models import ReducedVLM
from tokcompile.reduce.agglomerative import agglomerative_labels
from tokcompile.reduce.base import Entering
from tokcompile.reduce.dbdpc import find_centres
from tokcompile.reduce.dbscan import dbscan_labels
from tokcompile.reduce.dpc import dpc_labels
from tokcompile.reduce.kmeans import kmeans_labels
from tokcompile.reduce.pact import PACTConfig
from tokcompile.reduce.pact_tome import tome_labels
from tokcompile.reduce.schedule import Output, Positions, Site

# configs/pact.json of orailix/PACT, as published
OFFICIAL_JSON = """{
    "visual_token_reduction": true, "layer_for_reduction": 4, "use_DBDPC": true, "cutoff": 0.21,
    "vector_to_use_in_distance_clustering": "current_k_cosine", "take_mean": true, "include_pruned_in_mean": true,
    "coef_pruned": 1.5, "token_pruning": true, "use_cosine_in_token_pruning": false,
    "use_attention_in_token_pruning": false, "use_mask_in_use_attention_in_token_pruning": false,
    "pruning_filter_wth_percentage": true, "pruning_tokeep_percentage_value": 0.55, "multiply_by_norm": true,
    "norm_to_use": 2, "synchro": false, "keep_casual": true, "get_performance_metrics": false,
    "get_reduction_ratio": true, "log_output_path": "agg_pact_logs"
}"""


@pytest.fixture(scope="module", params=["llava_onevision", "qwen2_vl", "llava"])
def fam(request):
    return padded_family_case(request.param)


def _check_against_reference(f, **options) -> list[dict]:
    """Run the static PACT on the padded batch of two and the reference on each sample alone: the same cluster
    of every image token and logits within 1e-5. Returns the reference's stats per sample."""
    cfg = PACTConfig(**{"layer_for_reduction": 1, **options})
    schedule = cfg.plan(f.geom, "sparse.special", Entering.start(f.geom))
    vlm = ReducedVLM(f.model, f.adapter, f.geom, schedule, (cfg,), f.image_id).eval()
    with torch.no_grad():
        out = vlm.run({n: f.batch[n] for n in f.adapter.input_names_for(f.geom)})
    step = schedule[0]
    stats = []
    for b in range(2):
        sample = f.adapter.sample_inputs(f.batch, b, f.geom)
        ref_logits, ref_label, st = pact_reference(f.model, f.adapter, sample, image_token_id=f.image_id,
                                                   cfg=dataclasses.asdict(cfg))
        ours = out[f"{step.output_name}_0"][b]
        want = torch.nonzero(ref_label >= 0)[:, 0] if step.output is Output.KEPT else ref_label
        assert torch.equal(ours, want), (options, b, ours.tolist(), want.tolist())
        torch.testing.assert_close(out["logits"][b], ref_logits, atol=1e-5, rtol=1e-5)
        stats.append(st)
    return stats


def test_default_pact_matches_the_reference(fam):
    """The official configuration at several cutoffs: the same clusters, retrieval and logits; across them both
    halves of the centre search run (several rounds, and centres found by the sequential scan)."""
    stats = []
    for cutoff in (0.05, 0.1, 0.21, 0.5):
        stats += _check_against_reference(fam, cutoff=cutoff)
    assert max(s["clusters"] for s in stats) > min(s["clusters"] for s in stats)
    assert any(s["scan_centres"] for s in stats)
    if fam.family != "qwen2_vl":  # 13 kept tokens there: one round always ends the loop
        assert max(s["rounds"] for s in stats) >= 2


def test_dpc_baseline_matches_the_reference(fam):
    """PACT's DPC baseline (`use_dpc`): int(p·m) centres by δ·ρ, every other kept token in its parent's cluster;
    with the IQR rule m depends on the image, and so does the centre count."""
    dpc = {"use_dpc": True, "use_DBDPC": False}
    _check_against_reference(fam, **dpc, percentage_to_keep_dpc=0.3)
    _check_against_reference(fam, **dpc, percentage_to_keep_dpc=0.6, token_pruning=False)
    _check_against_reference(fam, **dpc, percentage_to_keep_dpc=0.5, use_IQR_in_token_pruning=True,
                             pruning_filter_wth_percentage=False)


@pytest.mark.parametrize("linkage", ["single", "complete", "average"])
def test_agglomerative_baseline_matches_scikit_learn(fam, linkage):
    """PACT's agglomerative baseline (`use_agglomerative`) against the official code's scikit-learn call: the same
    clusters and centres, with the percentage rule and with the IQR rule (a cluster count that depends on the
    image)."""
    agg = {"use_agglomerative": True, "use_DBDPC": False, "linkage": linkage}
    _check_against_reference(fam, **agg, percentage_to_keep_agglomerative=0.3)
    _check_against_reference(fam, **agg, percentage_to_keep_agglomerative=0.5, use_IQR_in_token_pruning=True,
                             pruning_filter_wth_percentage=False)


def test_dbscan_baseline_matches_the_reference(fam):
    """PACT's DBSCAN baseline (`use_dbscan`): clusters as scikit-learn's DBSCAN finds them on the unit vectors,
    each named after its most connected member; noise dropped, or clusters of its own."""
    dbscan = {"use_dbscan": True, "use_DBDPC": False}
    _check_against_reference(fam, **dbscan, eps_dbscan=0.6, token_pruning=False)
    _check_against_reference(fam, **dbscan, eps_dbscan=0.62, noise_as_clusters_dbscan=True)
    _check_against_reference(fam, **dbscan, eps_dbscan=0.65, noise_as_clusters_dbscan=True, token_pruning=False)


def test_dbscan_equals_scikit_learn_on_synthetic_blobs():
    """Blobs close enough to share border points, with noise between them, several radii and a quarter of the
    points not taking part: the same clusters and centres as scikit-learn's DBSCAN and the official centre rule."""
    from tests.references.pact import dbscan

    g = torch.Generator().manual_seed(1)
    batch, n = 3, 120
    centres = torch.randn(batch, 5, 3, generator=g)
    x = centres.gather(1, torch.randint(0, 5, (batch, n, 1), generator=g).expand(batch, n, 3))
    x = x + 0.25 * torch.randn(batch, n, 3, generator=g)
    member = torch.rand(batch, n, generator=g) < 0.75
    clusters = 0
    for eps in (0.1, 0.2, 0.3):
        for noise in (False, True):
            got = dbscan_labels(x, member, eps, noise)
            for b in range(batch):
                rows = torch.nonzero(member[b])[:, 0]
                want = torch.full((n,), -1)
                for c, ms in dbscan(x[b, rows], eps, noise).items():
                    want[rows[ms]] = int(rows[c])
                    clusters += len(ms) > 1
                assert torch.equal(got[b], want), (eps, noise, b)
    assert clusters > 10


def test_kmeans_baseline_matches_the_reference(fam):
    """PACT's k-means baseline (`use_kmeans`) as defined here (k-means++ from a compile-time seed, 100 Lloyd
    iterations, the member nearest each centroid, k = int(p·n) capped at the kept count): the same clusters as
    the loop reference, with both pruning rules and two seeds."""
    km = {"use_kmeans": True, "use_DBDPC": False}
    _check_against_reference(fam, **km, perc_tokeep_kmeans=0.3)
    _check_against_reference(fam, **km, perc_tokeep_kmeans=0.5, token_pruning=False, kmeans_seed=3)
    # the IQR rule keeps fewer than int(0.7·n) tokens here: k falls to the kept count
    _check_against_reference(fam, **km, perc_tokeep_kmeans=0.7, use_IQR_in_token_pruning=True,
                             pruning_filter_wth_percentage=False)


def test_tome_baseline_matches_the_reference(fam):
    """PACT's ToMe baseline (`use_tome`): a bipartite merge before every layer with the official r_l schedule,
    size-weighted means, and sizes biasing attention; the same slot for every image token at every layer, and
    the logits, as the reference; replaying the assignments gives the same logits."""
    cfg = PACTConfig(use_DBDPC=False, token_pruning=False, use_tome=True, perc_tokeep_tome_total=0.3,
                     tome_equivalant_layer_for_reduction=1)
    schedule = cfg.plan(fam.geom, "k", Entering.start(fam.geom))
    assert [s.layer for s in schedule] == list(range(fam.geom.n_layers)) and all(s.sizes for s in schedule)
    vlm = ReducedVLM(fam.model, fam.adapter, fam.geom, schedule, (cfg,) * len(schedule), fam.image_id).eval()
    inputs = {n: fam.batch[n] for n in fam.adapter.input_names_for(fam.geom)}
    with torch.no_grad():
        out = vlm.run(inputs)
        replayed = vlm.run(inputs, forced={f"assign_{j}": out[f"assign_{j}"] for j in range(len(schedule))})
    torch.testing.assert_close(replayed["logits"], out["logits"], atol=1e-6, rtol=1e-6)
    for b in range(2):
        sample = fam.adapter.sample_inputs(fam.batch, b, fam.geom)
        ref_logits, _, stats = pact_reference(fam.model, fam.adapter, sample, image_token_id=fam.image_id,
                                              cfg=dataclasses.asdict(cfg))
        assigns = [a for a in stats["assigns"] if a is not None]
        assert len(assigns) == len(schedule)
        for j, want in enumerate(assigns):
            assert torch.equal(out[f"assign_{j}"][b], want), (b, j)
        torch.testing.assert_close(out["logits"][b], ref_logits, atol=1e-5, rtol=1e-5)


def test_tome_schedule_is_the_official_one():
    """r_l as the official loop computes it in fp32 tensor arithmetic, for LLaVA-OneVision-7B's 28 layers and 729
    image tokens (tome.json with perc_tokeep_tome_total 0.5), and the clamp to n // 2 - 2."""
    from tokcompile.reduce.pact_tome import merges_per_layer

    L, n = 28, 729
    keep = 1 - (1 - 0.5) * ((L - 4) / L)
    r0 = 6 * L * (1 - keep) / ((L + 1) * (2 * L + 1)) * torch.tensor(n)  # a float32 tensor, as in the loop
    want, left = [], n
    for layer in range(L):
        r = max(min(int(r0 * ((L - layer) / L)) + 1, left // 2 - 2), 0)
        want.append(r)
        left -= r
    got = merges_per_layer(n, L, 0.5, 4)
    assert got == want and sum(got) > 0
    assert merges_per_layer(8, 4, 0.0, 1)[-1] == 0  # 8 tokens: at most 8 // 2 - 2 per layer, then nothing


OPTIONS = [
    {"use_attention_in_token_pruning": True},
    {"use_attention_in_token_pruning": True, "use_mask_in_use_attention_in_token_pruning": True,
     "use_all_non_text_pruning": False},
    {"use_cosine_in_token_pruning": True, "use_all_non_text_pruning": False},
    {"token_pruning": False, "prune_with_norm": True},
    {"use_DBDPC": False},
    {"use_DBDPC": False, "avoid_numerical_instability_prune": False, "multiply_by_norm": False},
    {"use_DBDPC": False, "use_IQR_in_token_pruning": True, "pruning_filter_wth_percentage": False, "alpha_IQR": 0.2},
    {"use_IQR_in_token_pruning": True, "pruning_filter_wth_percentage": False, "cutoff": 0.3},
    {"token_pruning": False},
    {"take_mean": False, "include_pruned_in_mean": False, "cutoff": 0.35},
    {"no_proportional_attention": True},
    {"vector_to_use_in_distance_clustering": "current_k", "cutoff": 0.1},
    {"vector_to_use_in_distance_clustering": "current_q_cosine", "cutoff": 0.1},
    {"avoid_numerical_instability_DBDPC": False, "cutoff": 0.1},
    {"do_not_upcast_to_full_precision_for_pruning": True, "norm_to_use": 1},
    {"coef_pruned": 0.5, "cutoff": 0.3},
    {"get_mean_position_id": True, "change_position_ids": True, "layer_for_reduction": 0},
]


POSITION_OPTIONS = {"get_mean_position_id", "change_position_ids"}  # 1-D RoPE only (refusal tested below)
OPTION_CASES = [(fam, o) for fam in ("llava", "qwen2_vl") for o in OPTIONS
                if fam == "llava" or not POSITION_OPTIONS & set(o)]


@pytest.mark.parametrize(("family", "options"), OPTION_CASES,
                         ids=[f"{fam}-" + "-".join(f"{k}={v}" for k, v in o.items()) for fam, o in OPTION_CASES])
def test_options_match_the_reference(family, options):
    _check_against_reference(padded_family_case(family), **options)


def test_dbdpc_equals_the_official_loop_on_synthetic_clusters():
    """Points spread over a patch of a plane (in cosine terms) make the centre search run several rounds of at
    least 10 new centres; blobs end it early in the sequential scan. A batch mixing both, with a quarter of the
    points not taking part, gives every sample its own centres."""
    g = torch.Generator().manual_seed(0)
    batch, n = 4, 160
    x = torch.empty(batch, n, 3)
    for b in range(batch):
        if b % 2 == 0:
            x[b] = torch.cat([torch.rand(n, 2, generator=g) * 4, torch.full((n, 1), 3.0)], dim=1)
        else:
            centres = torch.randn(6 * b, 3, generator=g)
            x[b] = centres[torch.randint(0, 6 * b, (n,), generator=g)] + 0.05 * torch.randn(n, 3, generator=g)
    member = torch.rand(batch, n, generator=g) < 0.75
    rounds, scanned = set(), 0
    for cutoff in (0.002, 0.005, 0.01, 0.05):
        got = find_centres(x, member, cutoff)
        for b in range(batch):
            rows = torch.nonzero(member[b])[:, 0]
            stats: dict = {}
            want = sorted(int(rows[i]) for i in set(dbdpc(x[b, rows], cutoff, True, stats)))
            assert torch.nonzero(got.is_centre[b])[:, 0].tolist() == want, (cutoff, b)
            rounds.add(stats["rounds"])
            scanned += stats["scan_centres"]
    assert max(rounds) >= 3 and len(rounds) >= 3 and scanned > 0, (rounds, scanned)


def test_dbdpc_decides_on_the_distances_decide_returns():
    """DBDPC hands `ctx.decision` its (B, n, n) distances and takes every decision on what it gets back: a replay
    that puts every member within the cutoff of every other leaves one centre per sample, the densest (all tie:
    the lowest index under ranked densities)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 40, 3, generator=g)
    member = torch.ones(2, 40, dtype=torch.bool)
    seen = []
    got = find_centres(x, member, 0.05, decide=lambda s: seen.append(s) or s)
    assert len(seen) == 1 and seen[0].shape == (2, 40, 40) and bool(seen[0].isfinite().all())
    assert torch.equal(got.is_centre, find_centres(x, member, 0.05).is_centre) and int(got.is_centre.sum()) > 2
    close = find_centres(x, member, 0.05, decide=lambda s: torch.zeros_like(s))
    assert close.is_centre.sum(-1).tolist() == [1, 1]


@pytest.mark.parametrize("labels", [
    lambda x, m, d: dpc_labels(x, m, 0.3, d),
    lambda x, m, d: dbscan_labels(x, m, 0.8, True, d),  # 0.6 leaves every point alone here
    lambda x, m, d: agglomerative_labels(x, m, 0.3, "average", d),
    lambda x, m, d: tome_labels(x, 7, d),
], ids=["dpc", "dbscan", "agglomerative", "tome"])
def test_baseline_clusters_follow_the_matrix_decide_returns(labels):
    """Each baseline hands `ctx.decision` its distance (ToMe: similarity) matrix first and forms its clusters from
    what it gets back alone: deciding on y's matrix with x's vectors gives y's clusters."""
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(2, 30, 4, generator=g), torch.randn(2, 30, 4, generator=g)
    member = torch.rand(2, 30, generator=g) < 0.8
    seen = []
    assert torch.equal(labels(x, member, lambda s: seen.append(s) or s), labels(x, member, None))
    assert seen[0].shape in ((2, 30, 30), (2, 15, 15)) and bool(seen[0].isfinite().all())
    captured = []
    want = labels(y, member, lambda s: captured.append(s) or s)
    calls = iter(range(len(captured)))
    got = labels(x, member, lambda s: captured[0] if next(calls) == 0 else s)  # y's matrix, x's own rest
    for b in range(2):  # the same clusters (agglomerative's centre also reads each point's distance to its mean)
        same_got = got[b][:, None] == got[b][None, :]
        same_want = want[b][:, None] == want[b][None, :]
        assert torch.equal(same_got, same_want)
    assert not torch.equal(labels(x, member, None), want)  # y's clusters are not x's


@pytest.mark.parametrize("labels", [
    lambda x, m, d: find_centres(x, m, 0.1, decide=d),
    lambda x, m, d: dpc_labels(x, m, 0.3, d),
    lambda x, m, d: dbscan_labels(x, m, 0.8, True, d),
    lambda x, m, d: agglomerative_labels(x, m, 0.3, "average", d),
    lambda x, m, d: tome_labels(x, 7, d),
], ids=["dbdpc", "dpc", "dbscan", "agglomerative", "tome"])
def test_reported_matrices_move_by_rounding_only_within_the_float32_margin(labels):
    """Inputs moved by float32 rounding (a relative 1e-7) move every reported matrix by far less than the float32
    near-tie margin (1e-5 of the row's largest |value|): the matrices are well conditioned, so parity can compare
    a graph's with eager's. A distance taken as √(2 − 2·cos) is not: near 0 (a point and itself) it turns the
    cosine's rounding into gaps of about 3e-4."""
    from tokcompile.near_ties import SCORE_MARGINS, compare_scores

    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 30, 4, generator=g)
    nudged = x * (1 + 1e-7 * torch.randn(x.shape, generator=g))
    member = torch.ones(2, 30, dtype=torch.bool)
    seen: tuple[list, list] = ([], [])
    for inputs, out in zip((x, nudged), seen):
        labels(inputs, member, lambda s, out=out: out.append(s.reshape(2, -1)) or s)
    for a, b in zip(*seen):
        compare_scores("rounding", "matrix", a, b, SCORE_MARGINS["float32"] / 10, "")


def test_pact_reports_its_decisions_except_with_kmeans():
    f = padded_family_case("llava_onevision")

    def scored(**options):
        cfg = PACTConfig(**{"layer_for_reduction": 1, **options})
        return cfg.plan(f.geom, "sparse.special", Entering.start(f.geom))[0].scored

    assert scored() == 3  # the pruning's scores, DBDPC's distances, the retrieval's distances
    assert scored(token_pruning=False) == 2 and scored(use_DBDPC=False) == 1
    assert scored(use_DBDPC=False, use_kmeans=True, perc_tokeep_kmeans=0.3) is None  # centroids move
    assert scored(use_DBDPC=False, use_dbscan=True) == 2 and scored(use_DBDPC=False, use_dpc=True) == 2
    assert scored(use_DBDPC=False, use_agglomerative=True) == 3  # + each point's distance to its cluster's mean
    tome = PACTConfig(use_DBDPC=False, use_tome=True, token_pruning=False, tome_equivalant_layer_for_reduction=1)
    tome = tome.plan(f.geom, "sparse.special", Entering.start(f.geom))
    assert tome and all(s.scored == 1 for s in tome)
    cfg = PACTConfig(layer_for_reduction=1)
    schedule = cfg.plan(f.geom, "sparse.special", Entering.start(f.geom))
    vlm = ReducedVLM(f.model, f.adapter, f.geom, schedule, (cfg,), f.image_id).eval()
    with torch.no_grad():
        out = vlm.run({n: f.batch[n] for n in f.adapter.input_names_for(f.geom)})
    n = schedule[0].n_in
    assert [tuple(out[f"score_0_{c}"].shape) for c in range(3)] == [(2, n), (2, n * n), (2, n * n)]


def test_plan_slots_outputs_and_positions():
    f = padded_family_case("llava_onevision")
    n = f.geom.n_image_tokens
    plan = lambda **kw: PACTConfig(layer_for_reduction=2, **kw).plan(f.geom, "k", Entering.start(f.geom))[0]  # noqa: E731
    step = plan()
    assert (step.site, step.layer, step.n_in, step.n_out) == (Site.DECODER_LAYER, 2, n, int(n * 0.55))
    assert step.output is Output.CLUSTER and step.sizes and step.positions is Positions.KEEP
    assert plan(use_DBDPC=False).output is Output.KEPT and not plan(use_DBDPC=False).sizes
    assert plan(use_IQR_in_token_pruning=True, pruning_filter_wth_percentage=False).n_out == n  # the maximum
    assert not plan(no_proportional_attention=True).sizes
    assert plan(change_position_ids=True).positions is Positions.RENUMBER


@pytest.mark.parametrize(
    "options,key,text",
    [
        ({"visual_token_reduction": False}, "visual_token_reduction", "turns PACT off"),
        ({"use_kmeans": True}, "use_kmeans", "two clusterings"),
        ({"use_DBDPC": False, "use_dbscan": True, "eps_dbscan": 0.0}, "eps_dbscan", "above 0"),
        ({"use_DBDPC": False, "use_kmeans": True, "perc_tokeep_kmeans": 0.0}, "perc_tokeep_kmeans", "makes 0"),
        ({"use_DBDPC": False, "use_kmeans": True, "kmeans_seed": -1}, "kmeans_seed", "negative"),
        ({"use_DBDPC": False, "use_kmeans": True, "perc_tokeep_kmeans": 0.8}, "perc_tokeep_kmeans",
         "needs at least k points"),
        ({"use_DBDPC": False, "use_tome": True}, "token_pruning", "progressive pruning"),
        ({"use_DBDPC": False, "use_tome": True, "token_pruning": False, "no_proportional_attention": True},
         "no_proportional_attention", "carry sizes"),
        ({"use_DBDPC": False, "use_tome": True, "token_pruning": False, "tome_equivalant_layer_for_reduction": 7},
         "tome_equivalant_layer_for_reduction", "outside"),
        ({"use_DBDPC": False, "progessive_reduction": True}, "progessive_reduction", "without use_tome"),
        ({"prune_with_norm": True}, "token_pruning", "two pruning rules"),
        ({"token_pruning": False, "withdraw_visual_tokens": True}, "withdraw_visual_tokens", "method: VTW"),
        ({"use_custom_merging": True}, "use_custom_merging", "placeholders"),
        ({"use_IQR_in_token_pruning": True}, "use_IQR_in_token_pruning", "exactly one"),
        ({"vector_to_use_in_distance_clustering": "keys"}, "vector_to_use_in_distance_clustering", "not one of"),
        ({"layer_for_reduction": 9}, "layer_for_reduction", "outside the decoder's layers"),
        ({"cutoff": 0.0}, "cutoff", "above 0"),
        ({"pruning_tokeep_percentage_value": 0.001}, "pruning_tokeep_percentage_value", "keeps 0"),
        ({"use_DBDPC": False, "token_pruning": False}, "use_DBDPC", "reduces nothing"),
        ({"do_not_consider_non_image_tokens_as_pruned": False}, "do_not_consider_non_image_tokens_as_pruned",
         "only pruned image tokens"),
        ({"need_kq": False}, "need_kq", "keys and queries"),
        ({"use_DBDPC": False, "use_dpc": True, "percentage_to_keep_dpc": 0.01}, "percentage_to_keep_dpc",
         "makes 0 clusters"),
        ({"use_DBDPC": False, "use_dpc": True, "get_mean_position_id": True}, "get_mean_position_id",
         "DBDPC only"),
        ({"use_DBDPC": False, "use_agglomerative": True, "linkage": "ward"}, "linkage", "ward cannot take"),
    ],
)
def test_plan_errors_name_the_key(options, key, text):
    f = padded_family_case("llava")
    with pytest.raises(RecipeError, match=text) as e:
        PACTConfig(**{"layer_for_reduction": 1, **options}).plan(f.geom, "sparse.special", Entering.start(f.geom))
    assert e.value.key == f"sparse.special.{key}"


def test_position_options_are_refused_on_m_rope():
    f = padded_family_case("qwen2_vl")
    for name in ("get_mean_position_id", "change_position_ids"):
        with pytest.raises(RecipeError, match="mrope RoPE keeps the tokens' position ids"):
            PACTConfig(layer_for_reduction=1, **{name: True}).plan(f.geom, "k", Entering.start(f.geom))


def test_the_official_configuration_file_loads_unchanged(tmp_path):
    """configs/pact.json with only `method: PACT` added plans at its own values (layer 4 of the 16-layer medium
    OneVision, planned without weights); the logging options it sets are accepted with a warning each."""
    from tokcompile.pipeline import plan_recipe

    special = {"method": "PACT", **json.loads(OFFICIAL_JSON)}
    recipe = tmp_path / "official.yml"
    recipe.write_text(
        'model: {type: Llava_OneVision, path: "tiny-random:llava_onevision@medium"}\n'
        "inputs: {batch_size: 1, image_size: [384, 384]}\n"
        "sparse:\n  method: TokenReduction\n  special: " + json.dumps(special) + "\n")
    plan = plan_recipe(recipe, out=tmp_path / "out")
    (step,) = plan.schedule
    n = plan.geometry.n_image_tokens
    assert (step.layer, step.n_in, step.n_out, step.output, step.sizes) == (4, n, int(n * 0.55), Output.CLUSTER,
                                                                           True)
    warned = " ".join(plan.recipe.warnings)
    assert "get_reduction_ratio" in warned and "log_output_path" in warned and "synchro" not in warned


# The other files of orailix/PACT configs/ (logging keys dropped); the baselines' shares are 0.0 there, swept by
# the official scripts through environment variables, so each case fills the one it needs.
OFFICIAL_OTHERS = {
    "dbdpc": ('{"layer_for_reduction": 4, "use_DBDPC": true, "cutoff": 0.21, "vector_to_use_in_distance_clustering":'
              ' "current_k_cosine", "take_mean": true, "include_pruned_in_mean": false, "token_pruning": false}', {}),
    "euti": ('{"layer_for_reduction": 4, "use_DBDPC": false, "token_pruning": true, "pruning_filter_wth_percentage": '
             'true, "pruning_tokeep_percentage_value": 0.5, "multiply_by_norm": true, "norm_to_use": 2}', {}),
    "fastv": ('{"layer_for_reduction": 4, "use_DBDPC": false, "token_pruning": true, "use_cosine_in_token_pruning": '
              'true, "use_attention_in_token_pruning": true, "use_mask_in_use_attention_in_token_pruning": true, '
              '"pruning_filter_wth_percentage": true, "pruning_tokeep_percentage_value": 0.5, '
              '"multiply_by_norm": false}', {}),
    "dpc": ('{"layer_for_reduction": 4, "use_DBDPC": false, "token_pruning": false, "use_dpc": true, '
            '"percentage_to_keep_dpc": 0.0}', {"percentage_to_keep_dpc": 0.3}),
    "agglomerative": ('{"layer_for_reduction": 4, "use_DBDPC": false, "token_pruning": false, "use_agglomerative": '
                      'true, "percentage_to_keep_agglomerative": 0.0, "linkage": "single"}',
                      {"percentage_to_keep_agglomerative": 0.3}),
    "tome": ('{"layer_for_reduction": 0, "tome_equivalant_layer_for_reduction": 4, "use_DBDPC": false, '
             '"token_pruning": false, "use_tome": true, "perc_tokeep_tome_total": 0.0}', {}),
    "dbscan": ('{"layer_for_reduction": 4, "use_DBDPC": false, "token_pruning": false, "use_dbscan": true, '
               '"noise_as_clusters_dbscan": true, "eps_dbscan": 0.1, "synchro": true}', {}),
    "kmeans": ('{"layer_for_reduction": 4, "use_DBDPC": false, "token_pruning": false, "use_kmeans": true, '
               '"perc_tokeep_kmeans": 0.5}', {}),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_OTHERS))
def test_the_official_baseline_files_load(name, tmp_path):
    """Each official configuration file plans with `method: PACT` added."""
    from tokcompile.pipeline import plan_recipe

    text, fill = OFFICIAL_OTHERS[name]
    special = {"method": "PACT", **json.loads(text), **fill}
    recipe = tmp_path / f"{name}.yml"
    recipe.write_text('model: {type: Llava_OneVision, path: "tiny-random:llava_onevision@medium"}\n'
                      "inputs: {batch_size: 1, image_size: [384, 384]}\n"
                      "sparse:\n  method: TokenReduction\n  special: " + json.dumps(special) + "\n")
    plan = plan_recipe(recipe, out=tmp_path / "out")
    n = plan.geometry.n_image_tokens
    first = plan.schedule[0]
    if name == "tome":
        assert len(plan.schedule) == plan.geometry.n_layers and first.output is Output.ASSIGN
    else:
        assert first.layer == 4 and first.n_in == n and first.n_out <= n


class _Clustering(torch.nn.Module):
    """One clustering as a module of (vectors, members), for export."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, member):
        return self.fn(x, member)


CLUSTERINGS = {
    "dbdpc": lambda x, m: find_centres(x, m, 0.1).is_centre,
    "dpc": lambda x, m: dpc_labels(x, m, 0.3),
    "single": lambda x, m: agglomerative_labels(x, m, 0.3, "single"),
    "complete": lambda x, m: agglomerative_labels(x, m, 0.3, "complete"),
    "dbscan": lambda x, m: dbscan_labels(x, m, 0.6, True),
    "kmeans": lambda x, m: kmeans_labels(x, m, 9, 0, 5),
    "tome": lambda x, m: tome_labels(x, 6),
}


@pytest.mark.parametrize("name", sorted(CLUSTERINGS))
def test_clusterings_export_as_static_graphs(name):
    """Every clustering exports with torch.export at static shapes, equal to eager, with no data-dependent op and
    no random op (a seeded draw must be a constant of the graph)."""
    g = torch.Generator().manual_seed(0)
    x, member = torch.randn(2, 30, 8, generator=g), torch.rand(2, 30, generator=g) < 0.9
    ep = export_matching_eager(_Clustering(CLUSTERINGS[name]), (x, member))
    ops = assert_no_data_dependent_ops(ep)
    assert not any("rand" in op or "bernoulli" in op for op in ops), ops


def test_tiny_recipe_compiles_with_parity(tmp_path):
    """The tiny recipe end to end (ONNX): parity of the cluster labels and logits, and greedy generation equal to
    eager through the proportional-attention bias the cache carries into decode."""
    out = tmp_path / "pact"
    res = compile_recipe(ROOT / "recipes" / "tiny" / "pact.yml", out, "--targets", "onnx")
    assert res.returncode == 0, res.stderr + res.stdout
    assert "onnx: vision, prefill and decode parity passed; greedy generation equals eager" in res.stdout
    assert "eager generation with KV cache equals the no-cache reference" in res.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    (step,) = manifest["plan"]["schedule"]
    assert (step["output"], step["n_in"], step["n_out"], step["sizes"]) == ("cluster", 64, 35, True)
