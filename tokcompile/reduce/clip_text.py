"""CLIP's text tower and vision head, for reductions that score patches against the question (TRIM, CDPruner).

Both official implementations load, from the CLIP checkpoint the LLaVA tower came from
(`openai/clip-vit-large-patch14-336`), `CLIPTextModelWithProjection` (the question's `text_embeds`: the
projected end-of-text token) and the vision head, `vision_model.post_layernorm` and `visual_projection`, which
they apply to the selected layer's patch features. `text_encoder` in a recipe names that checkpoint: a local
directory (safetensors only, no remote code) or `tiny-random:clip@<width>` (built in code, for tests).

`QuestionHead` is the module a step owns (`ReducedVLM` registers it, so it is exported inside the vision
graph). It stays in float32 whatever the graphs' dtype, as both official codes run it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tokcompile.errors import RecipeError
from tokcompile.question import QuestionSpec, QuestionTokens

MAX_TOKENS = 77  # CLIP's text positions (OpenAI's checkpoints and the built-in tiny one)
TINY_PREFIX = "tiny-random:clip"


def _tiny() -> Any:
    from tokcompile.models.tiny import clip  # imported late: tokcompile.models imports the reducers

    return clip


HEAD_KEYS = ("vision_model.post_layernorm.weight", "vision_model.post_layernorm.bias", "visual_projection.weight")


def _config(path: str, key: str) -> dict:
    """The checkpoint's config.json, checked to be a CLIP model with safetensors weights and a tokenizer."""
    d = Path(path)
    if not d.is_dir():
        raise RecipeError(key, f"{path} is not a directory; give a local CLIP checkpoint (the one the vision tower "
                               f"came from, e.g. clip-vit-large-patch14-336) or {TINY_PREFIX}@<width>")
    try:
        cfg = json.loads((d / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise RecipeError(key, f"{d / 'config.json'} cannot be read ({e}); give a CLIP checkpoint directory") from None
    if cfg.get("model_type") != "clip" or "vision_config" not in cfg or "text_config" not in cfg:
        raise RecipeError(key, f"{path} holds a '{cfg.get('model_type')}' model, not a full CLIP model (text and "
                               "vision); give the CLIP checkpoint with both towers")
    if not any(d.glob("*.safetensors")):
        raise RecipeError(key, f"{path} has no .safetensors weights; convert the checkpoint to safetensors "
                               "(pickled .bin files are not loaded)")
    if not any((d / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        raise RecipeError(key, f"{path} has no tokenizer (tokenizer.json or vocab.json); save CLIP's tokenizer there")
    return cfg


def vision_width(path: str, key: str) -> int:
    """The vision feature width the checkpoint's head takes (checked at plan time, without loading weights)."""
    try:
        width = _tiny().tiny_width(path)
    except ValueError as e:
        raise RecipeError(key, str(e)) from None
    if width is not None:
        return width
    return int(_config(path, key)["vision_config"]["hidden_size"])


def check(path: str, key: str, width: int) -> None:
    """Plan-time check: the checkpoint exists and its vision head takes the tower's `width` features."""
    got = vision_width(path, key)
    if got != width:
        raise RecipeError(key, f"{path}'s vision head takes {got}-wide features, but this model's vision tower "
                               f"gives {width}; use the CLIP checkpoint the tower came from")


def load_tokenizer(path: str) -> Any:
    if _tiny().tiny_width(path) is not None:
        return _tiny().build_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def _head_tensors(path: str) -> dict[str, Tensor]:
    from safetensors import safe_open

    found: dict[str, Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in HEAD_KEYS:
                if name in st.keys():
                    found[name] = st.get_tensor(name).float()
    missing = [n for n in HEAD_KEYS if n not in found]
    if missing:
        raise RecipeError("text_encoder", f"{path} lacks {', '.join(missing)}; give a full CLIP checkpoint")
    return found


class QuestionHead(nn.Module):
    """CLIP's text tower with projection and its vision head: questions and patches in CLIP's joint space."""

    def __init__(self, text: nn.Module, post_layernorm: nn.LayerNorm, visual_projection: nn.Linear):
        super().__init__()
        self.text, self.post_layernorm, self.visual_projection = text, post_layernorm, visual_projection

    @classmethod
    def load(cls, path: str) -> QuestionHead:
        width = _tiny().tiny_width(path)
        if width is not None:
            clip = _tiny().build_model(width)
            from transformers import CLIPTextModelWithProjection

            text = CLIPTextModelWithProjection(clip.config.text_config)
            text.text_model.load_state_dict(clip.text_model.state_dict())
            text.text_projection.load_state_dict(clip.text_projection.state_dict())
            return cls(text.eval(), clip.vision_model.post_layernorm, clip.visual_projection).eval().float()
        from transformers import CLIPConfig, CLIPTextModelWithProjection

        cfg = CLIPConfig.from_pretrained(path)
        text = CLIPTextModelWithProjection.from_pretrained(path, use_safetensors=True, trust_remote_code=False,
                                                           dtype=torch.float32)
        t = _head_tensors(path)
        vc = cfg.vision_config
        ln = nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)
        proj = nn.Linear(vc.hidden_size, cfg.projection_dim, bias=False)
        with torch.no_grad():
            ln.weight.copy_(t[HEAD_KEYS[0]])
            ln.bias.copy_(t[HEAD_KEYS[1]])
            proj.weight.copy_(t[HEAD_KEYS[2]])
        return cls(text.eval(), ln, proj).eval().float()

    def text_embeds(self, question: QuestionTokens) -> Tensor:
        """question ids/mask (B, S, L) -> the projected end-of-text embedding of every segment (B, S, C), fp32,
        not normalised (`CLIPTextModelWithProjection(...).text_embeds`). A segment holding no token (beyond the
        question's length) is run with its first token visible, so that no row is fully masked; its value is
        unused (`QuestionTokens.segment_valid`)."""
        B, S, L = question.ids.shape
        ids = question.ids.reshape(B * S, L)  # (B·S, L)
        mask = question.mask.reshape(B * S, L)
        first = torch.zeros_like(mask)
        first[:, 0] = 1
        mask = torch.maximum(mask, first)  # (B·S, L): every row sees at least its first token
        out = self.text(input_ids=ids, attention_mask=mask).text_embeds  # (B·S, C)
        return out.float().reshape(B, S, -1)

    def patch_embeds(self, features: Tensor) -> Tensor:
        """features (B, N, Dv) of the selected vision layer -> visual_projection(post_layernorm(.)) (B, N, C),
        in fp32, not normalised."""
        return self.visual_projection(self.post_layernorm(features.float()))


def question_spec(path: str, key: str, segments: int, truncate: bool) -> QuestionSpec:
    """What the vision graph's question inputs hold for this checkpoint: `segments` × 77-token windows (CLIP's
    position limit), or one window truncated the way CLIP's tokenizer truncates."""
    length = MAX_TOKENS
    if _tiny().tiny_width(path) is None:
        length = int(_config(path, key)["text_config"].get("max_position_embeddings", MAX_TOKENS))
    return QuestionSpec(directory=path, key=key, segments=segments, length=length, truncate=truncate)
