"""Tiny and medium random LLaVA-NeXT (`tiny-random:llava_next`): CLIP tower on anyres tiles, Mistral decoder.

The grid pinpoints are multiples of the tile size, so a compiled resolution picks a real multi-tile grid:
"tiny" tiles 32-px images into up to 2x2 tiles of 32 px; "medium" uses LLaVA-NeXT's own pinpoints and 336-px
tiles (672x672 gives a 2x2 grid and 2928 image tokens, as llava-v1.6 at that size).
"""

from __future__ import annotations

from typing import Any

from tokcompile.models.tiny.llava import BOS, EOS, IMAGE, PAD, SPECIAL_TOKENS, build_tokenizer

# Mistral-instruct style, as llava-v1.6-mistral: "[INST] <image>\nquestion [/INST]".
LLAVA_NEXT_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}[INST] "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}"
    "{{ c['text'] }}{% endif %}{% endfor %} [/INST]{% else %} {% for c in message['content'] %}"
    "{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}</s>{% endif %}{% endfor %}"
)

# name -> (text hidden, text layers, heads, kv heads, ffn, vision hidden, vision layers, vision heads,
#          vision ffn, tile size, patch)
SIZES: dict[str, tuple[int, ...]] = {
    # LLaVA tiny's shapes; at the default 64x64 a 2x2 grid: 5 tiles, 64 + 16·17 = 336 image tokens.
    "tiny": (128, 4, 4, 2, 256, 32, 3, 2, 64, 32, 4),
    # ~200M parameters (LLaVA medium's shapes) with LLaVA-NeXT's 336-px tiles and pinpoints: 2928 image tokens
    # at the default 672x672 (5 tiles), 1752 at 336x672 (3 tiles).
    "medium": (1024, 16, 16, 8, 2816, 384, 6, 6, 1536, 336, 14),
}

PINPOINTS: dict[str, list[list[int]]] = {
    "tiny": [[32, 64], [64, 32], [64, 64]],
    "medium": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
}


def build_config(family: str, size: str = "tiny") -> Any:
    from transformers import CLIPVisionConfig, LlavaNextConfig, MistralConfig

    d, n_layers, heads, kv, ffn, dv, nv, hv, fv, tile, patch = SIZES[size]
    text = MistralConfig(
        vocab_size=len(SPECIAL_TOKENS) + 256,
        hidden_size=d,
        intermediate_size=ffn,
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=d // heads,
        max_position_embeddings=4096,
        sliding_window=None,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        hidden_size=dv,
        intermediate_size=fv,
        num_hidden_layers=nv,
        num_attention_heads=hv,
        image_size=tile,
        patch_size=patch,
        projection_dim=dv,
    )
    return LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=[list(p) for p in PINPOINTS[size]],
        image_seq_length=(tile // patch) ** 2,
        pad_token_id=PAD,
        tie_word_embeddings=False,
    )


def build_processor(family: str, size: str = "tiny") -> Any:
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    tile, patch = SIZES[size][9], SIZES[size][10]
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": tile},
        crop_size={"height": tile, "width": tile},
        image_grid_pinpoints=[list(p) for p in PINPOINTS[size]],
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=patch,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
        chat_template=LLAVA_NEXT_CHAT_TEMPLATE,
    )


def model_class(family: str) -> Any:
    from transformers import LlavaNextForConditionalGeneration

    return LlavaNextForConditionalGeneration
