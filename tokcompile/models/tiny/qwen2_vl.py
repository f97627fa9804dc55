"""Tiny and medium random Qwen2-VL and Qwen2.5-VL (`tiny-random:qwen2_vl`, `tiny-random:qwen2_5_vl`).

Qwen2 decoder with M-RoPE, native-resolution vision tower (Qwen2.5-VL: window attention with full-attention
blocks), Qwen's chat template and special tokens, a byte-level BPE, and the PIL image processor, so both
families build and run without torchvision.
"""

from __future__ import annotations

from typing import Any

from tokcompile.models.tiny.tokenizer import byte_bpe_tokenizer

SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
)
ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, VISION_PAD, IMAGE_PAD, VIDEO_PAD = range(len(SPECIAL_TOKENS))

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'video' %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The released checkpoints' pixel range (see models.qwen2_vl); images are resized to the compiled size first.
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 16384

# name -> (text hidden, text layers, heads, kv heads, ffn, mrope_section, vision width, vision depth, vision heads,
#          vision ffn, patch, window (px, 2.5-VL), full-attention blocks (2.5-VL), default image (h, w))
SIZES: dict[str, tuple[Any, ...]] = {
    # 64x96 px at patch 8: an (8, 12) patch grid, 24 image tokens in a non-square (4, 6) merged grid. Windows
    # of 3x3 merged tokens leave uneven edge windows; block 1 of 3 attends fully.
    "tiny": (128, 4, 4, 2, 256, (4, 6, 6), 32, 3, 2, 64, 8, 48, (1,), (64, 96)),
    # ~200M parameters with Qwen's real 448x448 input (patch 14): 1024 patches, 256 image tokens, 4x4 windows of
    # 112 px as in Qwen2.5-VL.
    "medium": (1024, 16, 16, 8, 2816, (8, 12, 12), 384, 8, 6, 1536, 14, 112, (3, 7), (448, 448)),
}


def build_tokenizer() -> Any:
    """Byte-level BPE with Qwen's special tokens: no BOS, <|im_end|> ends a turn, left padding."""
    return byte_bpe_tokenizer(
        SPECIAL_TOKENS, bos=None, eos="<|im_end|>", unk=None, pad="<|endoftext|>",
        extra_special={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )


def build_config(family: str, size: str = "tiny") -> Any:
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    d, n_layers, heads, kv, ffn, mrope, dv, nv, hv, fv, patch, window, full, image = SIZES[size]
    if sum(mrope) * 2 != d // heads or d % heads or (dv // hv) % 4:
        raise ValueError(f"tiny size {size}: mrope_section must cover half the text head dim, and the vision head "
                         "dim must split into (h, w) rotary halves")
    text = {
        "vocab_size": len(SPECIAL_TOKENS) + 256,
        "hidden_size": d,
        "intermediate_size": ffn,
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": list(mrope)},
        "bos_token_id": ENDOFTEXT,
        "eos_token_id": IM_END,
        "pad_token_id": ENDOFTEXT,
        "tie_word_embeddings": False,
    }
    vision: dict[str, Any] = {
        "depth": nv,
        "num_heads": hv,
        "patch_size": patch,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "in_channels": 3,
        "image_size": list(image),  # the default compiled resolution (models.qwen2_vl.default_image_size)
    }
    if family == "qwen2_vl":
        vision.update(embed_dim=dv, mlp_ratio=fv // dv, hidden_size=d)
        cls = Qwen2VLConfig
    else:
        vision.update(hidden_size=dv, intermediate_size=fv, out_hidden_size=d, window_size=window,
                      fullatt_block_indexes=list(full))
        cls = Qwen2_5_VLConfig
    return cls(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE_PAD,
        video_token_id=VIDEO_PAD,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        tie_word_embeddings=False,
    )


def build_processor(family: str, size: str = "tiny") -> Any:
    """Qwen's processor for images, built from the PIL image processor (no torchvision needed)."""
    from transformers import Qwen2VLImageProcessorPil

    from tokcompile.models.qwen2_vl import images_only_processor_class

    patch = SIZES[size][10]
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch, temporal_patch_size=2, merge_size=2, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
    )
    cls = images_only_processor_class(family)
    return cls(image_processor=image_processor, tokenizer=build_tokenizer(), chat_template=QWEN_CHAT_TEMPLATE)


def model_class(family: str) -> Any:
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    return {"qwen2_vl": Qwen2VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}[family]
