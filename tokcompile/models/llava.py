"""LLaVA-1.5 in HF format (`LlavaForConditionalGeneration`, model_type "llava").

CLIP (or SigLIP) vision tower -> hidden states of `vision_feature_layer` -> CLS dropped under the "default"
strategy -> 2-layer MLP projector -> image features spliced at the `<image>` placeholders of a
Llama/Mistral/Qwen2-style decoder with 1-D RoPE.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokcompile.models.base import VLMAdapter
from tokcompile.models.geometry import Geometry
from tokcompile.models.registry import ADAPTERS
from tokcompile.reduce.context import VisionContext
from tokcompile.reduce.schedule import Site
from tokcompile.reduce.state import ImageTokens

if TYPE_CHECKING:
    from tokcompile.models.reduced import VisionSteps


def clip_attention(attn: nn.Module, x: Tensor, key_bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """A CLIP/SigLIP attention over its own q/k/v/out projections with SDPA, returning (output (B, t, Dv),
    queries (B, Hv, t, dv), keys (B, Hv, t, dv)) so that reducers can score without a second pass.

    `key_bias` (B, t) is added to every query's logit for that key (ToMe's proportional attention: log size).
    """
    B, t, _ = x.shape
    heads = attn.num_heads
    q = attn.q_proj(x).view(B, t, heads, -1).transpose(1, 2)  # (B, Hv, t, dv)
    k = attn.k_proj(x).view(B, t, heads, -1).transpose(1, 2)
    v = attn.v_proj(x).view(B, t, heads, -1).transpose(1, 2)
    bias = None if key_bias is None else key_bias.to(q.dtype)[:, None, None, :]  # (B, 1, 1, t)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)  # (B, Hv, t, dv)
    return attn.out_proj(out.transpose(1, 2).reshape(B, t, -1)), q, k


def _text_dims(tc: Any) -> tuple[int, int, int]:
    heads = tc.num_attention_heads
    kv = getattr(tc, "num_key_value_heads", None) or heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    return heads, kv, head_dim


@ADAPTERS.register("llava")
class LlavaAdapter(VLMAdapter):
    model_types: ClassVar[tuple[str, ...]] = ("llava",)
    # LightCompress's names for this family ("Llava" is the original-repo format; we load its HF twin).
    lightcompress_types: ClassVar[tuple[str, ...]] = ("Llava", "LlavaHf")
    sites: ClassVar[frozenset[Site]] = frozenset(Site)
    features_at_projector: ClassVar[bool] = True
    rope: ClassVar[str] = "1d"
    quant_include: ClassVar[tuple[str, ...]] = ("model.language_model",)
    quant_ignore: ClassVar[tuple[str, ...]] = ("lm_head", "vision_tower", "multi_modal_projector")
    parity_tolerance: ClassVar[tuple[float, float]] = (1e-4, 1e-3)
    model_class_name: ClassVar[str] = "LlavaForConditionalGeneration"

    # --- config only ----------------------------------------------------------------------------------
    @staticmethod
    def _vision_run_layers(config: Any) -> int:
        n = config.vision_config.num_hidden_layers
        layers = config.vision_feature_layer
        layers = layers if isinstance(layers, (list, tuple)) else [layers]
        # hidden_states[0] is the embedding output, hidden_states[i] the output of block i-1.
        return max(n + 1 + f if f < 0 else f for f in layers)

    def default_image_size(self, config: Any, processor: Any | None) -> tuple[int, int]:
        s = config.vision_config.image_size
        return (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))

    def image_token_id(self, config: Any, geom: Geometry) -> int:
        return int(config.image_token_id)

    def geometry(self, config: Any, image_size: tuple[int, int] | None, video_frames: int | None = None) -> Geometry:
        vc = config.vision_config
        native = self.default_image_size(config, None)
        size = image_size or native
        if tuple(size) != native:
            raise ValueError(
                f"this LLaVA vision tower runs at {native[0]}x{native[1]} only; "
                f"set inputs.image_size to [{native[0]}, {native[1]}] or remove it"
            )
        patches = (size[0] // vc.patch_size) * (size[1] // vc.patch_size)
        n_image = patches + (0 if config.vision_feature_select_strategy == "default" else 1)
        return self._geometry(config, size, n_image, patches + 1)

    def _geometry(
        self, config: Any, size: tuple[int, int], n_image_tokens: int, vision_tokens: int, **extra: Any
    ) -> Geometry:
        """Geometry of a LLaVA-style model (vision tower, projector, 1-D RoPE decoder) at `size`: the decoder's
        and the tower's sizes from the config; `extra` sets media, vision_images and layout."""
        vc, tc = config.vision_config, config.text_config
        heads, kv, head_dim = _text_dims(tc)
        return Geometry(
            family=self.model_types[0],
            n_layers=tc.num_hidden_layers,
            hidden_size=tc.hidden_size,
            intermediate_size=tc.intermediate_size,
            n_heads=heads,
            n_kv_heads=kv,
            head_dim=head_dim,
            vocab_size=tc.vocab_size,
            image_size=(int(size[0]), int(size[1])),
            n_image_tokens=n_image_tokens,
            vision_layers=self._vision_run_layers(config),
            vision_hidden_size=vc.hidden_size,
            vision_intermediate_size=vc.intermediate_size,
            vision_heads=vc.num_attention_heads,
            vision_tokens=vision_tokens,
            rope="1d",
            **extra,
        )

    # --- image features -----------------------------------------------------------------------------------
    def encode_images(self, model: nn.Module, inputs: dict[str, Tensor], geom: Geometry) -> Tensor:
        return self.project_features(model, self.vision_features(model, inputs["pixel_values"]))

    def encode_image_tokens(self, model: nn.Module, inputs: dict[str, Tensor], geom: Geometry,
                            steps: VisionSteps | None = None) -> ImageTokens:
        if steps is None or not steps.touches_tower:
            feats = self.vision_features(model, inputs["pixel_values"])  # (B, N, Dv)
            B, N = feats.shape[:2]
            source = torch.arange(N, device=feats.device)[None].expand(B, N)  # (B, N)
            return ImageTokens(self.project_features(model, feats), source, features=feats)  # (B, N, D)
        tokens = self.vision_tokens(model, inputs["pixel_values"], steps)  # (B, N', Dv)
        return replace(tokens, hidden=self.project_features(model, tokens.hidden), features=tokens.hidden)

    def vision_tokens(self, model: nn.Module, pixel_values: Tensor, steps: VisionSteps) -> ImageTokens:
        """pixel_values (B, 3, H, W) -> the selected layer's tokens after the schedule's vision-tower steps,
        CLS dropped under the "default" strategy: (B, N', Dv), with each token's source patch (0-based).

        Every block runs split at the attention residual (the VISION_BLOCK site) with this module's attention,
        which hands the block's queries and keys to the reducers; the selected layer's output is the
        VISION_OUT site. The CLS token is protected. Token sizes, when a step carries them, bias attention."""
        cfg = model.config
        layers = cfg.vision_feature_layer
        if isinstance(layers, (list, tuple)) and len(layers) > 1:
            raise ValueError("vision-tower reductions need a single vision_feature_layer")
        vm = model.model.vision_tower
        vm = getattr(vm, "vision_model", vm)
        h = vm.embeddings(pixel_values.to(vm.embeddings.patch_embedding.weight.dtype))  # (B, 1+P, Dv)
        pre = getattr(vm, "pre_layrnorm", None)
        if pre is not None:
            h = pre(h)
        B, t = h.shape[:2]
        source = torch.arange(t, device=h.device)[None].expand(B, t)  # (B, t)
        tokens = ImageTokens(h, source, None, n_protected=1)
        side = math.isqrt(t - 1)  # CLIP's square patch grid
        grid = (side, side) if side * side == t - 1 else None
        ctx = None
        for i, block in enumerate(vm.encoder.layers[: self._vision_run_layers(cfg)]):
            bias = None if tokens.sizes is None else tokens.sizes.log()  # (B, t): proportional attention
            out, q, k = clip_attention(block.self_attn, block.layer_norm1(tokens.hidden), bias)
            tokens = replace(tokens, hidden=tokens.hidden + out)  # (B, t, Dv)
            ctx = VisionContext(i, q, k, bias, grid)
            if steps.has_block(i):
                tokens = steps.vision_block(i, tokens, ctx)  # (B, t', Dv)
            tokens = replace(tokens, hidden=tokens.hidden + block.mlp(block.layer_norm2(tokens.hidden)))
        assert ctx is not None, "the vision tower runs no block"
        tokens = steps.vision_out(tokens, ctx)
        if cfg.vision_feature_select_strategy == "default":  # drop CLS, which every step protects
            sizes = None if tokens.sizes is None else tokens.sizes[:, 1:]
            tokens = ImageTokens(tokens.hidden[:, 1:], tokens.source[:, 1:] - 1, sizes, 0)
        return tokens

    def vision_features(self, model: nn.Module, pixel_values: Tensor) -> Tensor:
        """pixel_values (B, 3, H, W) -> selected vision-tower features (B, P, Dv·n_layers) before the projector."""
        cfg = model.config
        tower = model.model.vision_tower
        vm = getattr(tower, "vision_model", tower)  # transformers 5 flattens CLIPVisionModel
        h = vm.embeddings(pixel_values.to(vm.embeddings.patch_embedding.weight.dtype))  # (B, 1+P, Dv)
        pre = getattr(vm, "pre_layrnorm", None)
        if pre is not None:
            h = pre(h)
        hidden_states = [h]
        for block in vm.encoder.layers[: self._vision_run_layers(cfg)]:
            out = block(h, None)
            h = out[0] if isinstance(out, tuple) else out
            hidden_states.append(h)
        layers = cfg.vision_feature_layer
        layers = layers if isinstance(layers, (list, tuple)) else [layers]
        n = cfg.vision_config.num_hidden_layers
        picked = [hidden_states[n + 1 + f if f < 0 else f] for f in layers]
        if cfg.vision_feature_select_strategy == "default":
            picked = [p[:, 1:] for p in picked]  # drop CLS
        return torch.cat(picked, dim=-1)  # (B, N, Dv·len(layers))

    def project_features(self, model: nn.Module, feats: Tensor) -> Tensor:
        return model.model.multi_modal_projector(feats)  # (B, N, D)
