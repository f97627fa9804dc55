"""Teacher-forced batches of (image, question, answer) for a LLaVA-style model: training and fast exact match.

A sample's sequence is its chat prompt (the image's tokens expanded by the processor) followed by the answer's
tokens as the model writes them after "ASSISTANT:" (a space, the word, then EOS). Batches are left-padded, as
generation pads them, and positions count real tokens only (0 at the first one), as generation counts them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def answer_ids(tokenizer: Any, answer: str) -> list[int]:
    """The tokens a model writes for `answer` after the generation prompt: " answer" and then EOS."""
    return [*tokenizer(" " + answer, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]


def answer_batch(processor: Any, items: list[Any]) -> dict[str, Tensor]:
    """items: objects with .image, .question, .answer -> input_ids, attention_mask, position_ids, labels [B, T]
    (labels -100 except on the answer's tokens) and pixel_values [B, 3, H, W]."""
    from tokcompile.models import ADAPTERS
    from tokcompile.parity import format_prompt

    adapter = ADAPTERS.get("llava")()
    prompts = [format_prompt(processor, adapter, it.question) for it in items]
    enc = processor(images=[it.image for it in items], text=prompts, return_tensors="pt", padding=True)
    tok = processor.tokenizer
    rows, labels = [], []
    for ids, mask, it in zip(enc["input_ids"], enc["attention_mask"], items):
        prompt = ids[mask.bool()].tolist()
        answer = answer_ids(tok, it.answer)
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    return {**left_padded(rows, labels, tok.pad_token_id), "pixel_values": enc["pixel_values"]}


def left_padded(rows: list[list[int]], labels: list[list[int]], pad_id: int) -> dict[str, Tensor]:
    """Token rows and their labels (same lengths) -> input_ids, attention_mask, position_ids, labels [B, T],
    left-padded as generation pads, positions counting real tokens only (0 at the first one)."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [B, T]
    label_ids = torch.full((len(rows), width), -100, dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # [B, T]
    for i, (r, lab) in enumerate(zip(rows, labels)):
        input_ids[i, width - len(r):] = torch.tensor(r)
        label_ids[i, width - len(r):] = torch.tensor(lab)
        mask[i, width - len(r):] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids, "labels": label_ids}


def teacher_forced_correct(model: Any, batch: dict[str, Tensor]) -> Tensor:
    """[B] bool: every answer token (EOS included) is the model's argmax given the tokens before it, which is
    exactly when greedy decoding writes the answer and stops."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   pixel_values=batch["pixel_values"], position_ids=batch["position_ids"]).logits  # [B, T, V]
    predicted = logits[:, :-1].argmax(-1)  # [B, T-1]: the token predicted for position t + 1
    target = batch["labels"][:, 1:]  # [B, T-1]
    scored = target != -100
    return ((predicted == target) | ~scored).all(-1)
