"""Class names -> text embeddings, with the text tower stored in a checkpoint."""
import logging
from typing import Sequence

import torch
from torch import nn

from .checkpoint import CheckpointError, load_checkpoint
from .config.variants import CLIPVariant
from .modeling.text_encoder import TextEncoder, concept_embeddings

logger = logging.getLogger("regionclip")


def load_text_encoder(weights: str, variant: CLIPVariant) -> TextEncoder:
    """The text tower of ``weights`` (a pretrained RegionCLIP file or OpenAI CLIP weights)."""
    holder = nn.Module()
    holder.lang_encoder = TextEncoder(variant)
    report = load_checkpoint(holder, weights)
    if report.missing or report.mismatched:
        raise CheckpointError(
            f"{weights} holds no complete {variant.name} text tower (lang_encoder.*): "
            f"{len(report.missing)} tensors missing, {len(report.mismatched)} mismatched. "
            "Fine-tuned detectors do not carry one; use the pretrained RegionCLIP file or "
            "OpenAI's CLIP weights of the same variant (see MODEL_ZOO.md)."
        )
    return holder.lang_encoder.eval()


@torch.no_grad()
def embed_class_names(names: Sequence[str], weights: str, variant: CLIPVariant,
                      device: str = "cpu") -> torch.Tensor:
    """[C, D] unnormalised embeddings (mean over the 81 prompt templates), as released."""
    encoder = load_text_encoder(weights, variant).to(device)
    logger.info("Encoding %d class names with the %s text tower of %s", len(names),
                variant.name, weights)
    return concept_embeddings(encoder, list(names)).cpu()
