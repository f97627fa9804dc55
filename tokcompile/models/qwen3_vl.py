"""Qwen3-VL (dense): Qwen2-VL's layout (merged 2x2 patches, M-RoPE ids from `get_rope_index`, the same
processor inputs) with three differences that the adapter handles:

- the vision tower adds a learned position embedding, resampled bilinearly from a square table to the image's
  patch grid (HF's own interpolation helper, evaluated once for the compiled grid: constant indices and weights);
- the decoder is Qwen3's (q/k norms, an explicit head dim) with interleaved M-RoPE (HF's rotary module);
- DeepStack: after vision blocks `deepstack_visual_indexes`, a merger of its own turns the tower's tokens into
  one (B, N, D) feature per block, which HF adds to the output of decoder layer j (j = 0, 1, 2) at the image
  positions. These are the family's side streams (`Geometry.side_streams`, `ImageTokens.side`): the vision graph
  outputs them, every pre-decoder step gathers them with the image tokens, the prefill graph adds them after
  its first decoder layers, and decoder steps before those layers gather them too (`TokenState.side`).
"""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from tokcompile.models.base import Inputs
from tokcompile.models.geometry import Geometry
from tokcompile.models.qwen2_vl import Qwen2VLAdapter, vision_attention, vision_positions
from tokcompile.models.registry import ADAPTERS
from tokcompile.reduce.context import VisionContext
from tokcompile.reduce.state import ImageTokens

if TYPE_CHECKING:
    from tokcompile.models.reduced import VisionSteps


@functools.lru_cache(maxsize=16)
def position_taps(h: int, w: int, merge: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear (align_corners) resampling of a (side, side) learned position table to an (h, w) patch grid, per
    patch in the processor's merge-block order: (indices (h·w, 4) int64 into the flat table, weights (h·w, 4)
    float32), computed in float32 as HF's `get_vision_interpolation_indices_and_weights` computes them (a host
    constant of the compiled grid, so no grid arithmetic enters the graph)."""
    rc = vision_positions(1, h, w, merge)  # (h·w, 2) row, column

    def axis(index: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))  # (P,)
        floor = np.floor(src)
        offsets = np.arange(2)
        taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)  # (P, 2)
        distance = np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32))
        return taps, np.clip(np.float32(1) - distance, 0, None).astype(np.float32)

    (ht, hw), (wt, ww) = axis(rc[:, 0], h), axis(rc[:, 1], w)
    idx = (ht[:, :, None] * side + wt[:, None, :]).reshape(-1, 4)
    weights = (hw[:, :, None] * ww[:, None, :]).reshape(-1, 4)
    idx.setflags(write=False)
    weights.setflags(write=False)
    return idx, weights


@ADAPTERS.register("qwen3_vl")
class Qwen3VLAdapter(Qwen2VLAdapter):
    model_types: ClassVar[tuple[str, ...]] = ("qwen3_vl",)
    lightcompress_types: ClassVar[tuple[str, ...]] = ("Qwen3VL",)
    model_class_name: ClassVar[str] = "Qwen3VLForConditionalGeneration"
    family: ClassVar[str] = "qwen3_vl"
    quant_ignore: ClassVar[tuple[str, ...]] = ("lm_head", "visual")

    def _vision_dims(self, config: Any) -> tuple[int, int]:
        vc = config.vision_config
        return int(vc.hidden_size), int(vc.intermediate_size)

    def geometry(self, config: Any, image_size: tuple[int, int] | None, video_frames: int | None = None) -> Geometry:
        if video_frames is not None:
            raise ValueError("Qwen3-VL video (timestamped frames) is not supported yet; remove inputs.video_frames")
        g = super().geometry(config, image_size)
        tc, vc = config.text_config, config.vision_config
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        return replace(g, head_dim=int(head_dim), side_streams=len(vc.deepstack_visual_indexes or ()))

    def vision_features(self, model: nn.Module, pixel_values: Tensor, batch: int,
                        geom: Geometry) -> tuple[Tensor, VisionContext, Tensor, tuple[Tensor, ...]]:
        """pixel_values (B·S, C·tps·p·p) -> (merged image features (B, N, D), the last block's attention as it
        ran, (S,) the image token each tower token became, the DeepStack features (B, N, D) each)."""
        visual = model.model.visual
        cfg = model.config.vision_config
        m = int(cfg.spatial_merge_size)
        S, N = geom.vision_tokens, geom.n_image_tokens
        t, h, w = geom.layout
        if visual.interpolation_mode != "bilinear" or not visual.interpolation_align_corners:
            raise ValueError("this Qwen3-VL resamples its position table other than bilinearly with aligned corners")
        taps, weights = position_taps(h, w, m, visual.num_grid_per_side)
        dev = pixel_values.device  # constants live where the graph runs
        idx = torch.from_numpy(np.tile(taps, (t, 1)).copy()).to(dev)  # (S, 4) constant
        weights = torch.from_numpy(np.tile(weights, (t, 1)).copy()).to(dev)  # (S, 4) constant
        pos = torch.from_numpy(vision_positions(t, h, w, m).copy()).to(dev)  # (S, 2) constant
        x = visual.patch_embed(pixel_values).reshape(batch, S, -1)  # (B, S, Dv)
        pos_embed = (visual.pos_embed(idx) * weights[:, :, None].to(x.dtype)).sum(1)  # (S, Dv)
        x = x + pos_embed.to(x.dtype)
        cos, sin = visual.rotary_pos_emb(x, pos)  # (S, dv) each, HF's own rotary module
        deep = list(visual.deepstack_visual_indexes or ())
        side: list[Tensor] = []
        for i, blk in enumerate(visual.blocks):
            out, q, k = vision_attention(blk.attn, blk.norm1(x), cos, sin, None)
            x = x + out
            x = x + blk.mlp(blk.norm2(x))  # (B, S, Dv)
            if i in deep:
                side.append(visual.deepstack_merger_list[deep.index(i)](x).reshape(batch, N, -1))  # (B, N, D)
        feats = visual.merger(x).reshape(batch, N, -1)  # (B, N, D)
        groups = torch.arange(S, device=dev) // (m * m)  # (S,): the merged token of every tower token
        last = VisionContext(len(visual.blocks) - 1, q, k)
        return feats, last, groups, tuple(side)

    def encode_images(self, model: nn.Module, inputs: Inputs, geom: Geometry) -> Tensor:
        return self.vision_features(model, inputs["pixel_values"], self._batch(inputs), geom)[0]

    def encode_image_tokens(self, model: nn.Module, inputs: Inputs, geom: Geometry,
                            steps: VisionSteps | None = None) -> ImageTokens:
        """The merged image features with the tower's last block for the first projector step, and the DeepStack
        features as side streams."""
        B = self._batch(inputs)
        feats, tower, groups, side = self.vision_features(model, inputs["pixel_values"], B, geom)  # (B, N, D)
        source = torch.arange(feats.shape[1], device=feats.device)[None].expand(B, -1)  # (B, N)
        return ImageTokens(feats, source, tower=(tower, groups), side=side)
