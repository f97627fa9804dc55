from __future__ import annotations

import torch

from tokcompile.reduce.ops import attention_row, keep_image_tokens_index, rank_desc, topk_sorted


def test_rank_breaks_ties_by_lower_index():
    s = torch.tensor([[0.5, 0.9, 0.5, 0.9, 0.1]])
    assert rank_desc(s).tolist() == [[2, 0, 3, 1, 4]]
    assert topk_sorted(s, 3).tolist() == [[0, 1, 3]]


def test_topk_sorted_matches_stable_sort_on_random_ties():
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 5, (4, 50), generator=g).float()  # many ties
    ref = torch.sort(s, dim=-1, descending=True, stable=True).indices[:, :17].sort(-1).values
    assert torch.equal(topk_sorted(s, 17), ref)


def test_keep_index_keeps_text_and_selected_image_tokens():
    # T=8, image span [2, 6) (N=4), keep image tokens 1 and 3 -> positions 3 and 5
    idx = keep_image_tokens_index(torch.tensor([2]), torch.tensor([[1, 3]]), n_image=4, seq_len=8)
    assert idx.tolist() == [[0, 1, 3, 5, 6, 7]]


def test_attention_row_gqa_matches_repeat_kv():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 1, 8, generator=g)
    k = torch.randn(2, 2, 5, 8, generator=g)
    valid = torch.tensor([[True] * 5, [False, True, True, True, True]])
    p = attention_row(q, k, valid)
    k_rep = k.repeat_interleave(2, dim=1)  # HF repeat_kv: head h uses kv head h // 2
    logits = (q @ k_rep.transpose(-1, -2))[:, :, 0] / 8**0.5
    logits[1, :, 0] = float("-inf")
    torch.testing.assert_close(p, logits.softmax(-1))
    assert p[1, :, 0].abs().max() == 0
