"""The graphs' modules, with the static schedule baked in: `VisionEncoder`, `Prefill`, `DecodeStep`, and
`ReducedVLM`, their eager composition.

The HF model is used as a set of leaf modules (embedding, vision blocks, projector, decoder layers, final
norm, lm_head); nothing in it is patched or mutated. Family differences come from a `VLMAdapter`; reducers
see only the tokens at their site and a context (`tokcompile.reduce.context`), never the model class. Each
module returns a tuple in the order of its `GraphLayout` entry (what exporters need); `run()` returns a dict.

Shape legend: see `tokcompile/reduce/schedule.py`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from tokcompile.layout import GraphLayout, NamedOutputs, build_layout, score_names, side_names
from tokcompile.models.base import VLMAdapter, causal_mask, splice_image_features, with_key_bias
from tokcompile.models.geometry import Geometry
from tokcompile.question import QUESTION_INPUTS, QuestionTokens
from tokcompile.reduce.context import DecoderContext, ImageContext, VisionContext
from tokcompile.reduce.ops import gather_tokens, keep_image_tokens_index
from tokcompile.reduce.prune import contiguous_positions
from tokcompile.reduce.schedule import Schedule, Site, Step
from tokcompile.reduce.state import ImageTokens, TokenState

# step output name -> a selection to replay (eager no-cache references); `score_j_c` -> decision scores to rank on
Forced = dict[str, Tensor]


class KVCache:
    """A minimal stand-in for an HF `Cache`, holding plain tensors so that graphs can take and return it.

    HF attention modules call `past_key_values.update(k, v, layer_idx)` with keys after RoPE. With no past
    (prefill) `update` returns its inputs; with a past (decode) it returns the concatenation. Either way it
    records the layer's present keys and values, which reducers use to score tokens without re-running
    attention, and which are the KV cache the graphs return.
    """

    def __init__(self, past: dict[int, tuple[Tensor, Tensor]] | None = None) -> None:
        self.past = past or {}
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        if layer_idx in self.past:
            pk, pv = self.past[layer_idx]
            key_states = torch.cat([pk, key_states], dim=2)  # (B, Hkv, P+1, d)
            value_states = torch.cat([pv, value_states], dim=2)
        self.keys[layer_idx] = key_states  # (B, Hkv, T, d)
        self.values[layer_idx] = value_states  # (B, Hkv, T, d)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


class LayerOps:
    """`reduce.context.LayerOps` for one model: decoder-layer projections through the family adapter."""

    def __init__(self, adapter: VLMAdapter, model: nn.Module):
        self.adapter, self.model = adapter, model

    def query(self, layer: int, hidden: Tensor, positions: Tensor, rope: bool = True) -> Tensor:
        mod = self.adapter.decoder_layers(self.model)[layer]
        return self.adapter.layer_query(self.model, mod, hidden, positions, rope)

    def keys(self, layer: int, hidden: Tensor, positions: Tensor, rope: bool = True) -> Tensor:
        mod = self.adapter.decoder_layers(self.model)[layer]
        return self.adapter.layer_keys(self.model, mod, hidden, positions, rope)

    def final_norm(self, hidden: Tensor) -> Tensor:
        return self.adapter.final_norm(self.model)(hidden)


def _decider(name: str, step: Step, outputs: dict[str, Tensor], forced: Forced) -> Any:
    """`ctx.decide` for a scored step (`Step.scored`), else None: records each score vector the step ranks on
    under its `score_j_c` name, in call order, and returns the scores to rank on (what `forced` holds under that
    name, in a replay)."""
    if not step.scored:
        return None
    keys = iter(score_names(name, step.scored))

    def decide(scores: Tensor) -> Tensor:  # (B, n) fp32
        key = next(keys, None)
        if key is None:
            raise ValueError(f"the {step.method} step called ctx.decision more than the {step.scored} times its "
                             "Step.scored declares")
        outputs[key] = scores
        replay = forced.get(key)
        if replay is None:
            return scores
        replay = torch.as_tensor(replay).to(scores.device, torch.float32)
        if replay.shape != scores.shape:  # Python ints
            raise ValueError(f"{key}: a replay gave scores {tuple(replay.shape)}, the step has {tuple(scores.shape)}")
        return replay

    return decide


def _decided(name: str, step: Step, outputs: dict[str, Tensor], replayed: Tensor | None) -> None:
    """A scored step's reducer must have called `ctx.decision` as often as it declared (unless it replayed a
    selection)."""
    missing = [k for k in score_names(name, step.scored or 0) if k not in outputs]
    if missing and replayed is None:
        raise ValueError(f"the {step.method} step declares {step.scored} decision vectors (Step.scored) but its "
                         f"reducer called ctx.decision {step.scored - len(missing)} times")


def _by_site(schedule: Schedule, reducers: tuple, names: tuple[str, ...], site: Site) -> dict[int, list]:
    out: dict[int, list] = {}
    for name, step, red in zip(names, schedule, reducers):
        if step.site is site:
            out.setdefault(step.layer, []).append((name, step, red))
    return out


class VisionSteps:
    """The schedule's vision-tower steps, called by the adapter's tower loop when it reaches their site.

    Each call returns new tokens and records the step's parity output under its layout name.
    """

    def __init__(self, schedule: Schedule, reducers: tuple, names: tuple[str, ...], forced: Forced | None = None,
                 question: QuestionTokens | None = None, modules: Any = None):
        self.blocks = _by_site(schedule, reducers, names, Site.VISION_BLOCK)
        self.out = _by_site(schedule, reducers, names, Site.VISION_OUT).get(0, [])
        self.forced = forced or {}
        self.outputs: dict[str, Tensor] = {}
        self.question, self.modules = question, modules if modules is not None else {}

    @property
    def touches_tower(self) -> bool:
        return bool(self.blocks or self.out)

    def context(self, ctx: Any, name: str, step: Step) -> Any:
        """The site's context with what this step's reducer brings: the question, its own weights."""
        module = self.modules[name] if name in self.modules else None
        return replace(ctx, question=self.question if step.question else None, module=module,
                       decide=_decider(name, step, self.outputs, self.forced))

    def apply(self, name: str, step: Step, red: Any, tokens: ImageTokens, ctx: Any) -> ImageTokens:
        """One step at its site: its new tokens; its parity output (and decision scores) recorded."""
        tokens, idx = red.apply(tokens, self.context(ctx, name, step), step, self.forced.get(name))
        _decided(name, step, self.outputs, self.forced.get(name))
        self.outputs[name] = idx
        return tokens

    def _run(self, steps: list, tokens: ImageTokens, ctx: Any) -> ImageTokens:
        for name, step, red in steps:
            tokens = self.apply(name, step, red, tokens, ctx)
        return tokens

    def has_block(self, layer: int) -> bool:
        return layer in self.blocks

    def vision_block(self, layer: int, tokens: ImageTokens, ctx: VisionContext) -> ImageTokens:
        return self._run(self.blocks.get(layer, []), tokens, ctx)

    def vision_out(self, tokens: ImageTokens, ctx: VisionContext) -> ImageTokens:
        return self._run(self.out, tokens, ctx)


class VisionEncoder(nn.Module):
    """The vision graph: the processor's media inputs -> image_embeds (B, N', D), image_source (B, N') and the
    parity output of every vision-graph step, in `layout.vision.outputs` order."""

    def __init__(self, model: nn.Module, adapter: VLMAdapter, geometry: Geometry, schedule: Schedule,
                 reducers: tuple, layout: GraphLayout):
        super().__init__()
        self.model, self.adapter, self.geometry, self.layout = model, adapter, geometry, layout
        picked = [(s, r, n) for s, r, n in zip(schedule, reducers, layout.step_outputs) if s.site.in_vision_graph]
        self.schedule = tuple(s for s, _, _ in picked)
        self.reducers = tuple(r for _, r, _ in picked)
        self.names = tuple(n for _, _, n in picked)
        self.projector_steps = [(n, s, r) for s, r, n in picked if s.site is Site.PROJECTOR_OUT]
        # weights the reducers bring (e.g. CLIP's text tower): submodules, so every export carries them
        loaded = {n: r.load_module() for _, r, n in picked if callable(getattr(r, "load_module", None))}
        self.step_modules = nn.ModuleDict({n: m for n, m in loaded.items() if m is not None})

    @property
    def input_names(self) -> list[str]:
        return list(self.layout.vision.inputs)

    @property
    def output_names(self) -> list[str]:
        return list(self.layout.vision.outputs)

    def run(self, inputs: dict[str, Tensor], forced: Forced | None = None) -> dict[str, Tensor]:
        question = None
        if QUESTION_INPUTS[0] in inputs:
            question = QuestionTokens(*(inputs[n].long() for n in QUESTION_INPUTS))  # (B, S, L) each
        steps = VisionSteps(self.schedule, self.reducers, self.names, forced, question, self.step_modules)
        media = {n: v for n, v in inputs.items() if n not in QUESTION_INPUTS}
        tokens = self.adapter.encode_image_tokens(self.model, media, self.geometry, steps)  # (B, N, D)
        for i, (name, step, red) in enumerate(self.projector_steps):
            tower = tokens.tower if step is self.schedule[0] else None  # only the first step sees the tower
            features = tokens.features if i == 0 else None  # and the projector's input
            ctx = ImageContext(step.layer, self.geometry.frames, *(tower or (None, None)), features=features)
            tokens = steps.apply(name, step, red, tokens, ctx)
        out = steps.outputs
        if len(tokens.side) != self.geometry.side_streams:
            raise ValueError(f"the adapter gave {len(tokens.side)} side streams, the geometry says "
                             f"{self.geometry.side_streams}")
        sides = dict(zip(side_names(len(tokens.side)), tokens.side))  # (B, N', D) each
        return {"image_embeds": tokens.hidden, "image_source": tokens.source.long(), **sides, **out}

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        out = self.run(dict(zip(self.input_names, inputs)))
        return tuple(out[n] for n in self.output_names)


def _add_side_stream(state: TokenState, layer: int) -> TokenState:
    """Decoder layer `layer`'s output with side stream `layer` added (Qwen3-VL's DeepStack: at the image positions,
    zero elsewhere); after the last stream the state carries none."""
    if layer >= len(state.side):
        return state
    stream = state.side[layer]
    if stream.shape != state.hidden.shape:  # Python ints: a step changed the tokens without carrying the streams
        raise ValueError(f"side stream {layer} is {tuple(stream.shape)} but the tokens are {tuple(state.hidden.shape)}")
    side = state.side if layer + 1 < len(state.side) else ()
    return replace(state, hidden=state.hidden + stream, side=side)


class Prefill(nn.Module):
    """The prefill graph: the prompt's text inputs and the vision graph's outputs -> logits (B, V), the parity
    output of every decoder step and, `with_cache`, the KV cache shaped by the schedule, one validity mask per
    cache group and the position of the first generated token (`layout.prefill.outputs` order).

    Before the decoder the image span holds N' image tokens (P0): 1-D RoPE positions are contiguous over the
    shorter prompt; multi-row RoPE (M-RoPE) keeps each kept token's original ids. Decoder steps follow their own
    policy (P1 or P2). Decode continues at `next_position` + t in every layer, as HF `generate` does.
    """

    def __init__(self, model: nn.Module, adapter: VLMAdapter, geometry: Geometry, schedule: Schedule,
                 reducers: tuple, image_token_id: int, layout: GraphLayout, with_cache: bool = True):
        super().__init__()
        self.model, self.adapter, self.geometry, self.layout = model, adapter, geometry, layout
        self.image_token_id = image_token_id
        self.with_cache = with_cache
        self.ops = LayerOps(adapter, model)
        names = layout.step_outputs
        self.before = _by_site(schedule, reducers, names, Site.DECODER_LAYER)
        self.mid = _by_site(schedule, reducers, names, Site.DECODER_MID)
        self.step_names = tuple(x for n, s in zip(names, schedule) if not s.site.in_vision_graph
                                for x in (n, *score_names(n, s.scored or 0)))
        self.group_starts = {s for s, _ in layout.groups}

    @property
    def input_names(self) -> list[str]:
        return list(self.layout.prefill.inputs)

    @property
    def output_names(self) -> list[str]:
        if self.with_cache:
            return list(self.layout.prefill.outputs)
        return ["logits", *self.step_names]

    def initial_state(self, inputs: dict[str, Tensor], n_appended: int = 0) -> TokenState:
        """The prompt (N image placeholders) and the N' image embeddings -> the sequence entering layer 0.
        `n_appended`: trailing generated tokens (no-cache references only; see `TokenState`)."""
        a, g = self.adapter, self.geometry
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        feats, source = inputs["image_embeds"], inputs["image_source"]  # (B, N', D), (B, N')
        N, n_kept = g.n_image_tokens, feats.shape[1]
        B, T = input_ids.shape
        is_image = input_ids == self.image_token_id  # (B, T)
        image_start = is_image.int().argmax(dim=1)  # (B,) first placeholder
        full_positions = a.initial_positions(inputs, image_start, g)  # (B, T) or (B, T, R): the full prompt
        used = source >= 0  # (B, N'): -1 marks a slot a vision-graph step left unused
        src = keep_image_tokens_index(image_start, source.long().clamp(min=0), N, T)  # (B, T - N + N')
        text = a.embed_tokens(self.model)(input_ids)  # (B, T, D)
        hidden = splice_image_features(gather_tokens(text, src), feats, image_start)  # (B, T', D)
        valid = gather_tokens(attention_mask.bool(), src)  # (B, T')
        span = image_start[:, None] + torch.arange(n_kept, device=input_ids.device)[None]  # (B, N')
        valid = valid.scatter(1, span, gather_tokens(valid, span) & used)  # unused slots are never attended
        if g.rope == "1d" and n_kept != N:
            positions = contiguous_positions(valid)  # P0: a shorter prompt
        else:
            positions = gather_tokens(full_positions, src)  # original ids (the identity when nothing was cut)
        T2 = hidden.shape[1]
        last = (valid.long() * torch.arange(T2, device=input_ids.device)[None]).amax(1)  # (B,)
        zeros = torch.zeros_like(hidden)
        side = tuple(splice_image_features(zeros, inputs[n], image_start)  # (B, T', D): the image span only
                     for n in side_names(g.side_streams))
        return TokenState(hidden, positions, valid, image_start, n_kept, last, n_appended=n_appended, side=side)

    def steps_before(self, layer: int, state: TokenState, prev: tuple[TokenState, Tensor] | None,
                     outputs: dict[str, Tensor], forced: Forced | None = None,
                     embedded: TokenState | None = None) -> TokenState:
        """Run the DECODER_LAYER steps at `layer`. `prev` is (the tokens that entered layer-1, its keys);
        `embedded` the sequence that entered layer 0."""
        forced = forced or {}
        for name, step, red in self.before.get(layer, ()):
            ctx = DecoderContext(layer, self.ops, state, prev[0] if prev else None, prev[1] if prev else None,
                                 embedded=embedded, decide=_decider(name, step, outputs, forced))
            state, idx = red.apply(state, ctx, step, forced.get(name))
            _decided(name, step, outputs, forced.get(name))
            outputs[name] = idx
        return state

    def layer_forward(self, layer: int, state: TokenState, cache: KVCache, prev: tuple[TokenState, Tensor] | None,
                      outputs: dict[str, Tensor], forced: Forced | None = None,
                      embedded: TokenState | None = None) -> TokenState:
        """Decoder layer `layer` on `state` (its keys recorded in `cache`), with any DECODER_MID step inside."""
        a = self.adapter
        mod = a.decoder_layers(self.model)[layer]
        mask = causal_mask(state.valid)  # (B, 1, T, T) bool
        if state.sizes is not None:  # proportional attention: log(size) on every key's logit
            mask = with_key_bias(mask, state.sizes.log(), state.hidden.dtype)
        rope = a.rotary(self.model, state.hidden, state.positions)
        if layer not in self.mid:
            out = replace(state, hidden=a.run_decoder_layer(mod, state.hidden, mask, rope, state.positions, cache))
            return _add_side_stream(out, layer)
        h = a.run_decoder_attention(mod, state.hidden, mask, rope, cache)  # (B, T, D) after the residual
        entering, state = state, replace(state, hidden=h)
        forced = forced or {}
        for name, step, red in self.mid[layer]:
            ctx = DecoderContext(layer, self.ops, state, prev[0] if prev else None, prev[1] if prev else None,
                                 keys_here=cache.keys[layer], state_in=entering, embedded=embedded,
                                 decide=_decider(name, step, outputs, forced))
            state, idx = red.apply(state, ctx, step, forced.get(name))
            _decided(name, step, outputs, forced.get(name))
            outputs[name] = idx
        return _add_side_stream(replace(state, hidden=a.run_decoder_mlp(mod, state.hidden)), layer)

    def run(self, inputs: dict[str, Tensor], forced: Forced | None = None, n_appended: int = 0) -> dict[str, Tensor]:
        a, model = self.adapter, self.model
        state = embedded = self.initial_state(inputs, n_appended)
        # Decode continues after the largest position of each sample (M-RoPE: over all rows), as HF does.
        B, T = state.valid.shape
        flat = state.positions.reshape(B, T, -1).amax(-1)  # (B, T)
        next_position = (flat.masked_fill(~state.valid, -1).amax(1, keepdim=True) + 1).long()  # (B, 1)
        cache = KVCache()
        outputs: dict[str, Tensor] = {}
        masks: list[Tensor] = []
        biases: list[Tensor] = []
        prev: tuple[TokenState, Tensor] | None = None
        biased_starts = {self.layout.groups[g][0] for g in self.layout.biased_groups}
        for i in range(self.geometry.n_layers):
            state = self.steps_before(i, state, prev, outputs, forced, embedded)
            if i in self.group_starts:
                masks.append(state.valid)  # this group caches the sequence entering its first layer
            if i in biased_starts:
                sizes = state.sizes if state.sizes is not None else torch.ones_like(state.valid, dtype=torch.float)
                biases.append(sizes.float().log())  # (B, T_g): the key bias decode keeps applying
            entering = state
            state = self.layer_forward(i, state, cache, prev, outputs, forced, embedded)
            prev = (entering, cache.keys[i])
        h = a.final_norm(model)(state.hidden)  # (B, T', D)
        h_last = gather_tokens(h, state.last[:, None])[:, 0]  # (B, D)
        out = {"logits": a.lm_head(model)(h_last), **outputs}  # (B, V)
        if self.with_cache:
            out.update({f"cache_mask_{g}": m.long() for g, m in enumerate(masks)})
            out.update({f"cache_bias_{g}": b for g, b in zip(self.layout.biased_groups, biases)})
            out["next_position"] = next_position
            for i in range(self.geometry.n_layers):
                out[f"present_key_{i}"], out[f"present_value_{i}"] = cache.keys[i], cache.values[i]
        return out

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        out = self.run(dict(zip(self.input_names, inputs)))
        return tuple(out[n] for n in self.output_names)


class ReducedVLM(nn.Module):
    """Eager vision graph then prefill graph: the processor's outputs (`input_names` order) -> the logits,
    every step's parity output and, `with_cache`, the prefill's cache outputs (`run()`: a dict).

    Args:
        model: the HF model (weights may already be fake-quantized).
        adapter: the family adapter.
        geometry: resolved geometry at the compiled resolution.
        schedule: the resolved static schedule.
        reducers: one reducer per schedule step, in order.
        image_token_id: id of the image placeholder token in `input_ids`.
        with_cache: also return the KV cache, its validity masks and the next position.
    """

    def __init__(self, model: nn.Module, adapter: VLMAdapter, geometry: Geometry, schedule: Schedule,
                 reducers: tuple, image_token_id: int, with_cache: bool = False):
        super().__init__()
        if len(reducers) != len(schedule):
            raise ValueError("one reducer per schedule step is required")
        self.model, self.adapter, self.geometry = model, adapter, geometry
        self.schedule, self.reducers, self.image_token_id = schedule, reducers, image_token_id
        self.layout = build_layout(adapter, geometry, schedule)
        self.vision = VisionEncoder(model, adapter, geometry, schedule, reducers, self.layout)
        self.prefill = Prefill(model, adapter, geometry, schedule, reducers, image_token_id, self.layout, with_cache)
        self.groups = list(self.layout.groups)

    @property
    def input_names(self) -> list[str]:
        return list(self.adapter.input_names_for(self.geometry))

    def on_model_device(self) -> ReducedVLM:
        """Self, with the weights its steps bring (CLIP's text tower, loaded on the host) moved to the model's
        device."""
        from tokcompile.devices import module_device

        self.vision.step_modules.to(module_device(self.model))
        return self

    def without_reduction(self) -> ReducedVLM:
        return ReducedVLM(self.model, self.adapter, self.geometry, (), (), self.image_token_id, self.prefill.with_cache)

    def run(self, inputs: dict[str, Tensor], forced: Forced | None = None, n_appended: int = 0) -> dict[str, Tensor]:
        """Every output of both graphs by name. `forced` replays step selections and `n_appended` marks
        trailing generated tokens (both for no-cache references of generation)."""
        vision = self.vision.run({n: inputs[n] for n in self.vision.input_names}, forced)
        feed = {n: inputs[n] for n in self.prefill.input_names if n in inputs}
        feed.update({n: vision[n] for n in self.layout.image_outputs})
        return {**vision, **self.prefill.run(feed, forced, n_appended)}

    def initial_state(self, inputs: dict[str, Tensor]) -> TokenState:
        """The sequence entering decoder layer 0 (the vision graph run first), for layer-by-layer drivers."""
        vision = self.vision.run({n: inputs[n] for n in self.vision.input_names})
        return self.prefill.initial_state({**inputs, **vision})

    @property
    def output_names(self) -> list[str]:
        """Logits, every step's parity output, then (`with_cache`) the cache outputs; decision scores (`score_j`)
        are in `run()`'s dict only."""
        reported = (*self.layout.step_outputs, *self.layout.score_outputs)
        extra = [n for n in self.layout.prefill.outputs if n != "logits" and n not in reported]
        return ["logits", *self.layout.step_outputs, *(extra if self.prefill.with_cache else [])]

    def forward(self, *inputs: Tensor, forced: Forced | None = None) -> NamedOutputs:
        """Outputs in `output_names` order (logits, every step's parity output, then the cache outputs), also
        readable by name."""
        return NamedOutputs(self.run(dict(zip(self.input_names, inputs)), forced), self.output_names)


class DecodeStep(nn.Module):
    """One generated token per sample through the cached decoder (`layout.decode`).

    (input_ids (B, 1), position_ids (B, 1), attention_mask_g (B, P_g + 1) for each cache group g,
    attention_bias_g (B, P_g + 1) for each group whose keys carry sizes, past_key_l / past_value_l
    (B, Hkv, P_l, d) for each layer l) -> (logits (B, V), present_key_l / present_value_l (B, Hkv, P_l + 1, d)).

    Each group's mask covers its cached entries plus the new token (padding stays hidden). The t-th new token
    sits at (prefill's `next_position` + t) in every layer, whatever each layer caches.
    """

    def __init__(self, model: nn.Module, adapter: VLMAdapter, geometry: Geometry, layout: GraphLayout):
        super().__init__()
        self.model, self.adapter, self.geometry, self.layout = model, adapter, geometry, layout
        self.groups = list(layout.groups)

    @property
    def input_names(self) -> list[str]:
        return list(self.layout.decode.inputs)

    @property
    def output_names(self) -> list[str]:
        return list(self.layout.decode.outputs)

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        a, model, lay = self.adapter, self.model, self.layout
        feed = dict(zip(self.input_names, inputs))
        n = self.geometry.n_layers
        cache = KVCache({i: (feed[f"past_key_{i}"], feed[f"past_value_{i}"]) for i in range(n)})
        h = a.embed_tokens(model)(feed["input_ids"])  # (B, 1, D)
        positions = a.decode_positions(feed["position_ids"])  # (B, 1) or (B, 1, R)
        rope = a.rotary(model, h, positions)
        layers = a.decoder_layers(model)
        for g, (start, end) in enumerate(lay.groups):
            mask = feed[f"attention_mask_{g}"].bool()[:, None, None, :]  # (B, 1, 1, P_g + 1)
            if g in lay.biased_groups:  # cached tokens' sizes keep biasing attention (new tokens: 0)
                mask = with_key_bias(mask, feed[f"attention_bias_{g}"], h.dtype)
            for i in range(start, end):
                h = a.run_decoder_layer(layers[i], h, mask, rope, positions, cache)
        logits = a.lm_head(model)(a.final_norm(model)(h)[:, 0])  # (B, V)
        present = [t for i in range(n) for t in (cache.keys[i], cache.values[i])]
        return (logits, *present)
