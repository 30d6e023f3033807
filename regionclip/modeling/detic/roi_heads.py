"""Detic's ``CustomRes5ROIHeads``: RoIAlign on res4 -> res5 -> spatial mean -> predictor.

detectron2's ``Res5ROIHeads`` with Detic's image-labelled path: box batches sample RoIs
against the ground truth (`matcher.py`), image-labelled batches score the top proposals
and the image box (`weak_losses.py`). State-dict names: ``res5.{0,1,2}.*`` (MSRA bottlenecks,
stride 2 in the first) and ``box_predictor.*``.
"""
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ...structures import Instances
from ..clip_resnet import INFERENCE_CHUNK, pool_regions
from ..matcher import RoISampling, label_and_sample_proposals
from ..resnet_fpn import BottleneckBlock
from .predictor import DeticBoxPredictor
from .weak_losses import CaptionBatch, WeakSupervision, top_proposals, weak_losses

RES5_BLOCKS = 3
RES4_STRIDE = 16


def build_res5(in_channels: int, bottleneck_channels: int, out_channels: int, *,
               num_groups: int = 1, norm: str = "FrozenBN", stride_in_1x1: bool = True,
               dilation: int = 1) -> nn.Sequential:
    """detectron2's res5 stage of a C4 head: three bottlenecks, the first with stride 2
    (RoIs of 14 x 14 become 7 x 7), or 1 with a dilated res5."""
    first_stride = 1 if dilation == 2 else 2
    return nn.Sequential(*[
        BottleneckBlock(in_channels if b == 0 else out_channels, out_channels,
                        bottleneck_channels=bottleneck_channels,
                        stride=first_stride if b == 0 else 1, num_groups=num_groups, norm=norm,
                        stride_in_1x1=stride_in_1x1, dilation=dilation)
        for b in range(RES5_BLOCKS)
    ])


class DeticRes5ROIHeads(nn.Module):
    """Region features, detections and the losses of box and image-labelled batches."""

    def __init__(self, res5: nn.Sequential, box_predictor: DeticBoxPredictor,
                 pooler_resolution: int = 14, sampling: RoISampling = RoISampling(),
                 weak: WeakSupervision = WeakSupervision()):
        super().__init__()
        self.res5 = res5
        self.box_predictor = box_predictor
        self.pooler_resolution = pooler_resolution
        self.sampling = sampling
        self.weak = weak

    @property
    def num_train_classes(self) -> int:
        return self.box_predictor.cls_score.zs_weight.shape[1] - 1

    def region_features(self, res4: torch.Tensor, boxes: List[torch.Tensor]) -> torch.Tensor:
        """[R, C5]: the spatial mean of each box's res5 map; in chunks without gradients."""
        pooled = pool_regions(res4, boxes, self.pooler_resolution, RES4_STRIDE)
        if torch.is_grad_enabled() or len(pooled) <= INFERENCE_CHUNK:
            return self.res5(pooled).mean(dim=(2, 3))
        return torch.cat([self.res5(chunk).mean(dim=(2, 3))
                          for chunk in pooled.split(INFERENCE_CHUNK)])

    def forward(self, features: Dict[str, torch.Tensor],
                proposals: List[Instances]) -> List[Instances]:
        """Detections per image, in the (resized) input coordinates."""
        x = self.region_features(features["res4"], [p.proposal_boxes.tensor for p in proposals])
        logits, deltas = self.box_predictor(x)
        return self.box_predictor.predict(logits, deltas, proposals)

    def losses(self, features: Dict[str, torch.Tensor], proposals: List[Instances],
               targets: List[Instances]) -> Dict[str, torch.Tensor]:
        """``loss_cls``, ``loss_box_reg`` of a box-annotated batch (targets: ``gt_boxes``,
        ``gt_classes``)."""
        sampled = label_and_sample_proposals(proposals, targets, self.num_train_classes,
                                             self.sampling)
        x = self.region_features(features["res4"], [s.proposal_boxes.tensor for s in sampled])
        logits, deltas = self.box_predictor(x)
        return self.box_predictor.losses(logits, deltas, sampled)

    def weak_losses(self, features: Dict[str, torch.Tensor], proposals: List[Instances],
                    labels: Sequence[Sequence[int]], captions: Optional[CaptionBatch],
                    ann_type: str) -> Dict[str, torch.Tensor]:
        """``image_loss`` of an image-labelled batch, with zero (still connected) box losses."""
        regions = top_proposals(proposals, self.weak)
        x = self.region_features(features["res4"], [r.proposal_boxes.tensor for r in regions])
        logits, deltas = self.box_predictor(x, None if captions is None else captions.features)
        return {"image_loss": weak_losses(logits, regions, labels, captions, ann_type, self.weak),
                "loss_cls": logits.sum() * 0.0, "loss_box_reg": deltas.sum() * 0.0}
