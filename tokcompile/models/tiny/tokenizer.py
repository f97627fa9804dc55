"""A byte-level BPE tokenizer built in code: the 256 byte symbols are the vocabulary (no merges), so any
text round-trips, after the family's special tokens."""

from __future__ import annotations

from typing import Any


def byte_bpe_tokenizer(
    special_tokens: tuple[str, ...],
    *,
    bos: str | None,
    eos: str,
    unk: str | None,
    pad: str,
    extra_special: dict[str, str] | None = None,
    padding_side: str = "left",
) -> Any:
    """Special tokens take ids 0..len-1 in order; with `bos`, it is prepended to every sequence."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(special_tokens)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if bos is not None:
        tok.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                special_tokens=[(bos, vocab[bos])])
    kwargs: dict[str, Any] = {"eos_token": eos, "pad_token": pad, "padding_side": padding_side}
    if bos is not None:
        kwargs["bos_token"] = bos
    if unk is not None:
        kwargs["unk_token"] = unk
    if extra_special:
        kwargs["extra_special_tokens"] = dict(extra_special)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
