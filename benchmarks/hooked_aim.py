"""AIM's in-decoder pruning on a Hugging Face LLaVA in eager PyTorch, by hooks, the way the official code runs it
(LaVi-Lab/AIM, `get_importance` and the decoder loop of its `modeling_qwen2.py`): by masking. The
official-style eager implementation that benchmarks/methods.py times beside the exported graphs.

- Every layer runs eager attention (the official code needs each layer's attention weights) over the full
  prompt; pruned image tokens are never removed, only masked as keys from the next layer on, and they still
  run as queries.
- After layer l - 1 of every layer l where the schedule's count drops, a forward hook on that layer's attention
  takes its probabilities P (1, H, T, T) and computes the official importance: per head, PageRank over
  softmax(log P / τ) (= softmax(logits / τ): the row constant cancels) from the uniform start over all T rows,
  `iters` steps, then the RMS over heads. The live image tokens with the highest importance stay (the count
  of the compiled schedule; ties to the lower index), the rest join the mask.
Prefill only (decode runs the stock model), batch 1, stage 2 only (a `merge_ratio` is refused).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from benchmarks.hooked_fastv import image_span
from tokcompile.reduce.schedule import Site


class HookedAIM:
    """AIM masking hooks on an HF LLaVA; `remove()` takes them off and restores the attention implementation.
    After each prefill, `kept` holds the image tokens still unmasked after each pruning step (indices within the
    image span)."""

    def __init__(self, model: Any, image_token_id: int, schedule: tuple, tau: float, iters: int):
        if any(s.site is not Site.DECODER_LAYER for s in schedule):
            raise ValueError("the official-style eager AIM covers stage 2 only (no merge_ratio)")
        lm = model.model.language_model
        self.config, self.before = lm.config, lm.config._attn_implementation
        lm.config._attn_implementation = "eager"
        self.image_token_id, self.tau, self.iters = image_token_id, tau, iters
        self.kept: list[Tensor] = []
        self._span = (0, 0)
        self._mask: Tensor | None = None  # (1, 1, T, T) additive
        self._alive: Tensor | None = None  # (T,) keys not pruned
        self._counts = {s.layer - 1: s.n_out for s in schedule}  # scored after layer l - 1: keep n_out
        self._handles = [lm.embed_tokens.register_forward_pre_hook(self._find_span)]
        self._handles += [layer.register_forward_pre_hook(self._masked, with_kwargs=True) for layer in lm.layers]
        self._handles += [lm.layers[i].self_attn.register_forward_hook(self._prune) for i in self._counts]

    def result(self) -> tuple[str, list[Tensor]]:
        """("kept", the image tokens left unmasked after each step) of the last prefill."""
        return "kept", self.kept

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self.config._attn_implementation = self.before

    def _find_span(self, module: Any, args: tuple) -> None:
        ids = args[0]
        if ids.shape[1] > 1:
            self._span = image_span(ids, self.image_token_id)
            self._alive = torch.ones(ids.shape[1], dtype=torch.bool)
            self.kept = []
            self._set_mask()

    def _set_mask(self) -> None:
        T = len(self._alive)
        allowed = torch.ones(T, T, dtype=torch.bool).tril() & self._alive[None, :]  # (T, T)
        self._mask = torch.zeros(T, T).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]

    def _masked(self, layer: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if args[0].shape[1] == 1:
            return None
        return args, {**kwargs, "attention_mask": self._mask.to(args[0].dtype)}

    @torch.no_grad()
    def _prune(self, attn: Any, args: tuple, out: tuple) -> None:
        probs = out[1]  # (1, H, T, T) softmax of the masked logits
        if probs is None or probs.shape[-2] == 1:
            return
        H, T = probs.shape[1], probs.shape[-1]
        walk = torch.softmax(torch.log(probs[0].float()) / self.tau, dim=-1).nan_to_num(0.0)  # (H, T, T)
        pi = torch.full((H, 1, T), 1.0 / T)
        for _ in range(self.iters):
            pi = pi @ walk  # (H, 1, T)
        score = pi[:, 0].pow(2).mean(0).sqrt()  # (T,)
        start, n = self._span
        span = slice(start, start + n)
        live = self._alive[span]
        score = torch.where(live, score[span], -1.0)  # (n,) only live image tokens rank
        keep = torch.zeros(n, dtype=torch.bool)
        keep[torch.sort(score, descending=True, stable=True).indices[: self._counts[attn.layer_idx]]] = True
        self._alive[span] = live & keep
        self.kept.append(torch.nonzero(self._alive[span]).flatten())
        self._set_mask()
