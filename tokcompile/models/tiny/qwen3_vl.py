"""Tiny random Qwen3-VL (`tiny-random:qwen3_vl`): Qwen3 decoder (q/k norms, interleaved M-RoPE), the vision tower
with learned position embeddings resampled to the grid and DeepStack (three intermediate vision layers merged
into extra features added to the first three decoder layers at the image positions), Qwen's chat template and
special tokens, a byte-level BPE and the PIL image processor, so it builds and runs without torchvision."""

from __future__ import annotations

from typing import Any

from tokcompile.models.tiny.qwen2_vl import (  # noqa: F401
    ENDOFTEXT,
    IM_END,
    IMAGE_PAD,
    QWEN_CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    build_tokenizer,
)

MIN_PIXELS = 32 * 32
MAX_PIXELS = 32 * 32 * 16384

# name -> (text hidden, text layers, heads, kv heads, head dim, ffn, mrope_section, vision width, vision depth,
#          vision heads, vision ffn, patch, position embeddings, deepstack layers, default image (h, w))
SIZES: dict[str, tuple[Any, ...]] = {
    # 64x96 px at patch 8: an (8, 12) patch grid, 24 image tokens; a 6x6 learned position grid resampled to it;
    # DeepStack from vision blocks 0, 1 and 2 into decoder layers 0, 1 and 2.
    "tiny": (128, 4, 4, 2, 32, 256, (6, 5, 5), 32, 4, 2, 64, 8, 36, (0, 1, 2), (64, 96)),
}


def build_config(family: str, size: str = "tiny") -> Any:
    from transformers import Qwen3VLConfig

    d, n_layers, heads, kv, hd, ffn, mrope, dv, nv, hv, fv, patch, n_pos, deep, image = SIZES[size]
    if sum(mrope) * 2 != hd or (dv // hv) % 4:
        raise ValueError(f"tiny size {size}: mrope_section must cover half the text head dim, and the vision head "
                         "dim must split into (h, w) rotary halves")
    text = {
        "vocab_size": len(SPECIAL_TOKENS) + 256, "hidden_size": d, "intermediate_size": ffn,
        "num_hidden_layers": n_layers, "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd,
        "max_position_embeddings": 4096, "pad_token_id": ENDOFTEXT,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": list(mrope),
                            "mrope_interleaved": True},
    }
    vision = {
        "depth": nv, "hidden_size": dv, "intermediate_size": fv, "num_heads": hv, "patch_size": patch,
        "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3, "out_hidden_size": d,
        "num_position_embeddings": n_pos, "deepstack_visual_indexes": list(deep),
    }
    config = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_PAD, video_token_id=VIDEO_PAD,
                           vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
                           tie_word_embeddings=False)
    config.vision_config.image_size = list(image)  # the default compiled resolution (adapter's default_image_size)
    config.text_config.eos_token_id = IM_END
    return config


def build_processor(family: str, size: str = "tiny") -> Any:
    """Qwen3-VL's processor for images, built from the PIL image processor (no torchvision needed)."""
    from transformers import Qwen2VLImageProcessorPil

    from tokcompile.models.qwen2_vl import images_only_processor_class

    patch = SIZES[size][11]
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch, temporal_patch_size=2, merge_size=2, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    cls = images_only_processor_class(family)
    return cls(image_processor=image_processor, tokenizer=build_tokenizer(), chat_template=QWEN_CHAT_TEMPLATE)


def model_class(family: str) -> Any:
    from transformers import Qwen3VLForConditionalGeneration

    return Qwen3VLForConditionalGeneration
