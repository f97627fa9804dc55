"""LLaVA-NeXT (LLaVA-1.6) in HF format (`LlavaNextForConditionalGeneration`, model_type "llava_next").

Anyres tiling: the processor resizes an image into the best-fitting grid pinpoint, cuts it into square tiles
and adds a base tile (the whole image at tile size). Every tile runs through the CLIP tower and the projector
as in LLaVA-1.5. HF then packs one image as: the base tile's features, followed by the grid tiles' features
reassembled into one feature map, cropped back to the image's aspect ratio ("unpadding") and read row by row
with the learned `image_newline` after each row.

A recipe fixes the image size, which fixes the pinpoint, the grid, the unpadding window and so the token
count. The packing is then one gather with a constant index computed on the host (`unpad_index`); images of
another size are resized to the compiled size before the processor (`resize_to_compiled`), so the
processor's `image_sizes` always equals the compiled size (`fixed_value_inputs`).

The anyres helpers are plain functions of integers, shared with other anyres families.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from tokcompile.models.base import VLMAdapter
from tokcompile.models.geometry import Geometry
from tokcompile.models.llava import LlavaAdapter
from tokcompile.models.registry import ADAPTERS
from tokcompile.reduce.schedule import Site

Pinpoints = tuple[tuple[int, int], ...]


def best_pinpoint(image_size: tuple[int, int], pinpoints: Pinpoints) -> tuple[int, int]:
    """The (height, width) pinpoint an image of `image_size` (height, width) is resized into.

    The pinpoint that keeps the most of the image's pixels after an aspect-preserving resize wins; ties go to
    the one with the least padding, then to the first listed (HF's `select_best_resolution`).
    """
    h, w = image_size
    best, best_effective, best_wasted = None, 0, math.inf
    for ph, pw in pinpoints:
        scale = min(pw / w, ph / h)
        effective = min(int(w * scale) * int(h * scale), w * h)
        wasted = ph * pw - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (int(ph), int(pw)), effective, wasted
    if best is None:
        raise ValueError("the model config lists no image_grid_pinpoints")
    return best


def best_grid(image_size: tuple[int, int], pinpoints: Pinpoints, tile: int) -> tuple[int, int]:
    """(rows, cols) of `tile`-pixel tiles that cover the chosen pinpoint (base tile not included)."""
    ph, pw = best_pinpoint(image_size, pinpoints)
    return ph // tile, pw // tile


def unpad_window(image_size: tuple[int, int], rows: int, cols: int) -> tuple[int, int, int, int]:
    """The part of a (rows, cols) feature map that shows the image rather than the pinpoint's padding.

    The image was resized to fit the pinpoint and centred; the axis with padding loses the same number of
    feature rows (or columns) at both ends (HF's `unpad_image`, in the same float arithmetic).

    Returns:
        (row_start, row_end, col_start, col_end), end exclusive.
    """
    h, w = image_size
    if w / h > cols / rows:
        new_rows = int(round(h * (cols / w), 7))
        pad = (rows - new_rows) // 2
        return pad, rows - pad, 0, cols
    new_cols = int(round(w * (rows / h), 7))
    pad = (cols - new_cols) // 2
    return 0, rows, pad, cols - pad


def unpad_index(
    grid: tuple[int, int], side: int, window: tuple[int, int, int, int], first_tile: int, newline: int | None
) -> list[int]:
    """Rows of a flat feature table (tile t's token (i, j) at row t·side² + i·side + j) in HF's packing order
    for the grid tiles: the unpadded feature map read row by row, `newline` (a table row) after each row.

    Args:
        grid: (rows, cols) of grid tiles, stored from table tile `first_tile` on in row-major order.
        side: feature rows (= columns) per tile (tile size // patch size).
        window: `unpad_window` of the (rows·side, cols·side) feature map.
        first_tile: table tile of grid tile (0, 0) (1 when the base tile comes first).
        newline: table row of the newline embedding, or None for no newline tokens.
    """
    r0, r1, c0, c1 = window
    cols = grid[1]
    index: list[int] = []
    for r in range(r0, r1):
        tile_row, i = divmod(r, side)
        for c in range(c0, c1):
            tile_col, j = divmod(c, side)
            tile = first_tile + tile_row * cols + tile_col
            index.append(tile * side * side + i * side + j)
        if newline is not None:
            index.append(newline)
    return index


@dataclass(frozen=True)
class AnyresLayout:
    """One image's anyres packing at a fixed size.

    Args:
        image_size: (height, width) the layout is computed for.
        pinpoint: the chosen grid pinpoint (height, width).
        grid: (rows, cols) of grid tiles.
        side: feature rows (= columns) per tile.
        window: the unpadded feature window (row_start, row_end, col_start, col_end).
    """

    image_size: tuple[int, int]
    pinpoint: tuple[int, int]
    grid: tuple[int, int]
    side: int
    window: tuple[int, int, int, int]

    @property
    def n_tiles(self) -> int:
        """Tiles through the vision tower: the base tile plus the grid."""
        return 1 + self.grid[0] * self.grid[1]

    @property
    def kept(self) -> tuple[int, int]:
        """(rows, cols) of the unpadded feature map."""
        r0, r1, c0, c1 = self.window
        return r1 - r0, c1 - c0

    @property
    def n_tokens(self) -> int:
        """Image tokens: the base tile's features, then the unpadded map with a newline per row."""
        rows, cols = self.kept
        return self.side * self.side + rows * (cols + 1)

    def index(self) -> list[int]:
        """The packing as rows of the table [tile 0 (base), tiles 1.. (grid), newline]: (n_tokens,)."""
        p = self.side * self.side
        return list(range(p)) + unpad_index(self.grid, self.side, self.window, 1, self.n_tiles * p)


def anyres_layout(image_size: tuple[int, int], pinpoints: Pinpoints, tile: int, patch: int) -> AnyresLayout:
    """The layout of an image of `image_size` (height, width); ValueError (naming the fix) when it has none."""
    h, w = int(image_size[0]), int(image_size[1])
    if h < 1 or w < 1:
        raise ValueError(f"image size {h}x{w} is empty; set inputs.image_size to a positive [height, width]")
    bad = [p for p in pinpoints if p[0] % tile or p[1] % tile]
    if bad:
        raise ValueError(f"the model's grid pinpoint {list(bad[0])} is not a multiple of its {tile}-px tile")
    side = tile // patch
    pinpoint = best_pinpoint((h, w), pinpoints)
    grid = (pinpoint[0] // tile, pinpoint[1] // tile)
    window = unpad_window((h, w), grid[0] * side, grid[1] * side)
    layout = AnyresLayout((h, w), pinpoint, grid, side, window)
    if min(layout.kept) < 1:
        raise ValueError(
            f"image size {h}x{w} is so elongated that no feature row or column survives unpadding; "
            "set inputs.image_size closer to one of the grid pinpoints "
            f"({', '.join(f'{a}x{b}' for a, b in pinpoints)})"
        )
    return layout


def _pinpoints(config: Any) -> Pinpoints:
    return tuple((int(p[0]), int(p[1])) for p in config.image_grid_pinpoints)


@lru_cache(maxsize=32)
def _cached_layout(image_size: tuple[int, int], pinpoints: Pinpoints, tile: int, patch: int) -> AnyresLayout:
    return anyres_layout(image_size, pinpoints, tile, patch)


def layout_of(config: Any, image_size: tuple[int, int]) -> AnyresLayout:
    vc = config.vision_config
    return _cached_layout(tuple(image_size), _pinpoints(config), int(vc.image_size), int(vc.patch_size))


@ADAPTERS.register("llava_next")
class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-1.5's vision tower, projector and 1-D RoPE decoder, with anyres tiling at a fixed image size.

    The default image size (no `inputs.image_size`) is the largest square grid pinpoint (672x672 for the
    llava-v1.6 checkpoints: a 2x2 grid, 5 tiles, 2928 image tokens), else the first pinpoint.
    """

    model_types: ClassVar[tuple[str, ...]] = ("llava_next",)
    # llava-v1.6-mistral's conversation format (the Vicuna-based 1.6 checkpoints ship a chat template)
    fallback_template: ClassVar[str] = "[INST] {placeholder}\n{question} [/INST]"
    sites: ClassVar[frozenset[Site]] = frozenset({Site.PROJECTOR_OUT, Site.DECODER_LAYER, Site.DECODER_MID})
    site_refusals: ClassVar[dict[Site, str]] = {
        Site.VISION_BLOCK: "LLaVA-NeXT's anyres packing needs every tile's full patch grid",
        Site.VISION_OUT: "LLaVA-NeXT's anyres packing needs every tile's full patch grid",
    }
    encode_image_tokens = VLMAdapter.encode_image_tokens  # no vision-tower sites
    features_at_projector: ClassVar[bool] = False  # the span holds tiles, newlines and unpadding
    # LightCompress has no LLaVA-NeXT class of its own: its `Llava` class loads LLaVA-1.6 in the original
    # repository's format (we load its HF twin); the NeXT names are accepted as well.
    lightcompress_types: ClassVar[tuple[str, ...]] = ("LlavaNext", "LlavaNextHf", "Llava")
    quant_ignore: ClassVar[tuple[str, ...]] = ("lm_head", "vision_tower", "multi_modal_projector", "image_newline")
    model_class_name: ClassVar[str] = "LlavaNextForConditionalGeneration"
    input_names: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask", "pixel_values", "image_sizes")
    fixed_value_inputs: ClassVar[tuple[str, ...]] = ("image_sizes",)
    resize_to_compiled: ClassVar[bool] = True

    # --- config only ----------------------------------------------------------------------------------
    def default_image_size(self, config: Any, processor: Any | None) -> tuple[int, int]:
        pins = _pinpoints(config)
        squares = [p for p in pins if p[0] == p[1]]
        return max(squares) if squares else pins[0]

    def geometry(self, config: Any, image_size: tuple[int, int] | None, video_frames: int | None = None) -> Geometry:
        if config.vision_feature_select_strategy != "default":
            raise ValueError(
                f"vision_feature_select_strategy '{config.vision_feature_select_strategy}' is not supported for "
                "LLaVA-NeXT (the tile features must be a square map without CLS); use a 'default' checkpoint"
            )
        size = tuple(image_size) if image_size is not None else self.default_image_size(config, None)
        layout = layout_of(config, size)
        return self._geometry(
            config, layout.image_size, layout.n_tokens, layout.side * layout.side + 1,
            vision_images=layout.n_tiles,
            # tile grid (rows, cols), then the unpadded feature map (rows, cols) read with a newline per row
            layout=(*layout.grid, *layout.kept),
        )

    # --- prefill inputs -> image features -----------------------------------------------------------------
    def encode_images(self, model: nn.Module, inputs: dict[str, Tensor], geom: Geometry) -> Tensor:
        """pixel_values (B, n_tiles, 3, tile, tile) -> packed image features (B, N, D), N = geom.n_image_tokens.

        `image_sizes` is not read: the compiled size fixes the packing (the runtime checks its values).
        """
        layout = layout_of(model.config, geom.image_size)
        n, p = layout.n_tiles, layout.side * layout.side
        pixels = inputs["pixel_values"][:, :n]  # (B, n, 3, tile, tile); HF also ignores tiles past n
        B = pixels.shape[0]
        feats = self.project_features(model, self.vision_features(model, pixels.flatten(0, 1)))  # (B·n, P, D)
        D = feats.shape[-1]
        table = feats.reshape(B, n * p, D)  # (B, n·P, D): tile t's token k at row t·P + k
        newline = model.model.image_newline.to(table.dtype)[None, None].expand(B, 1, D)  # (B, 1, D)
        table = torch.cat([table, newline], dim=1)  # (B, n·P + 1, D)
        index = torch.tensor(layout.index(), dtype=torch.long, device=table.device)  # (N,) constant
        return table.index_select(1, index)  # (B, N, D)
