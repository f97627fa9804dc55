"""The printed report of benchmarks/answer.py: one table with ratios against (b) and (a), the (c)-against-(b)
targets, where the time goes, and the check of tokens and kept image tokens against our eager reduced modules."""

from __future__ import annotations


def agree(a: list, b: list) -> int:
    """How many leading tokens two answers share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def report(size: str, manifest: dict, rows: list[dict], ref: dict | None, new_tokens: int, repeats: int,
           group_size: int, labels: dict[str, str]) -> None:
    """The table, the targets, where the time goes and the token / kept-index check, for one model size."""
    g, step = manifest["plan"]["geometry"], manifest["schedule"][0]
    by = {r["variant"]: r for r in rows}
    b, a = by.get("lightcompress"), by.get("hf_full")
    prompt = rows[0]["prompt_len"] if rows else "?"
    threads = f"torch {rows[0]['torch_threads']}, onnxruntime intra-op {rows[0]['ort_threads']}" if rows else "?"
    print(f"\n{size}: llava, {g['n_layers']} decoder layers, d={g['hidden_size']}, {g['n_image_tokens']} image tokens; "
          f"RTN w4 g{group_size}, FastV K={step['layer']} keeps {step['n_out']}; prompt {prompt} "
          f"tokens; {new_tokens} new tokens (the first from the prompt, then {new_tokens - 1} decode "
          f"steps); batch 1; median of {repeats}; threads: {threads} (intra_op_num_threads set equal)")

    def ratio(r: dict, base: dict | None, key: str, speed: bool) -> str:
        if base is None:
            return f"{'':>7}"
        return f"{(base[key] / r[key] if speed else r[key] / base[key]):>6.2f}x"

    print(f"{'variant':<30}{'answer ms':>10}{'vs (b)':>8}{'vs (a)':>8}{'TTFT ms':>9}{'vs (b)':>8}{'tok/s':>7}"
          f"{'peak MB':>9}{'vs (b)':>8}{'vs (a)':>8}{'PSS MB':>8}{'anon MB':>8}{'= ref':>7}")
    for r in rows:
        same = f"{agree(r['tokens'], ref['tokens'])}/{len(ref['tokens'])}" if ref else "?"
        print(f"{labels[r['variant']]:<30}{r['answer_s'] * 1e3:>10.1f}{ratio(r, b, 'answer_s', True):>8}"
              f"{ratio(r, a, 'answer_s', True):>8}{r['ttft_s'] * 1e3:>9.1f}{ratio(r, b, 'ttft_s', True):>8}"
              f"{r['decode_tok_s']:>7.1f}{r['peak_over_baseline_mb']:>9.0f}"
              f"{ratio(r, b, 'peak_over_baseline_mb', False):>8}{ratio(r, a, 'peak_over_baseline_mb', False):>8}"
              f"{r.get('pss_over_baseline_mb', float('nan')):>8.0f}"
              f"{r.get('anonymous_over_baseline_mb', float('nan')):>8.0f}{same:>7}")
    print("(answer = wall time of the whole answer. vs = speedup (their time / this one) for times, this / theirs "
          "for memory. peak MB: peak resident memory above the same imports, loading included; for (b) counted "
          "from its fake-quantized weights in memory, as a deployment loads them ready. PSS MB and anon MB, after "
          "the run: PSS counts a file page mapped by several sessions once, anon is private memory. = ref: "
          "leading tokens equal to our eager reduced modules on the same fake-quantized weights. prepack: "
          "onnxruntime keeps a pre-packed copy of each MatMul weight per session; off, the one mapped weight file "
          "is the only copy)")
    for name in ("onnx_int4", "onnx_int4_prepack"):
        c = by.get(name)
        if c and b:
            speed, mem = b["answer_s"] / c["answer_s"], c["peak_over_baseline_mb"] / b["peak_over_baseline_mb"]
            pss = c["pss_over_baseline_mb"] / b["pss_over_baseline_mb"]
            print(f"target, {name} against (b): whole answer {speed:.2f}x faster (goal >= 2x: "
                  f"{'met' if speed >= 2 else 'missed'}), peak memory {mem:.2f}x (goal <= 0.5x: "
                  f"{'met' if mem <= 0.5 else 'missed'}), PSS {pss:.2f}x")

    print("\nwhere the time goes (ms; prefill = TTFT - vision, the language model's prompt pass; other = answer - "
          "TTFT - decode: the loop, argmax, feeds)")
    print(f"{'variant':<30}{'vision':>9}{'prefill':>9}{'TTFT':>9}{'decode':>9}{'ms/token':>10}{'other':>8}"
          f"{'TTFT %':>8}{'decode %':>9}")
    for r in rows:
        v, t, d, o = (r[k] * 1e3 for k in ("vision_s", "ttft_s", "decode_s", "other_s"))
        print(f"{labels[r['variant']]:<30}{v:>9.1f}{t - v:>9.1f}{t:>9.1f}{d:>9.1f}{r['decode_ms_tok']:>10.2f}"
              f"{o:>8.1f}{100 * r['ttft_s'] / r['answer_s']:>7.0f}%{100 * r['decode_s'] / r['answer_s']:>8.0f}%")
    if b:
        on, off = b["ttft_rerun_s"] * 1e3, b["ttft_no_rerun_s"] * 1e3
        print(f"(b)'s layer K-1 re-run (eager attention, output_attentions): {b['rerun_s'] * 1e3:.1f} ms timed inside "
              f"the hook ({100 * b['rerun_s'] / b['ttft_s']:.0f}% of its TTFT); prompt alone, alternated: {on:.1f} ms "
              f"with the re-run, {off:.1f} ms with the previous prompt's scores reused instead ({on - off:.1f} ms)")
    if ref:
        k = len(ref["kept"] or [])
        same_kept = sum(x == y for x, y in zip(ref["kept"] or [], ref["lightcompress_kept"] or []))
        print(f"\ncheck, (b)'s hooks against our eager reduced modules on the same fake-quantized model (untimed): "
              f"kept image tokens {same_kept}/{k} equal; logits max |diff| {ref['first_logit_diff']:.2e} on the first "
              f"token, {ref['logit_diff']:.2e} over all {len(ref['tokens'])}; tokens equal for "
              f"{agree(ref['tokens'], ref['lightcompress_tokens'])}/{len(ref['tokens'])}")
        reduced = [r for r in rows if r["kept"] is not None]
        for r in reduced:
            if r["kept"] != ref["kept"]:
                print(f"  {r['variant']}: kept image tokens differ from our eager modules': "
                      f"{sorted(set(r['kept']) ^ set(ref['kept']))}")
        if all(r["kept"] == ref["kept"] for r in reduced):
            print(f"  kept image tokens of {', '.join(r['variant'] for r in reduced)}: equal to our eager modules'")
