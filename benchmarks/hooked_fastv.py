"""FastV on a Hugging Face LLaVA in eager PyTorch, by forward hooks, the way LightCompress deploys it
(`llmc/compression/token_reduction/fastv.py`): variant (b) of benchmarks/answer.py.

At prefill (more than one query token):
- a pre-hook on `embed_tokens` finds the image span in `input_ids` (sample 0: first image token, count);
- a pre-hook on layer K-1 runs that layer once more with eager attention to get its attention probabilities,
  and keeps the last query's row averaged over heads (the real forward then runs as usual, with SDPA);
- a pre-hook on layer K keeps the round(L·(1-R)) image tokens with the highest score and every text token, in
  order, and cuts the hidden states, position ids (kept tokens keep their original positions), RoPE cos/sin and
  attention mask; the layers after K get the same cut inputs.
Decode runs the stock HF model, hooks idle: position ids continue from layer 0's cache length (the full prompt),
and layers >= K attend over their shorter cache (HF's attention takes any key length). This is how
LightCompress decodes too: its hooks return early when the query is one token long.

Where this differs from LightCompress's code, on purpose:
- the re-run of layer K-1 gets no KV cache; LightCompress passes the real one, so layer K-1's keys and values
  are appended twice and decode attends to the prompt twice in that layer (FastV issue #46);
- layers after K receive the cut inputs through their own pre-hooks instead of an in-place `resize_` of the
  kwargs tensors that every layer shares;
- transformers 5 decoder layers no longer return attention weights, so the re-run reads them from the
  attention module's output;
- the image span starts at the first image token found rather than at a start index fixed per model.
As in LightCompress: batch 1 (sample 0's scores and span), torch's topk for ties.
"""

from __future__ import annotations

import time
from typing import Any


def image_span(ids: Any, image_token_id: int) -> tuple[int, int]:
    """(first image token, image token count) of sample 0 of `input_ids` (B, T), as the hooked methods find it."""
    import torch

    where = torch.nonzero(ids[0] == image_token_id).flatten()
    return int(where[0]), int(where.numel())


class HookedFastV:
    """FastV hooks on an HF LLaVA (`LlavaForConditionalGeneration`); `remove()` takes them off.

    After each prefill, `kept` holds the kept image tokens' indices within the image span (ascending) and
    `rerun_times` has one more entry: the wall time of the layer K-1 re-run. With `rerun = False` a prefill
    reuses the previous prefill's scores instead of re-running layer K-1 (to time prefill without it).
    """

    def __init__(self, model: Any, image_token_id: int, pruning_loc: int, rate: float):
        lm = model.model.language_model
        self.layers = lm.layers
        self.image_token_id, self.k, self.rate = image_token_id, pruning_loc, rate
        self.rerun = True
        self.rerun_times: list[float] = []
        self.kept: Any = None
        self._span = (0, 0)
        self._scores: Any = None
        self._cut: dict[str, Any] = {}
        self._handles = [lm.embed_tokens.register_forward_pre_hook(self._find_span)]
        hooks = [(pruning_loc - 1, self._score), (pruning_loc, self._prune)]
        hooks += [(i, self._follow) for i in range(pruning_loc + 1, len(self.layers))]
        for i, hook in hooks:
            self._handles.append(self.layers[i].register_forward_pre_hook(hook, with_kwargs=True))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def _find_span(self, module: Any, args: tuple) -> None:
        if args[0].shape[1] > 1:
            self._span = image_span(args[0], self.image_token_id)

    def _score(self, layer: Any, args: tuple, kwargs: dict) -> None:
        hidden = args[0]
        if hidden.shape[1] == 1:
            return
        if self.rerun or self._scores is None:
            t = time.perf_counter()
            self._scores = self._last_row(layer, hidden, kwargs)
            self.rerun_times.append(time.perf_counter() - t)

    def _last_row(self, layer: Any, hidden: Any, kwargs: dict) -> Any:
        """Layer K-1 once more with eager attention: the last query's attention over every key, mean of heads."""
        import torch

        attn, seen = layer.self_attn, {}
        hook = attn.register_forward_hook(lambda m, a, out: seen.__setitem__("weights", out[1]))
        config = attn.config
        before = config._attn_implementation
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dtype == torch.bool:  # SDPA's boolean mask -> eager's additive one
            mask = torch.zeros(mask.shape, dtype=hidden.dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(hidden.dtype).min)
        config._attn_implementation = "eager"
        try:  # the class's forward: this layer's own hooks stay out of the re-run
            type(layer).forward(layer, hidden, **{**kwargs, "attention_mask": mask, "past_key_values": None,
                                                  "use_cache": False})
        finally:
            config._attn_implementation = before
            hook.remove()
        return seen["weights"].mean(1)[0, -1]  # (S,)

    def _prune(self, layer: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        import torch

        hidden = args[0]
        if hidden.shape[1] == 1:
            return None
        start, n = self._span
        top = self._scores[start:start + n].topk(round(n * (1 - self.rate))).indices
        self.kept = top.sort().values
        dev = hidden.device
        keep = torch.cat((torch.arange(start, device=dev), self.kept + start,
                          torch.arange(start + n, hidden.shape[1], device=dev)))  # (T',)
        cos, sin = kwargs["position_embeddings"]
        dim = 1 if cos.dim() == 3 else 2
        cut: dict[str, Any] = {"position_ids": keep[None],
                               "position_embeddings": (cos.index_select(dim, keep), sin.index_select(dim, keep))}
        if kwargs.get("attention_mask") is not None:  # a causal mask without padding: its top-left corner
            cut["attention_mask"] = kwargs["attention_mask"][..., :keep.numel(), :keep.numel()]
        if "cache_position" in kwargs:
            cut["cache_position"] = keep
        self._cut = cut
        return (hidden[:, keep], *args[1:]), {**kwargs, **cut}

    def _follow(self, layer: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if args[0].shape[1] == 1:
            return None
        return args, {**kwargs, **self._cut}
