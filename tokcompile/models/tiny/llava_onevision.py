"""Tiny and medium random LLaVA-OneVision (`tiny-random:llava_onevision`): SigLIP tower, Qwen2 decoder, built in
code, with a Qwen-style tokenizer (`<image>` and `<video>` placeholders) and a chat template for both media.

The processor is `models.llava_onevision.processor_class()` (HF's OneVision processor without the
torchvision-bound video-processor attribute): PIL image processor, and the video processor's settings (frame
size; resampling, mean and std at HF's defaults) applied per frame by the adapter, so nothing needs torchvision.
"""

from __future__ import annotations

from typing import Any

from tokcompile.models.tiny.tokenizer import byte_bpe_tokenizer

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")
PAD, IM_START, IM_END, IMAGE, VIDEO = range(len(SPECIAL_TOKENS))

ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'video' %}<video>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# name -> (text hidden, text layers, heads, kv heads, ffn, vision hidden, vision layers, vision heads, vision ffn,
#          tile size, patch, anyres_max)
SIZES: dict[str, tuple[int, ...]] = {
    # 8x8 = 64 patches per 32-px tile; anyres_max_2 makes the downsampling step trigger at a 2x2 grid
    # (e.g. a 40x56 image: 64 base + 9 rows x (13 + newline) = 190 image tokens); 4 video frames -> 65 tokens.
    "tiny": (128, 4, 4, 2, 256, 32, 3, 2, 64, 32, 4, 2),
    # ~190M parameters with OneVision's real sizes: 384-px tiles, patch 14 -> 27x27 = 729 patches per tile, the
    # real pinpoints and anyres_max_9. A 384x384 image gives 729 + 27 x 28 = 1485 image tokens (2 tiles); a
    # video gives 14x14 = 196 tokens per frame + 1.
    "medium": (1024, 16, 16, 2, 2816, 384, 6, 6, 1536, 384, 14, 9),
}

TINY_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]


def _pinpoints(size: str) -> list[list[int]]:
    if size == "tiny":
        return [list(p) for p in TINY_PINPOINTS]
    tile = SIZES[size][9]
    return [[tile * i, tile * j] for i in range(1, 7) for j in range(1, 7)]  # as the released checkpoints


def build_tokenizer() -> Any:
    """Byte-level BPE with Qwen-style special tokens (no BOS), `<|im_end|>` as EOS, left padding."""
    return byte_bpe_tokenizer(SPECIAL_TOKENS, bos=None, eos="<|im_end|>", unk=None, pad="<|endoftext|>",
                              extra_special={"image_token": "<image>", "video_token": "<video>"})


def build_config(family: str, size: str = "tiny") -> Any:
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    d, n_layers, heads, kv, ffn, dv, nv, hv, fv, tile, patch, max_tiles = SIZES[size]
    text = Qwen2Config(
        vocab_size=len(SPECIAL_TOKENS) + 256,
        hidden_size=d,
        intermediate_size=ffn,
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=8192,
        bos_token_id=None,
        eos_token_id=IM_END,
        pad_token_id=PAD,
        tie_word_embeddings=False,
    )
    vision = SiglipVisionConfig(
        hidden_size=dv,
        intermediate_size=fv,
        num_hidden_layers=nv,
        num_attention_heads=hv,
        image_size=tile,
        patch_size=patch,
        vision_use_head=False,
    )
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE,
        video_token_index=VIDEO,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=_pinpoints(size),
        vision_aspect_ratio=f"anyres_max_{max_tiles}",
        tie_word_embeddings=False,
    )


def build_processor(family: str, size: str = "tiny") -> Any:
    from transformers import LlavaOnevisionImageProcessorPil

    from tokcompile.models.llava_onevision import processor_class

    tile, patch, max_tiles = SIZES[size][9], SIZES[size][10], SIZES[size][11]
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": tile, "width": tile}, image_grid_pinpoints=_pinpoints(size)
    )
    return processor_class()(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        video_config={"size": {"height": tile, "width": tile}},
        num_image_tokens=(tile // patch) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=f"anyres_max_{max_tiles}",
        chat_template=ONEVISION_CHAT_TEMPLATE,
    )


def model_class(family: str) -> Any:
    from transformers import LlavaOnevisionForConditionalGeneration

    return LlavaOnevisionForConditionalGeneration
