"""Generation over a prefill graph and a decode graph, whatever runs them.

A backend is two callables that take a dict of named inputs and return a tuple of outputs in the graph's
order (see `ReducedVLM.output_names` and `DecodeStep.input_names`/`output_names`). The same loop serves the
eager modules, onnxruntime, AOTInductor and the exported programs, so their parity is token for token.

Positions follow policy P1: the t-th generated token (0-based) sits at (prefill's `next_position` + t) in
every layer, even though layers after a pruning step cache fewer entries. For 1-D RoPE `next_position` is
the real prompt length; for M-RoPE it is one past the largest position of the prompt, as in HF.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

Graph = Callable[[dict[str, Any]], tuple]


@dataclass(frozen=True)
class GenerationConfig:
    """Args:
    max_new_tokens: tokens to generate per sample.
    eos_token_id: a sample stops at this token (None: never stops early).
    temperature: 0 means greedy (the default); above 0 samples from softmax(logits / temperature).
    top_p: nucleus sampling mass (1.0 keeps every token).
    seed: seeds the sampler.
    """

    max_new_tokens: int = 32
    eos_token_id: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class Generated:
    tokens: Tensor  # (B, n) generated ids; after a sample's EOS, eos_token_id repeats
    lengths: list[int]  # per sample, tokens up to and including EOS
    step_logits: list[Tensor] = field(default_factory=list)  # (B, V) per step
    kept: list[Tensor] = field(default_factory=list)  # prefill's kept indices per step

    def sequences(self) -> list[list[int]]:
        return [self.tokens[b, : n].tolist() for b, n in enumerate(self.lengths)]


def choose(logits: Tensor, cfg: GenerationConfig, gen: torch.Generator | None) -> Tensor:
    """Next token per sample: (B, V) -> (B,)."""
    if cfg.temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)  # (B, V)
    if cfg.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < cfg.top_p  # always keeps the first
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=gen)[:, 0]


def generate(
    prefill: Graph,
    decode: Graph,
    batch: dict[str, Tensor],
    *,
    n_steps: int,
    n_groups: int,
    cfg: GenerationConfig,
    keep_logits: bool = False,
) -> Generated:
    """Run prefill once, then decode one token at a time.

    Args:
        prefill: the processor's outputs by name (each runner takes the inputs it was compiled with) ->
            (logits, kept_0.., cache_mask_g.., next_position, kv..).
        decode: inputs (input_ids, position_ids, attention_mask_g.., past kv..) -> (logits, kv..).
        batch: the processor's output.
        n_steps: reduction steps in the prefill graph (number of kept outputs).
        n_groups: cache groups (number of cache masks).
    """
    gen = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    out = prefill(dict(batch))
    logits = out[0]
    kept = list(out[1 : 1 + n_steps])
    first = 1 + n_steps + n_groups
    masks = [torch.as_tensor(m).long() for m in out[1 + n_steps : first]]
    next_position = torch.as_tensor(out[first]).long()  # (B, 1)
    past = list(out[first + 1 :])
    B = logits.shape[0]
    tokens: list[Tensor] = []
    step_logits: list[Tensor] = []
    done = torch.zeros(B, dtype=torch.bool)
    lengths = [cfg.max_new_tokens] * B
    for t in range(cfg.max_new_tokens):
        logits = torch.as_tensor(logits)
        if keep_logits:
            step_logits.append(logits.float().clone())
        tok = choose(logits, cfg, gen)  # (B,)
        if cfg.eos_token_id is not None:
            tok = torch.where(done, torch.full_like(tok, cfg.eos_token_id), tok)
            for b in range(B):
                if not done[b] and int(tok[b]) == cfg.eos_token_id:
                    lengths[b] = t + 1
            done |= tok == cfg.eos_token_id
        tokens.append(tok)
        if t + 1 == cfg.max_new_tokens or bool(done.all()):
            break
        ones = torch.ones(B, 1, dtype=torch.long)
        masks = [torch.cat([m, ones], dim=1) for m in masks]  # (B, P_g + 1): cache plus the new token
        feed = {"input_ids": tok[:, None].long(), "position_ids": next_position + t}
        feed.update({f"attention_mask_{g}": m for g, m in enumerate(masks)})
        feed.update({f"past_{kind}_{i // 2}": p for i, (kind, p) in enumerate(zip(_kinds(len(past)), past))})
        out = decode(feed)
        logits, past = out[0], list(out[1:])
    return Generated(torch.stack(tokens, dim=1), lengths, step_logits, kept)


def _kinds(n: int) -> list[str]:
    return ["key", "value"] * (n // 2)


@torch.no_grad()
def no_cache_logits(reduced: Any, batch: dict[str, Tensor], result: Generated) -> list[Tensor]:
    """Reference logits for each generated step: the whole reduced prefill re-run on the prompt plus the
    tokens generated so far, with the prefill's kept tokens replayed (FastV with a cache keeps its first
    selection). Step t's logits must match the cached decode's."""
    inner = getattr(reduced, "reduced", reduced)
    out = []
    for t in range(result.tokens.shape[1]):
        feed = inner.adapter.extend_text(batch, result.tokens[:, :t], inner.geometry)
        logits = reduced(*[feed[n] for n in inner.input_names], forced_kept=tuple(result.kept))[0]
        out.append(logits.float())
    return out
