"""The class-agnostic mask head of the LVIS fine-tuned checkpoints and mask pasting.

The head is detectron2's ``MaskRCNNConvUpsampleHead`` with no conv layers: a 2x transposed
conv on the res5 RoI features (the input of the attention pool) and a 1x1 predictor, so a
7x7 (RN50) or 9x9 (RN50x4) RoI yields a 14x14 or 18x18 mask.
"""
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from ..structures import Instances


class MaskHead(nn.Module):
    def __init__(self, in_channels: int, conv_dim: int = 256, num_classes: int = 1):
        super().__init__()
        self.deconv = nn.ConvTranspose2d(in_channels, conv_dim, kernel_size=2, stride=2)
        self.predictor = nn.Conv2d(conv_dim, num_classes, kernel_size=1)
        nn.init.kaiming_normal_(self.deconv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.deconv.bias)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, res5_features: torch.Tensor) -> torch.Tensor:
        """[R, C, S, S] -> mask logits [R, num_classes, 2S, 2S]."""
        return self.predictor(F.relu(self.deconv(res5_features)))


def attach_mask_probs(mask_logits: torch.Tensor, instances: List[Instances]) -> None:
    """Store per-detection mask probabilities [R, 1, M, M] as ``pred_masks``.

    For a class-specific head the channel of the predicted class is taken.
    """
    if mask_logits.shape[1] > 1:
        classes = torch.cat([x.pred_classes for x in instances])
        mask_logits = mask_logits[torch.arange(len(classes)), classes][:, None]
    for inst, probs in zip(instances, mask_logits.sigmoid().split([len(x) for x in instances])):
        inst.pred_masks = probs


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, image_size, threshold: float = 0.5):
    """Paste [R, 1, M, M] mask probabilities into boolean [R, H, W] image masks.

    Each mask is resampled onto the pixels its box covers (pixel centres at +0.5, as
    detectron2's ``paste_masks_in_image``); pixels outside the box are background. Pasting
    works box by box on the box's own pixels so memory stays O(H * W) per detection.
    """
    height, width = image_size
    out = masks.new_zeros((len(masks), height, width), dtype=torch.bool)
    for i, (mask, box) in enumerate(zip(masks, boxes.tolist())):
        x0, y0 = max(int(box[0]), 0), max(int(box[1]), 0)
        x1, y1 = min(int(box[2]) + 1, width), min(int(box[3]) + 1, height)
        if x1 <= x0 or y1 <= y0:
            continue
        ys = torch.arange(y0, y1, device=masks.device, dtype=torch.float32) + 0.5
        xs = torch.arange(x0, x1, device=masks.device, dtype=torch.float32) + 0.5
        # Pixel centres in the [-1, 1] coordinates of the box, as grid_sample expects.
        gy = (ys - box[1]) / max(box[3] - box[1], 1e-6) * 2 - 1
        gx = (xs - box[0]) / max(box[2] - box[0], 1e-6) * 2 - 1
        grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=2)[None]
        pasted = F.grid_sample(mask[None].float(), grid, align_corners=False)[0, 0]
        out[i, y0:y1, x0:x1] = pasted >= threshold
    return out
