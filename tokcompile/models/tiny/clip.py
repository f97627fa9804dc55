"""A tiny random CLIP (text tower, vision head and tokenizer), built in code: `tiny-random:clip@<width>`.

Question-conditioned reductions (TRIM, CDPruner) score the vision tower's patch features against the CLIP text
embedding of the question, through CLIP's own vision head (post-LayerNorm and visual projection). `<width>` is
the vision tower's hidden size the head takes (32 for the tiny LLaVA, 384 for the medium one). The tokenizer
is CLIP-like: byte-level symbols, `<|startoftext|>` and `<|endoftext|>` as the two highest ids (so the legacy
pooling rule, the highest id in the sequence, finds the end token, as in OpenAI's checkpoints), 77 tokens.
"""

from __future__ import annotations

from typing import Any

PREFIX = "tiny-random:clip"
MAX_TOKENS = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def tiny_width(path: str) -> int | None:
    """"tiny-random:clip@32" -> 32; None for anything else. Raises ValueError for a malformed width."""
    if not path.startswith(PREFIX):
        return None
    rest = path[len(PREFIX):]
    if not rest.startswith("@") or not rest[1:].isdigit() or int(rest[1:]) < 1:
        raise ValueError(f"'{path}' needs the vision width it serves, e.g. {PREFIX}@32")
    return int(rest[1:])


def build_tokenizer() -> Any:
    """Byte-level symbols (ids 0..255), then BOS 256 and EOS 257; EOS also pads, as in OpenAI's CLIP."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab[BOS], vocab[EOS] = len(vocab), len(vocab) + 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = TemplateProcessing(single=f"{BOS} $A {EOS}", pair=f"{BOS} $A {EOS} $B {EOS}",
                                            special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                                   model_max_length=MAX_TOKENS, padding_side="right")


def build_model(width: int, seed: int = 0) -> Any:
    """A random CLIPModel whose vision head takes `width` features; LayerNorm weights are random too, so the
    head's normalisation is visible in tests. `eos_token_id` 2 selects HF's legacy pooling (OpenAI's configs)."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    text = CLIPTextConfig(vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=MAX_TOKENS, projection_dim=24,
                          bos_token_id=256, eos_token_id=2, pad_token_id=257)
    heads = 2 if width % 2 == 0 else 1
    vision = CLIPVisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
                              num_attention_heads=heads, image_size=32, patch_size=16, projection_dim=24)
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=24)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
        with torch.no_grad():
            for mod in model.modules():
                if isinstance(mod, torch.nn.LayerNorm):
                    mod.weight.uniform_(0.5, 1.5)
                    mod.bias.normal_(0.0, 0.1)
    return model


def save(path: str, width: int, seed: int = 0) -> None:
    """Write the tiny CLIP as an ordinary checkpoint directory (safetensors, config, tokenizer)."""
    build_model(width, seed).save_pretrained(path, safe_serialization=True)
    build_tokenizer().save_pretrained(path)
