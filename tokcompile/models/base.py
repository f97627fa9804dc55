"""`VLMAdapter`: per-family knowledge, plus the splice and mask helpers the graphs share.

The graphs' modules (`models/reduced.py`) call the HF model's leaf modules through an adapter; reducers never
see it. Shape legend: see `tokcompile/reduce/schedule.py`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from tokcompile.models.geometry import Geometry
from tokcompile.question import QUESTION_INPUTS
from tokcompile.reduce.schedule import Site
from tokcompile.reduce.state import ImageTokens

if TYPE_CHECKING:
    from tokcompile.models.reduced import VisionSteps


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, T, d); cos/sin (B, T, d)."""
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, d)
    return x * cos + rotate_half(x) * sin


Inputs = dict[str, Tensor]


class VLMAdapter:
    """Per-family knowledge. Subclasses live in `models/<family>.py`, keyed by HF `config.model_type`.

    An adapter answers three kinds of questions: sizes from the config alone (`geometry`), where the HF
    modules live (`decoder_layers`, `embed_tokens`, ...), and how the inputs become image features and the
    decoder's first positions (`encode_image_tokens`, `initial_positions`). It states the reduction sites its
    family supports (`sites`, with the reason for the others in `site_refusals`). The graph modules, the
    reducers' contexts and the exporters only call these methods; nothing outside `models/` branches on the
    family.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    lightcompress_types: ClassVar[tuple[str, ...]] = ()
    sites: ClassVar[frozenset[Site]] = frozenset({Site.PROJECTOR_OUT, Site.DECODER_LAYER, Site.DECODER_MID})
    # Why this family refuses a site, for the `--plan` error.
    site_refusals: ClassVar[dict[Site, str]] = {}
    # Its projector merges groups of tower tokens (Qwen's 2x2 merger) and `encode_image_tokens` hands the tower's
    # last block to the first projector-output step (`ImageContext.tower`), for methods that score image tokens
    # by the tower's attention where the tower's own sites are refused.
    tower_at_projector: ClassVar[bool] = False
    # `encode_image_tokens` keeps the features the projector received (`ImageTokens.features`) for the first
    # projector-output step (`ImageContext.features`), for methods that score with them there (CDPruner).
    features_at_projector: ClassVar[bool] = False
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
    # What a formatted prompt writes where its image (or video) goes, per media kind; the processor expands it
    # into the media span. HF's convention, the LLaVA family's.
    placeholders: ClassVar[dict[str, str]] = {"image": "<image>", "video": "<video>"}
    # The prompt of one question for a processor without a chat template, in the family's own conversation
    # format ({placeholder}: `placeholder(media)`). LLaVA-1.5's.
    fallback_template: ClassVar[str] = "USER: {placeholder}\n{question} ASSISTANT:"

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
        """The media inputs -> projected image features (B, N, D), N = geom.n_image_tokens."""
        raise NotImplementedError

    def encode_image_tokens(self, model: nn.Module, inputs: Inputs, geom: Geometry,
                            steps: VisionSteps | None = None) -> ImageTokens:
        """The media inputs -> projected image tokens with their source index in the image span (B, N).

        Families that expose vision-tower sites override this and call `steps` inside their tower; the others
        never receive vision-tower steps (the plan refuses them)."""
        feats = self.encode_images(model, inputs, geom)  # (B, N, D)
        B, N = feats.shape[:2]
        source = torch.arange(N, device=feats.device)[None].expand(B, N)  # (B, N)
        return ImageTokens(feats, source)

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

    def _projection(self, model: nn.Module, layer: nn.Module, hidden: Tensor, positions: Tensor, which: str,
                    rope: bool = True) -> Tensor:
        attn = layer.self_attn
        B, T = hidden.shape[:2]
        x = layer.input_layernorm(hidden)  # (B, T, D)
        out = getattr(attn, f"{which}_proj")(x).view(B, T, -1, attn.head_dim).transpose(1, 2)  # (B, H or Hkv, T, d)
        norm = getattr(attn, f"{which}_norm", None)
        if norm is not None:
            out = norm(out)
        if not rope:
            return out
        cos, sin = self.rotary(model, hidden, positions)  # (B, T, d)
        return apply_rope(out, cos, sin)

    def layer_query(self, model: nn.Module, layer: nn.Module, hidden: Tensor, positions: Tensor,
                    rope: bool = True) -> Tensor:
        """Queries of `hidden` (B, T, D) after the layer's input norm, q projection (and q norm, where the layer
        has one) and rotate-half RoPE with this family's `rotary` (`rope=False`: before RoPE): (B, H, T, d)."""
        return self._projection(model, layer, hidden, positions, "q", rope)

    def layer_keys(self, model: nn.Module, layer: nn.Module, hidden: Tensor, positions: Tensor,
                   rope: bool = True) -> Tensor:
        """Keys of `hidden` (B, T, D) as the layer's attention computes them: (B, Hkv, T, d) after RoPE
        (`rope=False`: before it)."""
        return self._projection(model, layer, hidden, positions, "k", rope)

    def run_decoder_attention(self, layer: nn.Module, hidden: Tensor, mask: Tensor, rope: tuple[Tensor, Tensor],
                              cache: Any) -> Tensor:
        """The attention half of a pre-norm decoder layer, residual included: (B, T, D)."""
        out = layer.self_attn(
            hidden_states=layer.input_layernorm(hidden), attention_mask=mask, position_embeddings=rope,
            position_ids=None, past_key_values=cache,
        )
        return hidden + (out[0] if isinstance(out, tuple) else out)

    def run_decoder_mlp(self, layer: nn.Module, hidden: Tensor) -> Tensor:
        """The MLP half of a pre-norm decoder layer, residual included: (B, T, D)."""
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

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

    # --- host side: prompts, processor inputs, per-sample slices, HF references ----------------------------
    def placeholder(self, media: str = "image") -> str:
        """The text a formatted prompt holds where its image ("image") or video ("video") goes."""
        return self.placeholders[media]

    def fallback_prompt(self, question: str, media: str = "image") -> str:
        """One question with one image (or video) in the family's conversation format, for a processor
        that has no chat template."""
        return self.fallback_template.format(placeholder=self.placeholder(media), question=question)

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
        """Sample `b` of a processor batch, unpadded, as a batch of one (for per-sample HF references): prompt
        axes keep the sample's real tokens, a ("batch", m) axis its m rows (b·m .. (b+1)·m), any other its row."""
        keep = batch["attention_mask"][b].bool()
        out: Inputs = {}
        for name, axes in self.input_axes(geom).items():
            t = batch[name]
            rows = axes.get(0)
            if "prompt_len" in axes.values():
                out[name] = t[b][keep][None]
            elif isinstance(rows, tuple):
                out[name] = t[b * rows[1] : (b + 1) * rows[1]]
            else:
                out[name] = t[b : b + 1]
        out.update({n: batch[n][b : b + 1] for n in QUESTION_INPUTS if n in batch})  # (1, S, L)
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
                out[name] = torch.cat([t, tokens.to(device=t.device, dtype=t.dtype)], dim=1)
            elif name == "attention_mask":
                out[name] = torch.cat([t, torch.ones(t.shape[0], n, dtype=t.dtype, device=t.device)], dim=1)
            else:  # token-type ids and the like: appended tokens are text (0)
                out[name] = torch.cat([t, torch.zeros(t.shape[0], n, dtype=t.dtype, device=t.device)], dim=1)
        return out

    def hf_position_ids(self, model: nn.Module, sample: Inputs) -> Tensor:
        """HF's own position ids for one unpadded sample, in HF's layout: (1, T), or (R, 1, T) for R-row RoPE.
        The independent reference gathers them along the last axis."""
        return torch.arange(sample["input_ids"].shape[1], device=sample["input_ids"].device)[None]


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


def with_key_bias(allowed: Tensor, key_bias: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean mask (B, 1, Tq, Tk) with a per-key logit bias (B, Tk) -> an additive float mask (B, 1, Tq, Tk):
    the bias where attention is allowed, the dtype's minimum where it is not (proportional attention)."""
    bias = key_bias.to(dtype)[:, None, None, :]  # (B, 1, 1, Tk)
    return torch.where(allowed, bias, torch.finfo(dtype).min)
