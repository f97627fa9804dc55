"""Tiny and medium random LLaVA-1.5 (`tiny-random:llava`): CLIP tower, Llama decoder, built in code."""

from __future__ import annotations

from typing import Any

from tokcompile.models.tiny.tokenizer import byte_bpe_tokenizer

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
UNK, BOS, EOS, PAD, IMAGE = range(len(SPECIAL_TOKENS))

LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}"
    "{{ c['text'] }}{% endif %}{% endfor %} {% else %}ASSISTANT: {% for c in message['content'] %}"
    "{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# name -> (text hidden, text layers, heads, kv heads, ffn, vision hidden, vision layers, vision heads,
#          vision ffn, image size, patch)
SIZES: dict[str, tuple[int, ...]] = {
    "tiny": (128, 4, 4, 2, 256, 32, 3, 2, 64, 32, 4),  # 64 image tokens; widths divisible by 128
    # ~235M parameters with LLaVA-1.5's 576 image tokens (336 px, patch 14), for benchmarks. The vision tower is
    # small next to the decoder, as in LLaVA-1.5-7B (about 4% of prefill FLOPs there, about 6% here).
    "medium": (1024, 16, 16, 8, 2816, 384, 6, 6, 1536, 336, 14),
    # LLaVA-1.5-7B's exact geometry (Vicuna-7B decoder, CLIP ViT-L/14 at 336 px, 576 image tokens), random weights:
    # for the GPU check (benchmarks/gpu.py); the byte-level vocabulary stays small
    "llava7b": (4096, 32, 32, 32, 11008, 1024, 24, 16, 4096, 336, 14),
    # the architecture of `tiny-trained:shapes` (tools/train_shapes.py): 64 px shapes scenes, 256 image tokens;
    # six vision layers, as the projector reads the fifth's output (vision_feature_layer -2)
    "shapes": (128, 4, 4, 2, 256, 64, 6, 4, 128, 64, 4),
}


def build_tokenizer() -> Any:
    """Byte-level BPE with LLaVA-style special tokens, BOS prepended, left padding."""
    return byte_bpe_tokenizer(SPECIAL_TOKENS, bos="<s>", eos="</s>", unk="<unk>", pad="<pad>",
                              extra_special={"image_token": "<image>"})


def build_config(family: str, size: str = "tiny") -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    d, n_layers, heads, kv, ffn, dv, nv, hv, fv, img, patch = SIZES[size]
    vocab = len(SPECIAL_TOKENS) + 256
    text = LlamaConfig(
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=ffn,
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=4096,
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
        image_size=img,
        patch_size=patch,
        projection_dim=dv,
    )
    n_image = (img // patch) ** 2
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=n_image,
        pad_token_id=PAD,
        tie_word_embeddings=False,
    )


def build_processor(family: str, size: str = "tiny") -> Any:
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    img, patch = SIZES[size][9], SIZES[size][10]
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": img},
        crop_size={"height": img, "width": img},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=patch,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


def model_class(family: str) -> Any:
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration
