"""LLaVA-OneVision in HF format (`LlavaOnevisionForConditionalGeneration`, model_type "llava_onevision").

SigLIP tower (no CLS token, every patch kept under the "full" strategy) -> 2-layer MLP projector -> a Qwen2
decoder with 1-D RoPE. Two media kinds, one per compiled export:

- image (anyres): the compiled resolution fixes the best pinpoint, the tile grid, the unpadding crop, the
  anyres_max downsampling (a bilinear resize of the feature map when it has too many patches) and the newline
  column, so the whole packing is static slicing and a fixed-size interpolation. Span: base tile's p·p
  features, then h rows of (w features + newline).
- video: `inputs.video_frames` frames at the tower's resolution, each frame's p x p feature map bilinearly
  pooled to ceil(p/2) x ceil(p/2), frames concatenated, one newline at the end (placeholder: `<video>`).

Processing needs no torchvision: images go through the PIL image processor, and video frames through the same
PIL backend with the video processor's settings (see `video_pixels`).

Shapes: B batch, P tiles per image (1 base + gh·gw), F frames, S tile side in pixels, p = S / patch patches per
tile side, q = ceil(p / 2), Dv vision width, D decoder width.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from tokcompile.models.base import VLMAdapter
from tokcompile.models.geometry import Geometry
from tokcompile.models.llava import LlavaAdapter
from tokcompile.models.registry import ADAPTERS
from tokcompile.reduce.schedule import Site

VIDEO_INPUTS: tuple[str, ...] = ("input_ids", "attention_mask", "pixel_values_videos")

# Video-processor settings that `video_pixels` applies (as saved in video_preprocessor_config.json).
VIDEO_KEYS: tuple[str, ...] = (
    "size", "resample", "do_resize", "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std",
    "do_convert_rgb", "do_center_crop",
)


@dataclass(frozen=True)
class AnyresLayout:
    """The static packing of one image at the compiled resolution, as HF's `pack_image_features` computes it.

    Args:
        grid: (gh, gw) tiles of the best pinpoint.
        side: p, patches per tile side.
        rows: [r0, r1) rows of the (gh·p, gw·p) feature map kept by unpadding.
        cols: [c0, c1) columns kept by unpadding.
        out: (h, w) of the map after anyres_max downsampling (the unpadded size when it does not trigger).
        downsample: whether the bilinear downsampling step runs.
    """

    grid: tuple[int, int]
    side: int
    rows: tuple[int, int]
    cols: tuple[int, int]
    out: tuple[int, int]
    downsample: bool

    @property
    def n_tiles(self) -> int:
        return 1 + self.grid[0] * self.grid[1]

    @property
    def n_tokens(self) -> int:
        """Base tile features, then h rows of w features and one newline."""
        return self.side * self.side + self.out[0] * (self.out[1] + 1)


def _max_tiles(aspect: str) -> int:
    m = re.fullmatch(r"anyres_max_(\d+)", str(aspect))
    if m is None or int(m.group(1)) < 1:
        raise ValueError(f"vision_aspect_ratio '{aspect}' is not of the form anyres_max_<N>; this export needs one")
    return int(m.group(1))


def _tile_side(config: Any) -> tuple[int, int]:
    """(S, p): tile side in pixels and patches per tile side."""
    vc = config.vision_config
    S = vc.image_size if isinstance(vc.image_size, int) else int(vc.image_size[0])
    return int(S), int(S // vc.patch_size)


def anyres_layout(config: Any, image_size: tuple[int, int]) -> AnyresLayout:
    """The packing of an image of `image_size` (H, W) pixels (config only). Raises ValueError when HF itself
    could not pack it (a pinpoint that is not a whole number of tiles)."""
    from transformers.image_processing_utils import select_best_resolution

    H, W = int(image_size[0]), int(image_size[1])
    S, p = _tile_side(config)
    pinpoints = [tuple(int(v) for v in pp) for pp in config.image_grid_pinpoints]
    bh, bw = select_best_resolution((H, W), pinpoints)
    if bh % S or bw % S:
        raise ValueError(f"image_grid_pinpoints entry {bh}x{bw} (chosen for {H}x{W}) is not a multiple of the {S}-px "
                         "tile; fix the checkpoint's pinpoints or choose another inputs.image_size")
    gh, gw = bh // S, bw // S
    ch, cw = gh * p, gw * p
    rows, cols = (0, ch), (0, cw)
    # HF's unpad_image: the feature map holds the image letterboxed into the pinpoint; crop the padding.
    if W / H > cw / ch:
        new_h = int(round(H * (cw / W), 7))
        pad = (ch - new_h) // 2
        rows = (pad, ch - pad)
    else:
        new_w = int(round(W * (ch / H), 7))
        pad = (cw - new_w) // 2
        cols = (pad, cw - pad)
    uh, uw = rows[1] - rows[0], cols[1] - cols[0]
    if uh < 1 or uw < 1:
        raise ValueError(f"a {H}x{W} image leaves no feature rows after unpadding; choose a less extreme "
                         "inputs.image_size")
    ratio = math.sqrt(uh * uw / (_max_tiles(config.vision_aspect_ratio) * p * p))
    down = ratio > 1.1
    out = (int(uh // ratio), int(uw // ratio)) if down else (uh, uw)
    if out[0] < 1 or out[1] < 1:
        raise ValueError(f"a {H}x{W} image downsamples to an empty feature map; choose a less extreme "
                         "inputs.image_size")
    return AnyresLayout((gh, gw), p, rows, cols, out, down)


def video_settings(processor: Any) -> dict[str, Any]:
    """The video processor's frame settings: from the processor's `video_processor` when it has one, else its
    saved `video_config`, completed with HF's `LlavaOnevisionVideoProcessor` class defaults."""
    from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

    defaults = {k: getattr(LlavaOnevisionVideoProcessor, k, None) for k in VIDEO_KEYS}
    vp = getattr(processor, "video_processor", None)
    given = {k: getattr(vp, k) for k in VIDEO_KEYS if getattr(vp, k, None) is not None} if vp is not None else {}
    if not given:
        given = {k: v for k, v in (getattr(processor, "video_config", None) or {}).items() if v is not None}
    out = {**defaults, **given}
    size = out["size"]
    size = dict(size) if isinstance(size, dict) else {"height": getattr(size, "height", None),
                                                      "width": getattr(size, "width", None)}  # an HF SizeDict
    if not (size.get("height") and size.get("width")):
        raise ValueError(f"the video processor's size {size} has no height and width; this export needs both")
    out["size"] = {"height": int(size["height"]), "width": int(size["width"])}
    if out.get("do_center_crop"):
        raise ValueError("the video processor center-crops frames, which this export does not reproduce")
    return out


def video_pixels(processor: Any, frames: list[Any]) -> Tensor:
    """One video (PIL frames) -> pixel_values_videos of that video: (F, 3, h, w) float32.

    HF's video processor (torchvision) does, per frame: RGB, resize to size (h, w) with `resample`, then a fused
    rescale+normalize `(x - mean/rescale_factor) / (std/rescale_factor)` in float32. Here the same steps run on
    the PIL image processor's backend: resize with PIL's kernel of the same `resample`, then `x·rescale_factor`,
    then `(x - mean) / std`, which is the same affine map up to float rounding (about 1e-7 relative). A frame
    already at (h, w) is not resampled by either (torchvision's resize returns it unchanged), so such frames give
    the same pixels up to that rounding; other frames may differ by the two antialiased bicubic kernels' uint8
    rounding (PIL's versus torchvision's port of it).
    """
    from transformers.image_utils import SizeDict

    s = video_settings(processor)
    ip = processor.image_processor
    h, w = s["size"]["height"], s["size"]["width"]
    out = []
    for frame in frames:
        x = ip.process_image(frame, do_convert_rgb=bool(s["do_convert_rgb"]))  # (3, H, W) uint8
        if s["do_resize"] and tuple(x.shape[-2:]) != (h, w):
            x = ip.resize(x, SizeDict(height=h, width=w), resample=s["resample"])
        if s["do_rescale"]:
            x = ip.rescale(x, float(s["rescale_factor"]))
        if s["do_normalize"]:
            x = ip.normalize(x, s["image_mean"], s["image_std"])
        out.append(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
    return torch.stack(out)


@functools.cache
def processor_class() -> type:
    """`OnevisionProcessor`: HF's `LlavaOnevisionProcessor` (same placeholder expansion, chat template, image
    path) without a video-processor attribute, whose class check needs torchvision in transformers 5; the video
    processor's settings travel as the plain dict `video_config` (saved in processor_config.json)."""
    from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor
    from transformers.processing_utils import ProcessorMixin

    class OnevisionProcessor(LlavaOnevisionProcessor):
        def __init__(
            self,
            image_processor: Any = None,
            tokenizer: Any = None,
            video_config: dict | None = None,
            num_image_tokens: int | None = None,
            vision_feature_select_strategy: str | None = None,
            chat_template: str | None = None,
            image_token: str = "<image>",
            video_token: str = "<video>",
            vision_aspect_ratio: str = "anyres_max_9",
            **kwargs: Any,
        ) -> None:
            self.num_image_tokens = num_image_tokens
            self.vision_feature_select_strategy = vision_feature_select_strategy
            self.image_token = getattr(tokenizer, "image_token", None) or image_token
            self.video_token = getattr(tokenizer, "video_token", None) or video_token
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            self.vision_aspect_ratio = vision_aspect_ratio
            self.video_config = {k: v for k, v in (video_config or {}).items() if k in VIDEO_KEYS}
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return OnevisionProcessor


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


@ADAPTERS.register("llava_onevision")
class LlavaOnevisionAdapter(LlavaAdapter):
    model_types: ClassVar[tuple[str, ...]] = ("llava_onevision",)
    # Qwen2's conversation format (OneVision's decoder), with LLaVA's placeholders
    fallback_template: ClassVar[str] = "<|im_start|>user\n{placeholder}\n{question}<|im_end|>\n<|im_start|>assistant\n"
    sites: ClassVar[frozenset[Site]] = frozenset({Site.PROJECTOR_OUT, Site.DECODER_LAYER, Site.DECODER_MID})
    site_refusals: ClassVar[dict[Site, str]] = {
        Site.VISION_BLOCK: "OneVision's anyres packing and frame pooling need every tile's full patch grid",
        Site.VISION_OUT: "OneVision's anyres packing and frame pooling need every tile's full patch grid",
    }
    encode_image_tokens = VLMAdapter.encode_image_tokens  # no vision-tower sites
    features_at_projector: ClassVar[bool] = False  # the span holds tiles, newlines and unpadding
    # LightCompress's name for this family (its original-repo format; we load the HF twin).
    lightcompress_types: ClassVar[tuple[str, ...]] = ("Llava_OneVision",)
    rope: ClassVar[str] = "1d"
    quant_include: ClassVar[tuple[str, ...]] = ("model.language_model",)
    quant_ignore: ClassVar[tuple[str, ...]] = ("lm_head", "vision_tower", "multi_modal_projector", "image_newline")
    parity_tolerance: ClassVar[tuple[float, float]] = (1e-4, 1e-3)
    input_names: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask", "pixel_values", "image_sizes")
    fixed_value_inputs: ClassVar[tuple[str, ...]] = ("image_sizes",)
    resize_to_compiled: ClassVar[bool] = True
    supports_video: ClassVar[bool] = True
    model_class_name: ClassVar[str] = "LlavaOnevisionForConditionalGeneration"

    # --- config only ----------------------------------------------------------------------------------
    def input_names_for(self, geom: Geometry) -> tuple[str, ...]:
        return VIDEO_INPUTS if geom.media == "video" else self.input_names

    def default_image_size(self, config: Any, processor: Any | None) -> tuple[int, int]:
        S, _ = _tile_side(config)
        return (S, S)

    def image_token_id(self, config: Any, geom: Geometry) -> int:
        return int(config.video_token_id if geom.media == "video" else config.image_token_id)

    def geometry(self, config: Any, image_size: tuple[int, int] | None, video_frames: int | None = None) -> Geometry:
        if config.vision_feature_select_strategy != "full":
            raise ValueError(f"vision_feature_select_strategy '{config.vision_feature_select_strategy}' drops a SigLIP "
                             "patch, which OneVision's packing cannot take; only 'full' checkpoints compile")
        S, p = _tile_side(config)
        if video_frames is not None:
            if image_size is not None and tuple(image_size) != (S, S):
                raise ValueError(f"a video export runs at the vision tower's {S}x{S}; set inputs.image_size to "
                                 f"[{S}, {S}] or remove it")
            q = math.ceil(p / 2)
            size, media, n_image = (S, S), "video", video_frames * q * q + 1
            vision_images, layout, frame_tokens = int(video_frames), (int(video_frames), q, q), q * q
        else:
            size = tuple(image_size) if image_size is not None else (S, S)
            lay = anyres_layout(config, size)
            media, n_image, vision_images, frame_tokens = "image", lay.n_tokens, lay.n_tiles, 0
            layout = lay.grid
        return self._geometry(config, size, n_image, p * p, media=media, vision_images=vision_images,
                              layout=tuple(int(v) for v in layout), frame_tokens=frame_tokens)

    # --- prefill inputs -> features ----------------------------------------------------------------------
    def encode_images(self, model: nn.Module, inputs: dict[str, Tensor], geom: Geometry) -> Tensor:
        if geom.media == "video":
            return self.encode_video(model, inputs["pixel_values_videos"], geom)
        return self.encode_anyres(model, inputs["pixel_values"], geom)

    def _tile_features(self, model: nn.Module, pixels: Tensor) -> Tensor:
        """pixels (M, 3, S, S) -> projected features (M, p·p, D)."""
        return self.project_features(model, self.vision_features(model, pixels))

    def encode_anyres(self, model: nn.Module, pixel_values: Tensor, geom: Geometry) -> Tensor:
        """pixel_values (B, P, 3, S, S) -> image features (B, N, D) packed as HF's `pack_image_features`."""
        lay = anyres_layout(model.config, geom.image_size)
        B, p = pixel_values.shape[0], lay.side
        gh, gw = lay.grid
        tiles = pixel_values[:, : lay.n_tiles]  # (B, 1+gh·gw, 3, S, S): the processor pads no further at this size
        x = self._tile_features(model, tiles.flatten(0, 1))  # (B·(1+gh·gw), p·p, D)
        D = x.shape[-1]
        x = x.unflatten(0, (B, lay.n_tiles))  # (B, 1+gh·gw, p·p, D)
        base = x[:, 0]  # (B, p·p, D)
        grid = x[:, 1:].reshape(B, gh, gw, p, p, D).permute(0, 5, 1, 3, 2, 4).reshape(B, D, gh * p, gw * p)
        grid = grid[:, :, lay.rows[0] : lay.rows[1], lay.cols[0] : lay.cols[1]]  # (B, D, uh, uw) unpadded
        if lay.downsample:
            grid = F.interpolate(grid, size=lay.out, mode="bilinear")  # (B, D, h, w)
        h = lay.out[0]
        newline = model.model.image_newline.to(grid.dtype)[None, :, None, None].expand(B, D, h, 1)
        grid = torch.cat([grid, newline], dim=3)  # (B, D, h, w+1)
        return torch.cat([base, grid.flatten(2).transpose(1, 2)], dim=1)  # (B, p·p + h·(w+1), D)

    def encode_video(self, model: nn.Module, pixel_values_videos: Tensor, geom: Geometry) -> Tensor:
        """pixel_values_videos (B, F, 3, S, S) -> video features (B, F·q·q + 1, D) as HF's `get_video_features`."""
        B, n_frames = pixel_values_videos.shape[:2]
        _, p = _tile_side(model.config)
        q = math.ceil(p / 2)
        x = self._tile_features(model, pixel_values_videos.flatten(0, 1))  # (B·F, p·p, D)
        D = x.shape[-1]
        x = x.reshape(B * n_frames, p, p, D).permute(0, 3, 1, 2)  # (B·F, D, p, p)
        x = F.interpolate(x, size=(q, q), mode="bilinear")  # (B·F, D, q, q): HF's apply_pooling
        x = x.permute(0, 2, 3, 1).reshape(B, n_frames * q * q, D)
        newline = model.model.image_newline.to(x.dtype)[None, None, :].expand(B, 1, D)
        return torch.cat([x, newline], dim=1)  # (B, F·q·q + 1, D)

    # --- host side --------------------------------------------------------------------------------------
    def load_processor(self, path: str, trust_remote_code: bool = False) -> Any:
        """`OnevisionProcessor` from a directory saved by it or by HF's `LlavaOnevisionProcessor` (whose video
        processor settings are then read from video_preprocessor_config.json): PIL image processing, no
        torchvision."""
        from transformers import LlavaOnevisionImageProcessorPil

        d = Path(path)
        image_processor = LlavaOnevisionImageProcessorPil.from_pretrained(path, local_files_only=True)
        saved = _read_json(d / "processor_config.json")
        kwargs: dict[str, Any] = {}
        if not saved.get("video_config"):
            video = _read_json(d / "video_preprocessor_config.json")
            kwargs["video_config"] = {k: video[k] for k in VIDEO_KEYS if k in video}
        return processor_class().from_pretrained(path, image_processor=image_processor, local_files_only=True,
                                                 trust_remote_code=trust_remote_code, **kwargs)

    def prepare_images(self, images: list[Any], geom: Geometry) -> list[Any]:
        """Images: resized to the compiled resolution. Videos (lists of PIL frames): checked for the compiled
        frame count; frames are resized by `process`, as the video processor would."""
        if geom.media != "video":
            return super().prepare_images(images, geom)
        out = []
        for video in images:
            frames = list(video)
            if len(frames) != geom.vision_images:
                raise ValueError(f"this export takes videos of exactly {geom.vision_images} frames, got one of "
                                 f"{len(frames)}; sample {geom.vision_images} frames from it")
            out.append([f.convert("RGB") for f in frames])
        return out

    def random_media(self, rng: Any, n: int, geom: Geometry) -> list[Any]:
        from tokcompile.parity import random_images

        if geom.media != "video":
            return random_images(rng, n, geom.image_size)
        return [random_images(rng, geom.vision_images, geom.image_size) for _ in range(n)]

    def process(self, processor: Any, media: list[Any], prompts: list[str], geom: Geometry) -> dict[str, Any]:
        """Images: the processor itself. Videos: frames through `video_pixels`, then the processor's own
        placeholder expansion (`replace_video_token`) and tokenizer (left padding)."""
        if geom.media != "video":
            return processor(images=media, text=prompts, return_tensors="pt", padding=True)
        pixels = torch.stack([video_pixels(processor, frames) for frames in media])  # (B, F, 3, S, S)
        videos = {"pixel_values_videos": pixels}
        expanded = [processor.replace_video_token(videos, video_idx=i) for i in range(len(media))]
        text, _ = processor.get_text_with_replacements(list(prompts), [], expanded, [])
        out = dict(processor.tokenizer(text, return_tensors="pt", padding=True))
        out["pixel_values_videos"] = pixels
        return out
