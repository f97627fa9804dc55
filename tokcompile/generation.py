"""Generation over a vision graph, a prefill graph and a decode graph, whatever runs them.

A backend is three callables that take a dict of named inputs and return a dict of named outputs (names from
the plan's `GraphLayout`). The same loop serves the eager modules, onnxruntime, AOTInductor and the exported
programs, so their parity is token for token.

Positions: the t-th generated token (0-based) sits at (prefill's `next_position` + t) in every layer, even
though layers after a pruning step cache fewer entries (and under P2 the prefill renumbered its survivors),
exactly as HF `generate` continues. For 1-D RoPE `next_position` is the real prompt length; for M-RoPE it is
one past the largest position of the prompt, as in HF.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tokcompile.devices import module_device, to_device
from tokcompile.errors import RecipeError
from tokcompile.graphs import decode_feed
from tokcompile.layout import GraphLayout

Graph = Callable[[dict[str, Any]], dict[str, Any]]


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

    def __post_init__(self) -> None:
        """Sampling settings a user typed: refuse what would be silently greedy, NaN or empty."""
        t, p = self.temperature, self.top_p
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise RecipeError("--temperature", f"got {t}; use 0 for greedy decoding or a finite number above 0")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0 < p <= 1):
            raise RecipeError("--top-p", f"got {p}; use a number above 0 and at most 1 (1 keeps every token)")
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise RecipeError("--max-new-tokens", f"got {n}; use an integer of at least 1")


@dataclass
class Generated:
    tokens: Tensor  # (B, n) generated ids; after a sample's EOS, eos_token_id repeats
    lengths: list[int]  # per sample, tokens up to and including EOS
    step_logits: list[Tensor] = field(default_factory=list)  # (B, V) per step
    kept: dict[str, Tensor] = field(default_factory=dict)  # every step's parity output, by layout name
    scores: dict[str, Tensor] = field(default_factory=dict)  # every scored step's decision scores (`score_j_c`)

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


def run_prompt(vision: Graph, prefill: Graph, layout: GraphLayout, batch: dict[str, Any]) -> dict[str, Any]:
    """The vision graph on the media inputs, then the prefill graph on the text inputs and image embeddings:
    every output of both, by name."""
    seen = vision({n: batch[n] for n in layout.vision.inputs})
    feed = {n: batch[n] for n in layout.prefill.inputs if n not in layout.image_outputs}
    feed.update({n: seen[n] for n in layout.image_outputs})
    return {**seen, **prefill(feed)}


def generate(
    vision: Graph,
    prefill: Graph,
    decode: Graph,
    batch: dict[str, Tensor],
    *,
    layout: GraphLayout,
    cfg: GenerationConfig,
    keep_logits: bool = False,
) -> Generated:
    """Run vision and prefill once, then decode one token at a time.

    Args:
        vision, prefill, decode: the three graphs (named inputs -> named outputs).
        batch: the processor's output.
        layout: the graphs' names.
    """
    out = run_prompt(vision, prefill, layout, batch)
    kept = {n: torch.as_tensor(out[n]).cpu() for n in layout.step_outputs}
    scores = {n: torch.as_tensor(out[n]).cpu() for n in layout.score_outputs}
    logits = torch.as_tensor(out["logits"])
    dev = logits.device  # the loop runs where the graphs return their outputs (tokcompile.devices)
    gen = torch.Generator(device=dev).manual_seed(cfg.seed) if cfg.seed is not None else None
    past = {f"past_{n[len('present_'):]}": out[n] for n in layout.present}
    B = logits.shape[0]
    tokens: list[Tensor] = []
    step_logits: list[Tensor] = []
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    lengths = [cfg.max_new_tokens] * B
    for t in range(cfg.max_new_tokens):
        logits = torch.as_tensor(logits)
        if keep_logits:
            step_logits.append(logits.float().cpu().clone())  # (B, V) on the host
        tok = choose(logits, cfg, gen)  # (B,)
        if cfg.eos_token_id is not None:
            tok = torch.where(done, torch.full_like(tok, cfg.eos_token_id), tok)
            for b in range(B):
                if not done[b] and int(tok[b]) == cfg.eos_token_id:
                    lengths[b] = t + 1
            done |= tok == cfg.eos_token_id
        tokens.append(tok)
        if t + 1 == cfg.max_new_tokens or (cfg.eos_token_id is not None and bool(done.all())):  # no needless sync
            break
        step = decode({**decode_feed(layout, out, tok, t), **past})
        logits = step["logits"]
        past = {f"past_{n[len('present_'):]}": step[n] for n in layout.present}
    return Generated(torch.stack(tokens, dim=1).cpu(), lengths, step_logits, kept, scores)


@torch.no_grad()
def no_cache_logits(reduced: Any, batch: dict[str, Tensor], result: Generated) -> list[Tensor]:
    """Reference logits for each generated step: the whole reduced model (`ReducedVLM`) re-run on the prompt
    plus the tokens generated so far, with the prefill's selections replayed (a method with a cache keeps its
    first selection). Step t's logits must match the cached decode's."""
    device = module_device(reduced)
    batch, tokens, forced = to_device((batch, result.tokens, dict(result.kept)), device)
    out = []
    for t in range(tokens.shape[1]):
        feed = reduced.adapter.extend_text(batch, tokens[:, :t], reduced.geometry)
        out.append(reduced.run(feed, forced=forced, n_appended=t)["logits"].float().cpu())  # (B, V) on the host
    return out


def teacher_forced_logits(
    vision: Graph,
    prefill: Graph,
    decode: Graph,
    batch: dict[str, Tensor],
    *,
    layout: GraphLayout,
    continuation: Tensor,
) -> Tensor:
    """The next-token logits along given answer tokens: prefill the prompt, then feed the continuation to decode
    one token at a time, as if generation had chosen it.

    Args:
        continuation: (B, n) the answer tokens after each prompt (pad short rows with any token; the positions
            after a row's end are computed but mean nothing).
    Returns:
        (B, n, V) fp32: position t predicts continuation[:, t] from the prompt and the tokens before it.
    """
    out = run_prompt(vision, prefill, layout, batch)
    past = {f"past_{n[len('present_'):]}": out[n] for n in layout.present}
    step_logits = [torch.as_tensor(out["logits"]).float().cpu()]  # each (B, V) on the host: predicts continuation[:, t]
    for t in range(continuation.shape[1] - 1):
        step = decode({**decode_feed(layout, out, continuation[:, t], t), **past})
        step_logits.append(torch.as_tensor(step["logits"]).float().cpu())
        past = {f"past_{n[len('present_'):]}": step[n] for n in layout.present}
    return torch.stack(step_logits, dim=1)  # (B, n, V)


def continuation_logprobs(
    vision: Graph,
    prefill: Graph,
    decode: Graph,
    batch: dict[str, Tensor],
    *,
    layout: GraphLayout,
    continuation: Tensor,
) -> tuple[Tensor, Tensor]:
    """Teacher-forced scoring of given answer tokens (`teacher_forced_logits`).

    Args:
        continuation: (B, n) the answer tokens to score after each prompt (pad short rows with any token; the
            positions after a row's end are scored but mean nothing).
    Returns:
        logprobs: (B, n) fp32 log-probability of each continuation token given the prompt and the tokens before it.
        greedy: (B, n) whether each token is the argmax there (what greedy decoding would have written).
    """
    logits = teacher_forced_logits(vision, prefill, decode, batch, layout=layout, continuation=continuation)
    target = continuation.long()[..., None]  # (B, n, 1)
    logprobs = logits.log_softmax(-1).gather(-1, target)[..., 0]  # (B, n)
    greedy = logits.argmax(-1) == continuation  # (B, n)
    return logprobs, greedy
