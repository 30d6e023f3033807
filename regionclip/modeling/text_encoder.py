"""CLIP text tower, the prompt-ensemble class embeddings, and concept-embedding files.

The tower is open_clip's ``TextTransformer`` configured as OpenAI CLIP (QuickGELU, causal
mask, EOT pooling, bias-free projection). Its parameter names equal the official RegionCLIP
``lang_encoder.*`` names; the causal mask is a non-persistent buffer, so it is not in the
state dict, and there is no ``logit_scale``.
"""
import os
from typing import Optional, Sequence

import torch
from open_clip.transformer import LayerNormFp32, QuickGELU, TextTransformer

from ..atomic import atomic_open
from ..config.variants import CLIPVariant
from ..download_pages import missing_file_message
from ..prompts import PROMPT_TEMPLATES, build_prompts, tokenize

__all__ = ["TextEncoder", "check_finite_embeddings", "concept_embeddings", "load_embeddings",
           "save_embeddings"]

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


def save_embeddings(embeddings: torch.Tensor, path: str) -> None:
    """Write a [C, D] tensor with torch.save, atomically (temporary file + os.replace)."""
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be [C, D], got shape {tuple(embeddings.shape)}")
    with atomic_open(path, "wb") as f:
        # clone: a view would otherwise drag its whole base storage into the file
        torch.save(embeddings.detach().cpu().clone(), f)


def check_finite_embeddings(embeddings: torch.Tensor, source: str) -> None:
    """ValueError naming ``source`` and the rows holding NaN or infinity: one such row makes
    every region's scores NaN, which drops every detection without a word."""
    rows = (~torch.isfinite(embeddings)).flatten(1).any(dim=1).nonzero().flatten().tolist()
    if rows:
        shown = str(rows[:10])[:-1] + (", ...]" if len(rows) > 10 else "]")
        raise ValueError(f"{source}: rows {shown} of the {len(embeddings)} class embeddings "
                         "hold NaN or infinite values; recompute them")


def load_embeddings(path: str, expected_dim: Optional[int] = None) -> torch.Tensor:
    """Read a [C, D] embedding file (rows unnormalised, finite) as float32 on the CPU."""
    if not os.path.isfile(path):
        raise FileNotFoundError(missing_file_message(path, "class embedding file"))
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types for a damaged file
        raise ValueError(f"{path} is not a readable embedding file (one [num_classes, dim] "
                         f"tensor written by torch.save): {type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}") from err
    if not isinstance(data, torch.Tensor) or data.dim() != 2:
        got = tuple(data.shape) if isinstance(data, torch.Tensor) else type(data).__name__
        raise ValueError(f"{path} must hold one 2-D tensor [num_classes, dim], got {got}")
    if expected_dim is not None and data.shape[1] != expected_dim:
        raise ValueError(
            f"{path} holds {data.shape[1]}-dim embeddings, expected {expected_dim} "
            "(the text embedding width of the CLIP variant)"
        )
    check_finite_embeddings(data, path)
    return data.float()
