"""Qwen2-VL and Qwen2.5-VL in HF format (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`).

Native-resolution ViT -> 2x2 patch merger -> image features spliced at the `<|image_pad|>` placeholders of a
Qwen2 decoder with 3-row M-RoPE. A recipe fixes the image resolution, which fixes the patch grid
`image_grid_thw`, the image-token count and everything HF derives from the grid at run time with data-dependent
code (`tolist`, `repeat_interleave`, Python loops):

- the vision tower's rotary (row, column) position of every patch;
- Qwen2.5-VL's window permutation, its block-diagonal window mask and the reverse permutation after the merger;
- the M-RoPE (t, h, w) offsets of the image tokens.

These are computed here on the host, in Python, for the fixed grid, and enter the graph as constants. In the
graph the vision blocks run batched per image (B, S, Dv) with this module's own attention over each block's
modules (HF's splits the packed sequence by `cu_seqlens.tolist()`, which cannot export), and the prompt's
M-RoPE positions come from `attention_mask`, the image span's start and the constant offset table.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from tokcompile.errors import RecipeError
from tokcompile.models.base import Inputs, VLMAdapter
from tokcompile.models.geometry import Geometry
from tokcompile.models.registry import ADAPTERS
from tokcompile.reduce.context import VisionContext
from tokcompile.reduce.schedule import Site
from tokcompile.reduce.state import ImageTokens

if TYPE_CHECKING:
    from tokcompile.models.reduced import VisionSteps

# The image processors of the released Qwen2-VL / Qwen2.5-VL checkpoints keep an image unresized only when its
# area lies in [min_pixels, max_pixels] (preprocessor_config.json of the Instruct checkpoints).
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 16384
# Default resolution: this many merged tokens per side (448x448 at patch 14: 256 image tokens).
DEFAULT_MERGED_SIDE = 16


# --- host-side constants for one fixed patch grid ------------------------------------------------------------------


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


@functools.lru_cache(maxsize=16)
def vision_positions(t: int, h: int, w: int, merge: int) -> np.ndarray:
    """(row, column) of every patch in the processor's order, merge-block-major: (t·h·w, 2) int64.

    The processor emits patches block by block (each merge×merge block contiguous, blocks row-major), which is
    the order the vision tower's rotary embedding and the merger assume.
    """
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")  # (h, w) each
    blocks = (h // merge, merge, w // merge, merge)
    rows = rows.reshape(blocks).transpose(0, 2, 1, 3).reshape(-1)  # (h·w,)
    cols = cols.reshape(blocks).transpose(0, 2, 1, 3).reshape(-1)
    return _readonly(np.tile(np.stack([rows, cols], axis=-1), (t, 1)).astype(np.int64))  # (t·h·w, 2)


@functools.lru_cache(maxsize=16)
def window_layout(t: int, h: int, w: int, merge: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2.5-VL's window attention for one grid.

    Args:
        t, h, w: the patch grid.
        merge: spatial merge size.
        window: window side in merged tokens (vision_config.window_size // merge // patch_size).

    Returns:
        window_index: (t·h·w / merge²,) merged-token order grouped by window (row-major windows, row-major
            within a window; edge windows are smaller), as HF's `get_vision_window_index` orders it.
        window_id: (t·h·w / merge²,) the window of each merged token, in that order.
    """
    lh, lw = h // merge, w // merge
    n_wh, n_ww = -(-lh // window), -(-lw // window)
    order, ids = [], []
    for f in range(t):
        for wr in range(n_wh):
            for wc in range(n_ww):
                wid = (f * n_wh + wr) * n_ww + wc
                for r in range(wr * window, min((wr + 1) * window, lh)):
                    for c in range(wc * window, min((wc + 1) * window, lw)):
                        order.append((f * lh + r) * lw + c)
                        ids.append(wid)
    return _readonly(np.array(order, dtype=np.int64)), _readonly(np.array(ids, dtype=np.int64))


@functools.lru_cache(maxsize=16)
def window_mask(t: int, h: int, w: int, merge: int, window: int) -> np.ndarray:
    """(S, S) bool block-diagonal mask over patches in window order: True within the same window."""
    per_patch = np.repeat(window_layout(t, h, w, merge, window)[1], merge * merge)  # (S,)
    return _readonly(per_patch[:, None] == per_patch[None, :])


@functools.lru_cache(maxsize=16)
def mrope_table(t: int, h: int, w: int, merge: int) -> np.ndarray:
    """M-RoPE offsets (t, h, w) of the image tokens from the image's first position: (t·h·w / merge², 3) int64."""
    lt, lh, lw = t, h // merge, w // merge
    tt, hh, ww = np.meshgrid(np.arange(lt), np.arange(lh), np.arange(lw), indexing="ij")
    return _readonly(np.stack([tt, hh, ww], axis=-1).reshape(-1, 3).astype(np.int64))


def processor_size(h: int, w: int, factor: int) -> tuple[int, int]:
    """The size Qwen's image processor resizes an h x w image to (its `smart_resize`): both sides multiples of
    `factor`, the area within [MIN_PIXELS, MAX_PIXELS], the aspect ratio kept as closely as possible."""
    rh, rw = round(h / factor) * factor, round(w / factor) * factor
    if rh * rw > MAX_PIXELS:
        beta = math.sqrt(h * w / MAX_PIXELS)
        rh = max(factor, math.floor(h / beta / factor) * factor)
        rw = max(factor, math.floor(w / beta / factor) * factor)
    elif rh * rw < MIN_PIXELS:
        beta = math.sqrt(MIN_PIXELS / (h * w))
        rh, rw = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return rh, rw


# --- processors without torchvision ----------------------------------------------------------------------------------


@functools.cache
def images_only_processor_class(family: str) -> type:
    """HF's processor class for `family` without its video processor, which needs torchvision.

    The subclass takes (image_processor, tokenizer, chat_template) and carries HF's class name, so what it saves
    names HF's processor. It also saves the image processor alone (preprocessor_config.json), as the released
    checkpoints do: that file is where HF builds the video processor from when no video processor config exists.
    """
    from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor, Qwen3VLProcessor

    base = {"qwen2_vl": Qwen2VLProcessor, "qwen2_5_vl": Qwen2_5_VLProcessor, "qwen3_vl": Qwen3VLProcessor}[family]

    def __init__(self: Any, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None,
                 **kwargs: Any) -> None:
        # ProcessorMixin pairs positional sub-processors with this class's (image_processor, tokenizer): the
        # video processor slot (None) is dropped.
        base.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    def save_pretrained(self: Any, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        files = base.save_pretrained(self, save_directory, *args, **kwargs)
        self.image_processor.save_pretrained(save_directory)
        return files

    return type(base.__name__, (base,), {
        "__init__": __init__, "save_pretrained": save_pretrained, "__module__": __name__,
        "__doc__": f"{base.__name__} for images only (no torchvision).",
    })


def _chat_template(path: Path, tokenizer: Any) -> str | None:
    """The chat template saved with a processor: chat_template.jinja, chat_template.json, processor_config.json,
    or the tokenizer's own."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in ("chat_template.json", "processor_config.json"):
        f = path / name
        if f.is_file():
            template = json.loads(f.read_text(encoding="utf-8")).get("chat_template")
            if template:
                return template
    return getattr(tokenizer, "chat_template", None)


# --- the adapter -------------------------------------------------------------------------------------------------


def _vision_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Vision RoPE as HF applies it (in fp32): q, k (B, S, Hv, dv); cos, sin (S, dv)."""
    cos, sin = cos[:, None].float(), sin[:, None].float()  # (S, 1, dv)

    def rot(x: Tensor) -> Tensor:
        xf = x.float()
        x1, x2 = xf.chunk(2, dim=-1)
        return (xf * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)

    return rot(q), rot(k)


def vision_attention(attn: nn.Module, x: Tensor, cos: Tensor, sin: Tensor,
                     mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """One vision block's attention over each image's own patches, from the block's qkv and proj modules:
    (output (B, S, Dv), its queries and keys (B, Hv, S, dv) after RoPE).

    Args:
        attn: the block's HF attention module (qkv, proj, num_heads, scaling).
        x: (B, S, Dv) normed hidden states.
        cos, sin: (S, dv) vision rotary tables.
        mask: (S, S) bool, True where attention is allowed (window blocks), or None (every patch of the image).
    """
    B, S, _ = x.shape
    qkv = attn.qkv(x).view(B, S, 3, attn.num_heads, -1)  # (B, S, 3, Hv, dv)
    q, k, v = qkv.unbind(2)  # (B, S, Hv, dv) each
    q, k = _vision_rope(q, k, cos, sin)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, Hv, S, dv)
    out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)  # (B, Hv, S, dv)
    return attn.proj(out.transpose(1, 2).reshape(B, S, -1)), q, k  # (B, S, Dv)


@ADAPTERS.register("qwen2_vl")
class Qwen2VLAdapter(VLMAdapter):
    model_types: ClassVar[tuple[str, ...]] = ("qwen2_vl",)
    lightcompress_types: ClassVar[tuple[str, ...]] = ("Qwen2VL",)
    sites: ClassVar[frozenset[Site]] = frozenset({Site.PROJECTOR_OUT, Site.DECODER_LAYER, Site.DECODER_MID})
    site_refusals: ClassVar[dict[Site, str]] = {
        Site.VISION_BLOCK: "Qwen's 2x2 patch merger needs the full patch grid (and Qwen2.5-VL's window attention "
                           "a fixed window layout), so tokens cannot leave inside the vision tower",
        Site.VISION_OUT: "Qwen's 2x2 patch merger needs the full patch grid of the tower's output",
    }
    rope: ClassVar[str] = "mrope"
    tower_at_projector: ClassVar[bool] = True
    quant_include: ClassVar[tuple[str, ...]] = ("model.language_model",)
    quant_ignore: ClassVar[tuple[str, ...]] = ("lm_head", "visual", "merger")
    parity_tolerance: ClassVar[tuple[float, float]] = (1e-4, 1e-3)
    input_names: ClassVar[tuple[str, ...]] = (
        "input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids",
    )
    fixed_value_inputs: ClassVar[tuple[str, ...]] = ("image_grid_thw",)
    resize_to_compiled: ClassVar[bool] = True
    model_class_name: ClassVar[str] = "Qwen2VLForConditionalGeneration"
    family: ClassVar[str] = "qwen2_vl"
    placeholders: ClassVar[dict[str, str]] = {
        "image": "<|vision_start|><|image_pad|><|vision_end|>",
        "video": "<|vision_start|><|video_pad|><|vision_end|>",
    }
    fallback_template: ClassVar[str] = "<|im_start|>user\n{placeholder}{question}<|im_end|>\n<|im_start|>assistant\n"

    # --- config only ----------------------------------------------------------------------------------
    @staticmethod
    def _factor(config: Any) -> int:
        vc = config.vision_config
        return int(vc.patch_size) * int(vc.spatial_merge_size)

    def _vision_dims(self, config: Any) -> tuple[int, int]:
        """(width, FFN size) of the vision blocks."""
        vc = config.vision_config
        return int(vc.embed_dim), int(vc.embed_dim * vc.mlp_ratio)

    def default_image_size(self, config: Any, processor: Any | None) -> tuple[int, int]:
        """The vision config's own `image_size` when it declares one (the built-in tiny models do), else
        DEFAULT_MERGED_SIDE merged tokens per side (448x448 for the released checkpoints)."""
        declared = getattr(config.vision_config, "image_size", None)
        if declared:
            return (declared, declared) if isinstance(declared, int) else (int(declared[0]), int(declared[1]))
        side = DEFAULT_MERGED_SIDE * self._factor(config)
        return side, side

    def check_image_size(self, config: Any, size: tuple[int, int]) -> None:
        """Raise ValueError (one line naming the fix) unless the image processor keeps `size` unchanged."""
        f = self._factor(config)
        h, w = int(size[0]), int(size[1])
        if h <= 0 or w <= 0 or max(h, w) / min(h, w) > 200:
            side = DEFAULT_MERGED_SIDE * f
            raise ValueError(f"{h}x{w} is not an image size the processor accepts (positive sides, aspect ratio "
                             f"at most 200); set inputs.image_size to e.g. [{side}, {side}]")
        kept = processor_size(h, w, f)
        if kept != (h, w):
            vc = config.vision_config
            why = (f"is not a multiple of {f} (patch_size {vc.patch_size} x spatial_merge_size "
                   f"{vc.spatial_merge_size}) on each side" if h % f or w % f else
                   f"has {h * w} pixels, outside the processor's {MIN_PIXELS}..{MAX_PIXELS} (min_pixels..max_pixels)")
            raise ValueError(f"{h}x{w} {why}, so the image processor would resize it; "
                             f"set inputs.image_size to [{kept[0]}, {kept[1]}]")

    def image_token_id(self, config: Any, geom: Geometry) -> int:
        return int(config.image_token_id)

    def geometry(self, config: Any, image_size: tuple[int, int] | None, video_frames: int | None = None) -> Geometry:
        vc, tc = config.vision_config, config.text_config
        size = tuple(image_size) if image_size is not None else self.default_image_size(config, None)
        self.check_image_size(config, size)
        p, m = int(vc.patch_size), int(vc.spatial_merge_size)
        grid = (1, size[0] // p, size[1] // p)  # (t, h, w) patches; one image is one temporal patch
        patches = grid[0] * grid[1] * grid[2]
        heads = tc.num_attention_heads
        width, ffn = self._vision_dims(config)
        return Geometry(
            family=self.family,
            n_layers=tc.num_hidden_layers,
            hidden_size=tc.hidden_size,
            intermediate_size=tc.intermediate_size,
            n_heads=heads,
            n_kv_heads=getattr(tc, "num_key_value_heads", None) or heads,
            head_dim=tc.hidden_size // heads,  # HF's Qwen2-VL attention ignores config.head_dim
            vocab_size=tc.vocab_size,
            image_size=(int(size[0]), int(size[1])),
            n_image_tokens=patches // (m * m),
            vision_layers=vc.depth,
            vision_hidden_size=width,
            vision_intermediate_size=ffn,
            vision_heads=vc.num_heads,
            vision_tokens=patches,
            rope="mrope",
            layout=grid,
        )

    def input_axes(self, geom: Geometry) -> dict[str, dict[int, str | tuple[str, int]]]:
        return {
            "input_ids": {0: "batch", 1: "prompt_len"},
            "attention_mask": {0: "batch", 1: "prompt_len"},
            "pixel_values": {0: ("batch", geom.vision_tokens)},  # (B·S, C·tps·p·p): S patches per image
            "image_grid_thw": {0: "batch"},
            "mm_token_type_ids": {0: "batch", 1: "prompt_len"},
        }

    # --- vision tower -------------------------------------------------------------------------------------
    def _window_mask(self, config: Any, geom: Geometry) -> tuple[np.ndarray, np.ndarray] | None:
        """(permutation of merged tokens, (S, S) bool window mask in that order), or None without windows."""
        return None

    def encode_images(self, model: nn.Module, inputs: Inputs, geom: Geometry) -> Tensor:
        return self.vision_features(model, inputs["pixel_values"], self._batch(inputs), geom)[0]

    @staticmethod
    def _batch(inputs: Inputs) -> Any:
        """The batch size, from `image_grid_thw` (B, 3): the exported batch symbol itself. Dividing pixel_values'
        (B·S) rows by S gives an expression the export cannot prove different from 1, and a later broadcast
        over it would pin the batch."""
        return inputs["image_grid_thw"].shape[0]

    def encode_image_tokens(self, model: nn.Module, inputs: Inputs, geom: Geometry,
                            steps: VisionSteps | None = None) -> ImageTokens:
        """The merged image features with the tower's last block for the first projector step."""
        B = self._batch(inputs)
        feats, tower, groups = self.vision_features(model, inputs["pixel_values"], B, geom)  # (B, N, D)
        source = torch.arange(feats.shape[1], device=feats.device)[None].expand(B, -1)  # (B, N)
        return ImageTokens(feats, source, tower=(tower, groups))

    def vision_features(self, model: nn.Module, pixel_values: Tensor, batch: int,
                        geom: Geometry) -> tuple[Tensor, VisionContext, Tensor]:
        """pixel_values (B·S, C·tps·p·p) -> (merged image features (B, N, D) in the processor's token order, the
        last block's attention as it ran over the S tower tokens (window order on Qwen2.5-VL), (S,) the image
        token each tower token became)."""
        visual = model.model.visual
        cfg = model.config.vision_config
        m = int(cfg.spatial_merge_size)
        S, N = geom.vision_tokens, geom.n_image_tokens
        t, h, w = geom.layout
        dev = pixel_values.device  # constants live where the graph runs
        pos = torch.from_numpy(vision_positions(t, h, w, m).copy()).to(dev)  # (S, 2) constant
        windows = self._window_mask(model.config, geom)
        x = visual.patch_embed(pixel_values)  # (B·S, Dv): every patch on its own
        x = x.reshape(batch, S, -1)  # (B, S, Dv)
        mask = None
        if windows is not None:
            order, allowed = windows
            unit = torch.from_numpy(order.copy()).to(dev)  # (N,) merged tokens grouped by window
            x = x.reshape(batch, N, m * m, -1)[:, unit].reshape(batch, S, -1)  # (B, S, Dv) window order
            pos = pos.reshape(N, m * m, 2)[unit].reshape(S, 2)  # (S, 2): rotary follows its patch
            mask = torch.from_numpy(allowed.copy()).to(dev)  # (S, S) bool
        cos, sin = visual.rotary_pos_emb(x, pos)  # (S, dv) each, HF's own rotary module
        full = set(getattr(cfg, "fullatt_block_indexes", None) or ())
        for i, blk in enumerate(visual.blocks):
            block_mask = None if i in full else mask
            out, q, k = vision_attention(blk.attn, blk.norm1(x), cos, sin, block_mask)
            x = x + out
            x = x + blk.mlp(blk.norm2(x))  # (B, S, Dv)
        merger = visual.merger
        feats = merger.mlp(merger.ln_q(x).reshape(batch, N, -1))  # (B, N, D)
        groups = torch.arange(S, device=dev) // (m * m)  # (S,) each tower token's merged token, tower order
        if windows is not None:
            reverse = torch.from_numpy(np.argsort(windows[0]).copy()).to(dev)  # (N,) back to the processor's order
            feats = feats[:, reverse]
            groups = torch.from_numpy(windows[0].copy()).to(dev)[groups]  # (S,) its index in the processor order
        last = VisionContext(len(visual.blocks) - 1, q, k, key_mask=block_mask)
        return feats, last, groups

    # --- M-RoPE ----------------------------------------------------------------------------------------
    def initial_positions(self, inputs: Inputs, image_start: Tensor, geom: Geometry) -> Tensor:
        """M-RoPE positions (B, T, 3) of the prompt, as HF's `get_rope_index` gives them on real tokens.

        Text before the image counts real tokens (0, 1, ...; left or right padding); the image's tokens sit at
        the image's first position plus the constant (t, h, w) table; text after the image continues from that
        position plus max(grid h, grid w) / merge. Padding gets 0 (never attended).
        """
        mask = inputs["attention_mask"].long()  # (B, T)
        B, T = mask.shape
        N = geom.n_image_tokens
        t, h, w = geom.layout
        m = math.isqrt(geom.vision_tokens // N)  # spatial merge size: S patches make N tokens
        table = torch.from_numpy(mrope_table(t, h, w, m).copy()).to(mask.device)  # (N, 3) constant
        span = max(h, w) // m  # how far text after the image moves on, as HF advances it
        rank = mask.cumsum(1) - 1  # (B, T) index among real tokens
        start = rank.gather(1, image_start[:, None].long())  # (B, 1) real-token index of the image's start
        rel = torch.arange(T, device=mask.device)[None] - image_start[:, None]  # (B, T)
        in_image = (rel >= 0) & (rel < N)  # (B, T)
        text = torch.where(rel >= N, rank + (span - N), rank)  # (B, T)
        image = start[:, :, None] + table[rel.clamp(0, N - 1)]  # (B, T, 3)
        pos = torch.where(in_image[..., None], image, text[..., None].expand(B, T, 3))  # (B, T, 3)
        return pos.masked_fill(mask[..., None] == 0, 0)

    def decode_positions(self, position_ids: Tensor) -> Tensor:
        """(B, 1) -> (B, 1, 3): generated text tokens sit at the same position in all three rows."""
        return position_ids[..., None].expand(-1, -1, 3)

    def rotary(self, model: nn.Module, hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """HF's text rotary embedding for positions (B, T, 3): it takes (3, B, T) and interleaves the rows by
        `mrope_section`, so (cos, sin) come back (B, T, d) as the decoder layers take them."""
        # HF's attention then applies plain rotate-half RoPE with these, so the base `last_query` fits as is.
        return self.language_model(model).rotary_emb(hidden, positions.permute(2, 0, 1))

    # --- host side ------------------------------------------------------------------------------------
    def load_processor(self, path: str, trust_remote_code: bool = False) -> Any:
        """`AutoProcessor`, or where it fails (without torchvision, Qwen's processors cannot build their video
        processor) the same processor assembled from the PIL image processor, the tokenizer and the chat
        template saved in `path`."""
        try:
            return super().load_processor(path, trust_remote_code)
        except (ImportError, AttributeError, OSError, ValueError, TypeError, KeyError) as first:
            from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

            try:
                image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, local_files_only=True)
                tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                          local_files_only=True)
            except (OSError, ValueError) as e:
                raise ValueError(f"{e} (AutoProcessor also failed: {first})") from None
            cls = images_only_processor_class(self.family)
            return cls(image_processor=image_processor, tokenizer=tokenizer,
                       chat_template=_chat_template(Path(path), tokenizer))

    def process(self, processor: Any, media: list[Any], prompts: list[str], geom: Geometry) -> dict[str, Any]:
        out = super().process(processor, media, prompts, geom)
        want = list(geom.layout)
        for row in out["image_grid_thw"].tolist():
            if row != want:
                size = getattr(processor.image_processor, "size", None)
                lo, hi = getattr(size, "shortest_edge", None), getattr(size, "longest_edge", None)
                raise RecipeError(
                    "inputs.image_size",
                    f"the image processor turns {geom.image_size[0]}x{geom.image_size[1]} images into the patch grid "
                    f"{row}, not {want}: its pixel range ({lo}..{hi}, min_pixels..max_pixels) excludes this size; "
                    "choose an image size inside it",
                )
        return out

    def hf_position_ids(self, model: nn.Module, sample: Inputs) -> Tensor:
        """HF's `get_rope_index` for one unpadded sample: (3, 1, T)."""
        pos, _ = model.model.get_rope_index(
            sample["input_ids"], sample["mm_token_type_ids"], image_grid_thw=sample["image_grid_thw"],
            attention_mask=sample["attention_mask"],
        )
        return pos


@ADAPTERS.register("qwen2_5_vl")
class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    model_types: ClassVar[tuple[str, ...]] = ("qwen2_5_vl",)
    lightcompress_types: ClassVar[tuple[str, ...]] = ("Qwen2_5VL",)
    model_class_name: ClassVar[str] = "Qwen2_5_VLForConditionalGeneration"
    family: ClassVar[str] = "qwen2_5_vl"

    def _vision_dims(self, config: Any) -> tuple[int, int]:
        vc = config.vision_config
        return int(vc.hidden_size), int(vc.intermediate_size)

    def _window_mask(self, config: Any, geom: Geometry) -> tuple[np.ndarray, np.ndarray] | None:
        vc = config.vision_config
        m = int(vc.spatial_merge_size)
        window = int(vc.window_size) // m // int(vc.patch_size)
        return window_layout(*geom.layout, m, window)[0], window_mask(*geom.layout, m, window)
