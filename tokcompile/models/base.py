"""`ReducedVLM`: the one place that owns the layer loops, with the static schedule baked in.

The HF model is used as a set of leaf modules (embedding, vision blocks, projector, decoder layers,
final norm, lm_head); nothing in it is patched or mutated. Family differences (where those modules live,
how RoPE is computed, how image features are selected) come from a `VLMAdapter`. Reducers see only a
`TokenState` and a `DecoderSiteContext`, never the model class.

Shape legend: see `tokcompile/reduce/schedule.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from tokcompile.models.geometry import Geometry
from tokcompile.reduce.schedule import Schedule, Site, Step

if TYPE_CHECKING:
    from tokcompile.reduce.base import Reducer


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, T, d); cos/sin (B, T, d)."""
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, d)
    return x * cos + rotate_half(x) * sin


@dataclass(frozen=True)
class TokenState:
    """The decoder's token sequence between layers.

    Args:
        hidden: (B, T, D) residual stream.
        positions: (B, T) RoPE position ids, or (B, T, R) for R-row RoPE such as M-RoPE (R=3): the original
            ids of surviving tokens under policy P1. Reducers gather along the token axis only, so every row
            follows its token.
        valid: (B, T) bool, False for padding; padded keys are never attended.
        image_start: (B,) index of the first image token in the current sequence.
        n_image: image tokens in the current sequence (a Python int: static).
        last: (B,) index of each sample's last real token (the token FastV-style methods score from).
    """

    hidden: Tensor
    positions: Tensor
    valid: Tensor
    image_start: Tensor
    n_image: int
    last: Tensor


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


@dataclass
class DecoderSiteContext:
    """What a decoder-layer reducer at layer K may use: layer K-1's input, module and recorded keys."""

    adapter: VLMAdapter
    model: nn.Module
    prev_layer: nn.Module
    prev_state: TokenState
    prev_keys: Tensor  # (B, Hkv, T, d), after RoPE

    def last_token_attention(self) -> Tensor:
        """Head-mean attention probabilities of each sample's last real token at layer K-1: (B, T).

        Computed from layer K-1's own input norm and q projection, against the keys that layer's attention
        actually used; softmax in fp32 over every non-padding key, as eager attention would.
        """
        from tokcompile.reduce.ops import attention_row

        st = self.prev_state
        h_last = st.hidden.gather(1, st.last[:, None, None].expand(-1, 1, st.hidden.shape[-1]))  # (B, 1, D)
        from tokcompile.reduce.ops import gather_tokens

        pos_last = gather_tokens(st.positions, st.last[:, None])  # (B, 1) or (B, 1, R)
        q = self.adapter.last_query(self.model, self.prev_layer, h_last, pos_last)  # (B, H, 1, d)
        return attention_row(q, self.prev_keys, st.valid).mean(1)  # (B, H, T) -> (B, T)


Inputs = dict[str, Tensor]


class VLMAdapter:
    """Per-family knowledge. Subclasses live in `models/<family>.py`, keyed by HF `config.model_type`.

    An adapter answers three kinds of questions: sizes from the config alone (`geometry`), where the HF
    modules live (`decoder_layers`, `embed_tokens`, ...), and how the prefill inputs become the decoder's
    first `TokenState` (`encode_images`, `initial_positions`). `ReducedVLM`, `DecodeStep`, the reducers and
    the exporters only call these methods; nothing outside `models/` branches on the family.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    lightcompress_types: ClassVar[tuple[str, ...]] = ()
    sites: ClassVar[frozenset[Site]] = frozenset({Site.DECODER_LAYER})
    rope: ClassVar[str] = "1d"
    # Module-name patterns that quantization skips by default (see quant.base.select_linears).
    quant_ignore: ClassVar[tuple[str, ...]] = ()
    # Where the decoder's Linear layers live (quantization targets).
    quant_include: ClassVar[tuple[str, ...]] = ()
    # fp32 parity tolerance for this family (atol, rtol); a recipe may loosen it.
    parity_tolerance: ClassVar[tuple[float, float]] = (1e-4, 1e-3)
    # Names of the prefill graph's inputs, exactly as the processor returns them.
    input_names: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask", "pixel_values")
    # Inputs whose values (not only shapes) are fixed by the compiled resolution; the runtime checks them
    # against the values recorded at compile time.
    fixed_value_inputs: ClassVar[tuple[str, ...]] = ()
    # True when the processor's output shape depends on the image size (anyres tiling, native resolution):
    # images are then resized to the compiled resolution before the processor sees them.
    resize_to_compiled: ClassVar[bool] = False
    # True when a recipe may set inputs.video_frames (each prompt then carries one video, not one image).
    supports_video: ClassVar[bool] = False
    model_class_name: ClassVar[str] = ""

    # --- resolved without weights --------------------------------------------------------------------
    def input_names_for(self, geom: Geometry) -> tuple[str, ...]:
        """The prefill inputs for this geometry (`input_names` unless the media kind changes them, e.g. a video
        export takes the video's pixels instead of the image's)."""
        return self.input_names

    def geometry(self, config: Any, image_size: tuple[int, int] | None, video_frames: int | None = None) -> Geometry:
        """Sizes at the compiled resolution. Raises ValueError (one line naming the fix) for a resolution or
        frame count this family cannot compile."""
        raise NotImplementedError

    def default_image_size(self, config: Any, processor: Any | None) -> tuple[int, int]:
        raise NotImplementedError

    def image_token_id(self, config: Any, geom: Geometry) -> int:
        """The placeholder token id of the media span (the video token when geom.media is "video")."""
        raise NotImplementedError

    def input_axes(self, geom: Geometry) -> dict[str, dict[int, str | tuple[str, int]]]:
        """The prefill inputs' variable axes: "batch", "prompt_len", or ("batch", m) for an axis of length
        batch·m (images flattened into patches). Every other axis is fixed by the compiled resolution."""
        names = self.input_names_for(geom)
        axes: dict[str, dict[int, str | tuple[str, int]]] = {n: {0: "batch"} for n in names}
        for n in names:
            if n in ("input_ids", "attention_mask", "mm_token_type_ids"):
                axes[n] = {0: "batch", 1: "prompt_len"}
        return axes

    # --- modules (transformers 5 layout: `model.model.language_model`, `model.lm_head`) ---------------------
    def language_model(self, model: nn.Module) -> nn.Module:
        """The HF text model (with `embed_tokens`, `layers`, `norm`, `rotary_emb`)."""
        return model.model.language_model

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return self.language_model(model).layers

    def embed_tokens(self, model: nn.Module) -> nn.Module:
        return self.language_model(model).embed_tokens

    def final_norm(self, model: nn.Module) -> nn.Module:
        return self.language_model(model).norm

    def lm_head(self, model: nn.Module) -> nn.Module:
        return model.lm_head

    # --- prefill inputs -> first TokenState -------------------------------------------------------------
    def encode_images(self, model: nn.Module, inputs: Inputs, geom: Geometry) -> Tensor:
        """The prefill inputs -> projected image features (B, N, D), N = geom.n_image_tokens."""
        raise NotImplementedError

    def initial_positions(self, inputs: Inputs, image_start: Tensor, geom: Geometry) -> Tensor:
        """RoPE positions of the full prompt: (B, T) for 1-D RoPE (0, 1, ... over real tokens; left or right
        padding). Families with multi-row RoPE return (B, T, R)."""
        mask = inputs["attention_mask"]
        return (mask.long().cumsum(1) - 1).clamp(min=0)

    def decode_positions(self, position_ids: Tensor) -> Tensor:
        """Decode graph's position input (B, 1) -> positions in this family's layout."""
        return position_ids

    def rotary(self, model: nn.Module, hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """(cos, sin) for `positions` ((B, T) or (B, T, R)), in the form the decoder layers take: (B, T, d)."""
        return self.language_model(model).rotary_emb(hidden, positions)

    def last_query(self, model: nn.Module, layer: nn.Module, h_last: Tensor, pos_last: Tensor) -> Tensor:
        """Query of one token after the layer's input norm, q projection (and q norm, where the layer has one)
        and rotate-half RoPE with this family's `rotary`: (B, H, 1, d)."""
        attn = layer.self_attn
        B = h_last.shape[0]
        x = layer.input_layernorm(h_last)  # (B, 1, D)
        q = attn.q_proj(x).view(B, 1, -1, attn.head_dim).transpose(1, 2)  # (B, H, 1, d)
        q_norm = getattr(attn, "q_norm", None)
        if q_norm is not None:
            q = q_norm(q)
        cos, sin = self.rotary(model, h_last, pos_last)  # (B, 1, d)
        return apply_rope(q, cos, sin)

    def run_decoder_layer(
        self, layer: nn.Module, hidden: Tensor, mask: Tensor, rope: tuple[Tensor, Tensor], positions: Tensor, cache: Any
    ) -> Tensor:
        out = layer(
            hidden,
            attention_mask=mask,
            position_embeddings=rope,
            position_ids=None,
            past_key_values=cache,
            use_cache=cache is not None,
        )
        return out[0] if isinstance(out, tuple) else out

    # --- host side: processor inputs, per-sample slices, HF references ------------------------------------
    def load_processor(self, path: str, trust_remote_code: bool = False) -> Any:
        """The processor saved in a local directory (tokenizer and preprocessor files). Families whose
        `AutoProcessor` needs optional packages (torchvision) override this with a fallback."""
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)

    def prepare_images(self, images: list[Any], geom: Geometry) -> list[Any]:
        """PIL images as the processor should see them: resized to the compiled resolution when the
        processor's output shape would otherwise depend on the image size."""
        if not self.resize_to_compiled:
            return list(images)
        h, w = geom.image_size
        return [im.convert("RGB").resize((w, h)) if im.size != (w, h) else im.convert("RGB") for im in images]

    def random_media(self, rng: Any, n: int, geom: Geometry) -> list[Any]:
        """`n` random inputs of the compiled media kind for parity and synthetic calibration: PIL images of
        varying sizes (the processor or `prepare_images` brings them to the compiled resolution)."""
        from tokcompile.parity import random_images

        return random_images(rng, n, geom.image_size)

    def process(self, processor: Any, media: list[Any], prompts: list[str], geom: Geometry) -> dict[str, Any]:
        """Run the processor on prepared media and formatted prompts (left padding): its raw output."""
        return processor(**{geom.media + "s": media}, text=prompts, return_tensors="pt", padding=True)

    def sample_inputs(self, batch: Inputs, b: int, geom: Geometry) -> Inputs:
        """Sample `b` of a processor batch, unpadded, as a batch of one (for per-sample HF references)."""
        keep = batch["attention_mask"][b].bool()
        out: Inputs = {}
        for name in self.input_names_for(geom):
            t = batch[name]
            if "prompt_len" in self.input_axes(geom).get(name, {}).values():
                out[name] = t[b][keep][None]
            else:
                out[name] = t[b : b + 1]
        return out

    def extend_text(self, batch: Inputs, tokens: Tensor, geom: Geometry) -> Inputs:
        """`batch` with `tokens` (B, n) appended to the prompt (for no-cache references of generation)."""
        out = dict(batch)
        n = tokens.shape[1]
        for name, axes in self.input_axes(geom).items():
            if "prompt_len" not in axes.values():
                continue
            t = batch[name]
            if name == "input_ids":
                out[name] = torch.cat([t, tokens.to(t.dtype)], dim=1)
            elif name == "attention_mask":
                out[name] = torch.cat([t, torch.ones(t.shape[0], n, dtype=t.dtype)], dim=1)
            else:  # token-type ids and the like: appended tokens are text (0)
                out[name] = torch.cat([t, torch.zeros(t.shape[0], n, dtype=t.dtype)], dim=1)
        return out

    def hf_position_ids(self, model: nn.Module, sample: Inputs) -> Tensor:
        """HF's own position ids for one unpadded sample, in HF's layout: (1, T), or (R, 1, T) for R-row RoPE.
        The independent reference gathers them along the last axis."""
        return torch.arange(sample["input_ids"].shape[1])[None]


def splice_image_features(text_embeds: Tensor, image_feats: Tensor, image_start: Tensor) -> Tensor:
    """Place `image_feats` at [image_start, image_start+N) of each sample with one gather (no masked_scatter).

    Args:
        text_embeds: (B, T, D) token embeddings (image placeholders included).
        image_feats: (B, N, D) projected image features.
        image_start: (B,) first image-token index.
    """
    B, T, D = text_embeds.shape
    N = image_feats.shape[1]
    t = torch.arange(T, device=text_embeds.device)[None, :]  # (1, T)
    rel = t - image_start[:, None]  # (B, T)
    in_image = (rel >= 0) & (rel < N)
    src = torch.where(in_image, T + rel.clamp(0, N - 1), t)  # (B, T) index into cat([text, image])
    both = torch.cat([text_embeds, image_feats.to(text_embeds.dtype)], dim=1)  # (B, T+N, D)
    return both.gather(1, src[:, :, None].expand(B, T, D))  # (B, T, D)


def causal_mask(valid: Tensor) -> Tensor:
    """Boolean attention mask (B, 1, T, T): causal in sequence order, padded keys hidden.

    A padded query row would otherwise see no key at all (and produce NaN); it is allowed to see itself.
    Its output is garbage that never reaches a real token.
    """
    T = valid.shape[1]
    idx = torch.arange(T, device=valid.device)
    causal = idx[None, :] <= idx[:, None]  # (T, T) key <= query
    allowed = causal[None] & valid[:, None, :]  # (B, T, T)
    allowed = allowed | torch.eye(T, dtype=torch.bool, device=valid.device)[None]
    return allowed[:, None]  # (B, 1, T, T)


def cache_groups(n_layers: int, schedule: Schedule) -> list[tuple[int, int]]:
    """Decoder layers that share one KV-cache length: [start, end) per group, split at every decoder step.

    FastV at K gives two groups (pattern C1): layers [0, K) cache T entries, layers [K, L) cache T'.
    """
    cuts = sorted({s.layer for s in schedule if s.site is Site.DECODER_LAYER} - {0})
    bounds = [0, *cuts, n_layers]
    return [(a, b) for a, b in zip(bounds, bounds[1:])]


class ReducedVLM(nn.Module):
    """A VLM prefill with a static reduction schedule.

    The adapter's prefill inputs (the processor's outputs, `input_names`) -> (logits (B, V),
    kept_i (B, n_out_i)... and, with `with_cache`, cache_mask_g (B, T_g) for each cache group g,
    next_position (B, 1), the position of the first generated token, and present_key_l / present_value_l
    (B, Hkv, T_l, d) for each decoder layer l).

    Args:
        model: the HF model (weights may already be fake-quantized).
        adapter: the family adapter.
        geometry: resolved geometry at the compiled resolution.
        schedule: the resolved static schedule.
        reducers: one reducer per schedule step, in order.
        image_token_id: id of the image placeholder token in `input_ids`.
        with_cache: also return the KV cache and its validity masks (the deployable prefill).
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: VLMAdapter,
        geometry: Geometry,
        schedule: Schedule,
        reducers: tuple[Reducer, ...],
        image_token_id: int,
        with_cache: bool = False,
    ):
        super().__init__()
        if len(reducers) != len(schedule):
            raise ValueError("one reducer per schedule step is required")
        for step in schedule:
            if step.site is not Site.DECODER_LAYER:
                raise NotImplementedError(f"site {step.site.value} is not wired into ReducedVLM yet")
        self.model = model
        self.adapter = adapter
        self.geometry = geometry
        self.schedule = schedule
        self.reducers = reducers
        self.image_token_id = image_token_id
        self.with_cache = with_cache
        self.groups = cache_groups(geometry.n_layers, schedule)
        self._steps_at: dict[int, list[tuple[int, Step, Reducer]]] = {}
        for j, (step, red) in enumerate(zip(schedule, reducers)):
            self._steps_at.setdefault(step.layer, []).append((j, step, red))

    @property
    def input_names(self) -> list[str]:
        return list(self.adapter.input_names_for(self.geometry))

    @property
    def output_names(self) -> list[str]:
        names = ["logits"] + [f"kept_{i}" for i in range(len(self.schedule))]
        if self.with_cache:
            names += [f"cache_mask_{g}" for g in range(len(self.groups))]
            names += ["next_position"]
            names += [f"present_{kind}_{i}" for i in range(self.geometry.n_layers) for kind in ("key", "value")]
        return names

    def initial_state(self, inputs: dict[str, Tensor]) -> TokenState:
        """The prefill inputs (by name) -> the token sequence entering decoder layer 0."""
        a, g = self.adapter, self.geometry
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        image_feats = a.encode_images(self.model, inputs, g)  # (B, N, D)
        text = a.embed_tokens(self.model)(input_ids)  # (B, T, D)
        is_image = input_ids == self.image_token_id  # (B, T)
        image_start = is_image.int().argmax(dim=1)  # (B,) first placeholder
        hidden = splice_image_features(text, image_feats, image_start)
        valid = attention_mask.bool()
        positions = a.initial_positions(inputs, image_start, g)  # (B, T) or (B, T, R)
        T = input_ids.shape[1]
        last = (valid.long() * torch.arange(T, device=input_ids.device)[None]).amax(1)  # (B,)
        return TokenState(hidden, positions, valid, image_start, image_feats.shape[1], last)

    def forward(self, *inputs: Tensor, forced_kept: tuple[Tensor, ...] | None = None) -> tuple[Tensor, ...]:
        """Inputs in `input_names` order. `forced_kept` (eager only) replaces each step's selection, for
        no-cache generation references."""
        a, model = self.adapter, self.model
        state = self.initial_state(dict(zip(self.input_names, inputs)))
        # Decode continues after the largest position of each sample (M-RoPE: over all rows), as HF does.
        B, T = state.valid.shape
        flat = state.positions.reshape(B, T, -1).amax(-1)  # (B, T)
        next_position = (flat.masked_fill(~state.valid, -1).amax(1, keepdim=True) + 1).long()  # (B, 1)
        cache = KVCache()
        kept: list[Tensor] = []
        masks: list[Tensor] = []
        mask = causal_mask(state.valid)
        rope = a.rotary(model, state.hidden, state.positions)
        prev: tuple[nn.Module, TokenState] | None = None
        for i, layer in enumerate(a.decoder_layers(model)):
            if any(start == i for start, _ in self.groups):
                masks.append(state.valid)
            for j, step, reducer in self._steps_at.get(i, ()):
                assert prev is not None, "a decoder step at layer 0 has no previous layer"
                ctx = DecoderSiteContext(a, model, prev[0], prev[1], cache.keys[i - 1])
                forced = forced_kept[j] if forced_kept is not None else None
                state, idx = reducer.apply(state, ctx, step, forced)
                kept.append(idx)
                mask = causal_mask(state.valid)
                rope = a.rotary(model, state.hidden, state.positions)
                masks[-1] = state.valid  # the group starting here caches the reduced sequence
            prev = (layer, state)
            hidden = a.run_decoder_layer(layer, state.hidden, mask, rope, state.positions, cache)
            state = replace(state, hidden=hidden)
        h = a.final_norm(model)(state.hidden)  # (B, T', D)
        h_last = h.gather(1, state.last[:, None, None].expand(-1, 1, h.shape[-1]))[:, 0]  # (B, D)
        logits = a.lm_head(model)(h_last)  # (B, V)
        if not self.with_cache:
            return (logits, *kept)
        present = [t for i in range(len(cache.keys)) for t in (cache.keys[i], cache.values[i])]
        return (logits, *kept, *[m.long() for m in masks], next_position, *present)


class DecodeStep(nn.Module):
    """One generated token per sample through the cached decoder.

    (input_ids (B, 1), position_ids (B, 1), attention_mask_g (B, P_g + 1) for each cache group g,
    past_key_l / past_value_l (B, Hkv, P_l, d) for each layer l) -> (logits (B, V), present_key_l /
    present_value_l (B, Hkv, P_l + 1, d)).

    Each group's mask covers its cached entries plus the new token (padding stays hidden). Positions follow
    the prefill's policy: under P1 the t-th new token sits at (prefill's `next_position` + t) in every layer,
    whatever each layer caches.
    """

    def __init__(self, model: nn.Module, adapter: VLMAdapter, geometry: Geometry, groups: list[tuple[int, int]]):
        super().__init__()
        self.model = model
        self.adapter = adapter
        self.geometry = geometry
        self.groups = groups

    @property
    def input_names(self) -> list[str]:
        n = self.geometry.n_layers
        return (
            ["input_ids", "position_ids"]
            + [f"attention_mask_{g}" for g in range(len(self.groups))]
            + [f"past_{kind}_{i}" for i in range(n) for kind in ("key", "value")]
        )

    @property
    def output_names(self) -> list[str]:
        n = self.geometry.n_layers
        return ["logits"] + [f"present_{kind}_{i}" for i in range(n) for kind in ("key", "value")]

    def forward(self, input_ids: Tensor, position_ids: Tensor, *rest: Tensor) -> tuple[Tensor, ...]:
        a, model = self.adapter, self.model
        n_groups = len(self.groups)
        group_masks, past = rest[:n_groups], rest[n_groups:]
        cache = KVCache({i: (past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)})
        h = a.embed_tokens(model)(input_ids)  # (B, 1, D)
        positions = a.decode_positions(position_ids)  # (B, 1) or (B, 1, R)
        rope = a.rotary(model, h, positions)
        layers = a.decoder_layers(model)
        for g, (start, end) in enumerate(self.groups):
            mask = group_masks[g].bool()[:, None, None, :]  # (B, 1, 1, P_g + 1)
            for i in range(start, end):
                h = a.run_decoder_layer(layers[i], h, mask, rope, positions, cache)
        logits = a.lm_head(model)(a.final_norm(model)(h)[:, 0])  # (B, V)
        present = [t for i in range(len(cache.keys)) for t in (cache.keys[i], cache.values[i])]
        return (logits, *present)
