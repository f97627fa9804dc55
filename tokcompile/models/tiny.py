"""Built-in random-weight models for demos and tests: `model.path: tiny-random:<family>`.

Everything is built in code (config, tokenizer, image processor), so nothing is downloaded. The tokenizer
is a byte-level BPE with the 256 byte symbols as its vocabulary, so any text round-trips. The same configs
serve the tests, the demo recipe and the benchmarks ("medium" size).
"""

from __future__ import annotations

from typing import Any

TINY_PREFIX = "tiny-random:"

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
}


def is_tiny(path: str) -> bool:
    return path.startswith(TINY_PREFIX)


def tiny_family(path: str) -> str:
    """"tiny-random:llava" -> "llava"; a size suffix ("tiny-random:llava@medium") is dropped."""
    return path[len(TINY_PREFIX) :].split("@", 1)[0]


def tiny_size(path: str) -> str:
    """"tiny-random:llava@medium" -> "medium" (benchmark size); default "tiny"."""
    rest = path[len(TINY_PREFIX) :]
    return rest.split("@", 1)[1] if "@" in rest else "tiny"


def build_tokenizer() -> Any:
    """A byte-level BPE tokenizer (no merges) with LLaVA-style special tokens, left padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        extra_special_tokens={"image_token": "<image>"},
    )


def build_config(family: str, size: str = "tiny") -> Any:
    if family != "llava":
        raise KeyError(family)
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
    if family != "llava":
        raise KeyError(family)
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


def build_model(family: str, seed: int = 0, size: str = "tiny") -> Any:
    """A random-weight model, deterministic for a given seed."""
    import torch
    from transformers import LlavaForConditionalGeneration

    config = build_config(family, size)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    return model.eval()


FAMILIES = ("llava",)
