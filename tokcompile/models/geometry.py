"""Model geometry: the integers that shape the graph, read from the config alone (no weights)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Geometry:
    """Sizes of one VLM at the recipe's fixed input resolution.

    Args:
        family: HF `config.model_type` of the whole VLM (e.g. "llava").
        n_layers: decoder layers.
        hidden_size: decoder hidden size `d`.
        intermediate_size: decoder FFN size `m` (each of gate, up, down).
        n_heads: decoder query heads.
        n_kv_heads: decoder key/value heads (GQA when smaller than `n_heads`).
        head_dim: decoder head dim.
        vocab_size: vocabulary size of `lm_head`.
        image_size: (height, width) in pixels that the graph is compiled for.
        n_image_tokens: image tokens one image contributes to the prompt.
        vision_layers: vision-tower blocks that run (LLaVA stops at its feature layer).
        vision_hidden_size: vision-tower hidden size.
        vision_intermediate_size: vision-tower FFN size.
        vision_heads: vision-tower heads.
        vision_tokens: tokens inside the vision tower (patches plus CLS).
        rope: "1d" or "mrope".
        media: "image" or "video": what one prompt carries (its tokens form one contiguous span).
        vision_images: vision-tower passes per sample (anyres tiles or video frames), for FLOPs.
        layout: family-specific static layout of the image span (e.g. Qwen's (t, h, w) patch grid or
            LLaVA-NeXT's tile grid), recorded in the manifest.
        frame_tokens: video whose span holds its `vision_images` frames one after another, `frame_tokens` each,
            then any trailing tokens (LLaVA-OneVision's one newline); 0 otherwise.
        side_streams: image-aligned side streams the vision graph hands the decoder (Qwen3-VL's DeepStack: one
            (B, N', D) feature per stream, added to the output of decoder layer j at the image positions, j <
            side_streams); every reduction before those layers gathers them with the image tokens.
    """

    family: str
    n_layers: int
    hidden_size: int
    intermediate_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    image_size: tuple[int, int]
    n_image_tokens: int
    vision_layers: int
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_heads: int
    vision_tokens: int
    rope: str = "1d"
    media: str = "image"
    vision_images: int = 1
    layout: tuple[int, ...] = ()
    frame_tokens: int = 0
    side_streams: int = 0

    @property
    def one_image_grid(self) -> bool:
        """The image span is one image's patch grid in order (one vision pass over one image: no tiles, row-end
        tokens or frames), which methods that work within an image (merging neighbours) need."""
        return self.media == "image" and self.vision_images == 1

    @property
    def frames(self) -> tuple[int, int] | None:
        """(frames, trailing tokens) where the image span is video frames laid one after another (each frame's
        tokens together), for methods that work within a frame; None otherwise."""
        if not self.frame_tokens:
            return None
        return self.vision_images, self.n_image_tokens - self.vision_images * self.frame_tokens

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        d["layout"] = list(self.layout)
        return d
