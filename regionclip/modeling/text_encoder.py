"""CLIP text tower, tokenizer, class-name prompts and concept-embedding files.

The tower is open_clip's ``TextTransformer`` configured as OpenAI CLIP (QuickGELU, causal
mask, EOT pooling, bias-free projection). Its parameter names equal the official RegionCLIP
``lang_encoder.*`` names; the causal mask is a non-persistent buffer, so it is not in the
state dict, and there is no ``logit_scale``.
"""
import json
import os
from collections import Counter
from typing import List, Optional, Sequence, Union

import torch
from open_clip.tokenizer import tokenize as _open_clip_tokenize
from open_clip.transformer import LayerNormFp32, QuickGELU, TextTransformer

from ..atomic import atomic_open
from .clip_variants import CLIPVariant
from .prompt_templates import PROMPT_TEMPLATES, build_prompts, prompt_engineering

__all__ = [
    "PROMPT_TEMPLATES",
    "TextEncoder",
    "class_names_from_file",
    "concept_embeddings",
    "load_embeddings",
    "prompt_engineering",
    "save_embeddings",
    "tokenize",
]

CONTEXT_LENGTH = 77


class TextEncoder(TextTransformer):
    """OpenAI-CLIP text tower for ``variant``; output width ``variant.embed_dim``."""

    def __init__(self, variant: CLIPVariant):
        super().__init__(
            context_length=variant.context_length,
            vocab_size=variant.vocab_size,
            width=variant.text_width,
            heads=variant.text_heads,
            layers=variant.text_layers,
            output_dim=variant.embed_dim,
            act_layer=QuickGELU,
            # The original computes LayerNorm in fp32 and casts back; same result in fp32.
            norm_layer=LayerNormFp32,
            output_tokens=True,
        )
        self.variant = variant

    def encode_text(self, tokens: torch.Tensor, only_eot: bool = True) -> torch.Tensor:
        """[B, L] token ids -> [B, D] at the EOT token (the largest id), or [B, L, D] projected
        features of every token when ``only_eot`` is False. Unnormalised."""
        pooled, hidden = super().forward(tokens)
        return pooled if only_eot else hidden @ self.text_projection

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encode_text(tokens)


def tokenize(texts: Union[str, Sequence[str]], context_length: int = CONTEXT_LENGTH):
    """CLIP BPE ids, [N, context_length] long, zero-padded.

    Over-long texts: open_clip truncates and puts EOT in the last position; the original
    truncated and dropped EOT, so EOT pooling then read an arbitrary word. We keep open_clip's
    behaviour. Prompts built from class names never come close to 77 tokens.
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    return _open_clip_tokenize(texts, context_length=context_length)


@torch.no_grad()
def concept_embeddings(
    encoder: TextEncoder,
    names: Sequence[str],
    batch_size: int = 256,
    templates: Sequence[str] = PROMPT_TEMPLATES,
) -> torch.Tensor:
    """[C, D] float32: per name, the arithmetic mean of its unnormalised prompt embeddings.

    This is the recipe of the released concept files (no per-template normalisation); rows
    follow ``names``. Always 2-D, also for a single name.
    """
    if len(names) == 0:
        raise ValueError("concept_embeddings needs at least one class name")
    prompts = [p for name in names for p in build_prompts(name, templates)]
    tokens = tokenize(prompts, encoder.context_length)
    device = encoder.token_embedding.weight.device
    chunks = [
        encoder.encode_text(tokens[i:i + batch_size].to(device)).float()
        for i in range(0, len(prompts), batch_size)
    ]
    return torch.cat(chunks).view(len(names), len(templates), -1).mean(dim=1)


def class_names_from_file(path: str, exclude_rare: bool = False) -> List[str]:
    """Class names from a txt file (one per line, blank lines skipped) or a COCO/LVIS json.

    json: ``categories`` sorted by id (the datasets' contiguous-id order). LVIS files (whose
    categories carry ``synset``) get the original's cleaning: ``_`` -> space, parentheses
    removed. ``exclude_rare`` keeps only LVIS categories whose ``frequency`` is not ``"r"``
    (the 866 base classes).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"class-name file not found: {path}")
    if path.endswith(".json"):
        names = _names_from_json(path, exclude_rare)
    else:
        if exclude_rare:
            raise ValueError(f"exclude_rare needs an LVIS json, got {path}")
        with open(path, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
    _check_names(names, path)
    return names


def _names_from_json(path: str, exclude_rare: bool) -> List[str]:
    with open(path, encoding="utf-8") as f:
        categories = json.load(f).get("categories")
    if not isinstance(categories, list):
        raise ValueError(f"{path} has no 'categories' list")
    categories = sorted(categories, key=lambda c: c["id"])
    is_lvis = any("synset" in c for c in categories)
    if exclude_rare:
        if not is_lvis:
            raise ValueError(f"exclude_rare needs an LVIS json (with 'frequency'), got {path}")
        categories = [c for c in categories if c["frequency"] != "r"]
    if not is_lvis:
        return [c["name"] for c in categories]
    return [c["name"].replace("_", " ").replace("(", "").replace(")", "") for c in categories]


def _check_names(names: List[str], path: str) -> None:
    if not names:
        raise ValueError(f"no class names in {path}")
    duplicates = sorted(n for n, k in Counter(names).items() if k > 1)
    if duplicates:
        raise ValueError(f"duplicate class names in {path}: {duplicates}")


def save_embeddings(embeddings: torch.Tensor, path: str) -> None:
    """Write a [C, D] tensor with torch.save, atomically (temporary file + os.replace)."""
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be [C, D], got shape {tuple(embeddings.shape)}")
    with atomic_open(path, "wb") as f:
        # clone: a view would otherwise drag its whole base storage into the file
        torch.save(embeddings.detach().cpu().clone(), f)


def load_embeddings(path: str, expected_dim: Optional[int] = None) -> torch.Tensor:
    """Read a [C, D] embedding file (rows unnormalised) as float32 on the CPU."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"embedding file not found: {path}")
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, torch.Tensor) or data.dim() != 2:
        got = tuple(data.shape) if isinstance(data, torch.Tensor) else type(data).__name__
        raise ValueError(f"{path} must hold one 2-D tensor [num_classes, dim], got {got}")
    if expected_dim is not None and data.shape[1] != expected_dim:
        raise ValueError(
            f"{path} holds {data.shape[1]}-dim embeddings, expected {expected_dim} "
            "(the text embedding width of the CLIP variant)"
        )
    return data.float()
