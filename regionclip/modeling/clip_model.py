"""CLIPModel: a whole-image CLIP (ModifiedResNet + text tower) trained from scratch.

The stand-in for OpenAI CLIP where no pretrained weights can be downloaded (the toy world):
images and captions are matched with CLIP's symmetric InfoNCE and a learnt logit scale.
Its state dict has exactly OpenAI CLIP's layout (``visual.*``, ``transformer.*``,
``token_embedding.weight``, ``positional_embedding``, ``ln_final.*``, ``text_projection``,
``logit_scale``), so a ``model_final.pth`` it writes loads wherever OpenAI's weights load:
as a pretrainer's teacher and student, a zero-shot detector's trunk, or the text tower of
``tools/extract_concept_features.py``.

Unlike the detection trunks, the image tower trains its batch norms (nothing is frozen when
training from scratch); the detectors later read their running statistics as frozen BN.
"""
import math
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config.variants import CLIPVariant
from ..ops import FrozenBatchNorm2d
from .clip_resnet import CLIPResNet
from .pretrain_losses import image_text_contrastive
from .pretrainer import random_caption
from .text_encoder import TextEncoder

INITIAL_TEMPERATURE = 0.07  # CLIP's initial logit scale is ln(1 / 0.07)
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the scale at 100


def trainable_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every FrozenBatchNorm2d in ``module`` (in place) by a BatchNorm2d copy."""
    for name, child in module.named_children():
        if isinstance(child, FrozenBatchNorm2d):
            norm = nn.BatchNorm2d(child.weight.numel(), eps=child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(norm, key).data.copy_(getattr(child, key))
            setattr(module, name, norm)
        else:
            trainable_batchnorm(child)
    return module


def letterbox(image: torch.Tensor, size: int) -> torch.Tensor:
    """[3, H, W] normalised image -> [3, size, size]: longer side to ``size`` (aspect kept),
    padded right/bottom with zeros (the mean colour after normalisation)."""
    height, width = image.shape[-2:]
    scale = size / max(height, width)
    new = (max(1, round(height * scale)), max(1, round(width * scale)))
    resized = F.interpolate(image[None], size=new, mode="bilinear", antialias=True,
                            align_corners=False)[0]
    return F.pad(resized, (0, size - new[1], 0, size - new[0]))


class CLIPModel(TextEncoder):
    """OpenAI-CLIP-layout image-text model for ``variant``.

    Args:
        variant: sizes of both towers.
        pixel_mean / pixel_std: CLIP statistics on the 0-1 scale (inputs are in [0, 1]).
        gather: all-gather embeddings across processes for the contrastive loss.
    """

    def __init__(self, variant: CLIPVariant, pixel_mean: Sequence[float],
                 pixel_std: Sequence[float], gather: bool = False):
        super().__init__(variant)
        self.visual = trainable_batchnorm(CLIPResNet(variant, freeze_at=0))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / INITIAL_TEMPERATURE)))
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.gather = gather

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def preprocess(self, images: List[torch.Tensor]) -> torch.Tensor:
        """[3, H_i, W_i] RGB in [0, 1] -> [N, 3, S, S] normalised, S = variant.image_size."""
        size = self.variant.image_size
        return torch.stack([letterbox((x.to(self.device) - self.pixel_mean) / self.pixel_std,
                                      size) for x in images])

    def encode_image(self, images: List[torch.Tensor]) -> torch.Tensor:
        """[N, D] unnormalised whole-image embeddings."""
        return self.visual.encode_image(self.preprocess(images))

    def forward(self, batched_inputs: List[Dict]) -> Dict[str, torch.Tensor]:
        """Training: ``{"loss_img_txt": ...}`` for dicts with ``image`` (float [3, H, W] in
        [0, 1]) and ``tokens`` ([n_captions, L]; one caption per image is drawn)."""
        if not self.training:
            raise RuntimeError("CLIPModel.forward computes the training loss; use "
                               "encode_image / encode_text for embeddings")
        images = self.encode_image([x["image"] for x in batched_inputs])
        tokens = torch.stack([random_caption(x["tokens"]) for x in batched_inputs])
        texts = self.encode_text(tokens.to(self.device))
        scale = self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
        loss = image_text_contrastive(images, texts, temperature=1.0 / scale,
                                      gather=self.gather)
        return {"loss_img_txt": loss}
