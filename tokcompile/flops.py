"""Analytic prefill FLOPs for a dense vs. a statically reduced VLM (pure Python, no torch).

Two conventions are reported side by side, because papers mix them (DEPLOY_NOTES §6, finding 9):

* ``fastv``: FastV Eq. 5, ``4nd^2 + 2n^2d + 2ndm`` per decoder layer. Units are MACs, it assumes MHA
  and a 2-matrix FFN, and it does not halve the causal n^2 term. Decoder layers only. Use it to compare
  with papers.
* ``exact``: architecture-exact decoder count at 2 FLOPs per MAC (LLM-Viewer style). It counts GQA
  k/v projections and the 3-matrix SwiGLU FFN, and it uses the full square attention (no causal halving).
  Norms, softmax, residual adds, RoPE and embeddings are left out.

``total_exact`` adds the vision tower (exact convention), the lm_head for one token, and, in the reduced
total only, the scoring overhead of decoder-layer steps. The projector is not counted.
Only compare ratios computed under one convention.
"""

from __future__ import annotations

from tokcompile.models.geometry import Geometry
from tokcompile.reduce.schedule import Schedule, Step, image_tokens_per_decoder_layer, vision_tokens_per_block

FASTV_FORMULA = "4nd^2+2n^2d+2ndm per layer"
EXACT_FORMULA = (
    "2nd*dq (q) + 2*2nd*dkv (k,v) + 2nd*dq (o) + 2n^2*dq (QK^T) + 2n^2*dq (PV) + 6ndm (SwiGLU) per layer; "
    "2 FLOPs/MAC, no causal halving, norms/softmax/residuals excluded"
)


def fastv_layer_flops(n: int, d: int, m: int) -> int:
    """FastV Eq. 5 for one decoder layer with ``n`` tokens: ``4nd^2 + 2n^2d + 2ndm``.

    Counts MACs (not FLOPs): the q, k, v, o projections as four d x d matrices (MHA), QK^T plus AV
    as ``2n^2d``, and a 2-matrix FFN as ``2ndm``. No causal halving.
    """
    _check_nonneg(n=n, d=d, m=m)
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def exact_layer_flops(n: int, geom: Geometry) -> int:
    """Architecture-exact FLOPs of one decoder layer with ``n`` tokens, 2 FLOPs per MAC.

    With ``dq = n_heads * head_dim`` and ``dkv = n_kv_heads * head_dim``:
    q and o projections ``2*n*d*dq`` each, k and v projections ``2*n*d*dkv`` each (GQA exact),
    attention scores QK^T ``2*n^2*dq`` and PV ``2*n^2*dq`` over the full n x n square (no causal
    halving), and the 3-matrix SwiGLU FFN ``6*n*d*m``. Norms, softmax, RoPE and residual adds are left out.
    """
    _check_nonneg(n=n)
    d, m = geom.hidden_size, geom.intermediate_size
    dq = geom.n_heads * geom.head_dim
    dkv = geom.n_kv_heads * geom.head_dim
    proj = 2 * (2 * n * d * dq) + 2 * (2 * n * d * dkv)
    attn = 2 * n * n * dq + 2 * n * n * dq
    ffn = 6 * n * d * m
    return proj + attn + ffn


def vision_layer_flops(n: int, geom: Geometry, n_mlp: int | None = None) -> int:
    """Exact FLOPs of one vision-tower block (2 FLOPs/MAC): ``8*n*dv^2`` for q, k, v, o,
    ``4*n^2*dv`` for QK^T and PV (full square), ``4*n*dv*mv`` for the 2-matrix GELU MLP (fc1, fc2).

    ``n_mlp`` is the token count of the MLP when a merge between attention and MLP shrank it (ToMe)."""
    n_mlp = n if n_mlp is None else n_mlp
    _check_nonneg(n=n, n_mlp=n_mlp)
    dv, mv = geom.vision_hidden_size, geom.vision_intermediate_size
    return 8 * n * dv * dv + 4 * n * n * dv + 4 * n_mlp * dv * mv


def default_scoring_flops(step: Step, geom: Geometry, n_tokens: int) -> int:
    """A decoder step that scores with one attention row (FastV-style): the last token's q projection
    ``2*d*dq`` and its scores against every key ``2*n*dq``; other sites: 0."""
    if step.site.in_vision_graph:
        return 0
    dq = geom.n_heads * geom.head_dim
    return 2 * geom.hidden_size * dq + 2 * n_tokens * dq


def prefill_flops(geom: Geometry, schedule: Schedule, n_text: int, reducers: tuple = ()) -> dict:
    """Prefill FLOPs of the dense model and of the model reduced by ``schedule`` (JSON-serialisable).

    Decoder layer ``l`` sees ``n_text + image_tokens_per_decoder_layer(...)[l]`` tokens when reduced and
    ``n_text + geom.n_image_tokens`` when dense. ``conventions`` holds decoder-layer sums only, so with
    nothing pruned both ratios are exactly 1.

    ``scoring_overhead`` (exact convention) is what the steps compute to decide, beyond the model itself:
    each reducer's ``scoring_flops(step, geom, n_tokens)`` when it has one (``n_tokens``: the tokens
    entering the step, text included at decoder sites), else ``default_scoring_flops`` (one FastV-style
    attention row). It is added to ``total_exact["reduced"]`` only.

    ``total_exact`` = vision tower + exact decoder + lm_head for one token (``2*d*V``), with the scoring
    overhead in the reduced side. Vision-block steps shrink the tower's blocks after them (a block whose merge
    runs between attention and MLP counts its MLP at the merged size).
    """
    _check_nonneg(n_text=n_text)
    L, d, m = geom.n_layers, geom.hidden_size, geom.intermediate_size
    n_img = geom.n_image_tokens
    img_per_layer = image_tokens_per_decoder_layer(n_img, L, schedule, geom.vision_tokens)
    dense_tokens = [n_text + n_img] * L
    reduced_tokens = [n_text + k for k in img_per_layer]

    conventions: dict[str, dict] = {}
    for name, fn, formula in (
        ("fastv", lambda n: fastv_layer_flops(n, d, m), FASTV_FORMULA),
        ("exact", lambda n: exact_layer_flops(n, geom), EXACT_FORMULA),
    ):
        dense = sum(fn(n) for n in dense_tokens)
        reduced = sum(fn(n) for n in reduced_tokens)
        conventions[name] = _ratio_entry(dense, reduced)
        conventions[name]["formula"] = formula

    overhead = 0
    for j, step in enumerate(schedule):
        n_tokens = step.n_in + (0 if step.site.in_vision_graph else n_text)
        fn = getattr(reducers[j], "scoring_flops", None) if j < len(reducers) else None
        overhead += (fn or default_scoring_flops)(step, geom, n_tokens) * (
            geom.vision_images if step.site.in_vision_tower else 1)

    vision_dense = geom.vision_images * geom.vision_layers * vision_layer_flops(geom.vision_tokens, geom)
    blocks = vision_tokens_per_block(geom.vision_tokens, geom.vision_layers, schedule)
    vision_reduced = geom.vision_images * sum(vision_layer_flops(a, geom, b) for a, b in blocks)
    vision = {"dense": vision_dense, "reduced": vision_reduced,
              "ratio": vision_reduced / vision_dense if vision_dense else 1.0,
              "tokens_per_block": [list(b) for b in blocks]}

    lm_head = 2 * d * geom.vocab_size
    total_dense = vision["dense"] + conventions["exact"]["dense"] + lm_head
    total_reduced = vision["reduced"] + conventions["exact"]["reduced"] + overhead + lm_head
    return {
        "n_text": n_text,
        "n_image_tokens": n_img,
        "tokens_per_layer": {"dense": dense_tokens, "reduced": reduced_tokens},
        "image_tokens_per_layer": list(img_per_layer),
        "conventions": conventions,
        "scoring_overhead": overhead,
        "vision": vision,
        "lm_head": lm_head,
        "total_exact": {
            "dense": total_dense,
            "reduced": total_reduced,
            "ratio": total_reduced / total_dense if total_dense else 1.0,
        },
    }


_UNITS = ((10**15, "P"), (10**12, "T"), (10**9, "G"), (10**6, "M"), (10**3, "K"), (1, ""))


def format_flops(n: int) -> str:
    """Three significant digits with an SI prefix: ``3.39 TFLOPs``, ``12.5 GFLOPs``, ``840 MFLOPs``."""
    rounded = float(f"{n:.3g}")  # round first so 999.7e9 becomes "1 TFLOPs", not "1e+03 GFLOPs"
    for scale, prefix in _UNITS:
        if abs(rounded) >= scale:
            return f"{rounded / scale:.3g} {prefix}FLOPs"
    return f"{rounded:.3g} FLOPs"


def format_table(result: dict) -> str:
    """A short human-readable table of a ``prefill_flops`` result for the CLI."""
    img = result["image_tokens_per_layer"]
    mean_img = sum(img) / len(img) if img else 0.0
    rows = [
        f"prefill FLOPs: {result['n_text']} text + {result['n_image_tokens']} image tokens "
        f"(mean {mean_img:.1f} image tokens per decoder layer when reduced)",
        f"{'convention':<22}{'dense':>16}{'reduced':>16}{'ratio':>9}",
    ]

    def row(label: str, entry: dict) -> str:
        return (f"{label:<22}{format_flops(entry['dense']):>16}{format_flops(entry['reduced']):>16}"
                f"{entry['ratio']:>9.3f}")

    labels = {"fastv": "fastv Eq.5 (MACs)", "exact": "exact decoder"}
    for name, entry in result["conventions"].items():
        rows.append(row(labels.get(name, name), entry))
    rows.append(f"{'scoring overhead':<22}{'':>16}{format_flops(result['scoring_overhead']):>16}")
    vision = result["vision"]
    rows.append(row("vision tower", {**vision, "ratio": vision.get("ratio", 1.0)}))
    rows.append(row("total exact", result["total_exact"]))
    rows.append("total exact = vision + exact decoder + lm_head (1 token) [+ scoring overhead]")
    return "\n".join(rows)


def _ratio_entry(dense: int, reduced: int) -> dict:
    ratio = reduced / dense if dense else 1.0
    return {"dense": dense, "reduced": reduced, "ratio": ratio, "reduction": 1.0 - ratio}


def _check_nonneg(**values: int) -> None:
    for name, v in values.items():
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
