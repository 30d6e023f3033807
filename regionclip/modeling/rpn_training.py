"""Training the offline RPN alone: anchor labels, the two RPN losses, and `ProposalNetwork`.

The offline RPN files (``rpn_coco_48.pth``: R50-C4, ``rpn_lvis_866*.pth``: R50-FPN) came from
whole Mask R-CNNs, but RegionCLIP only ever uses their ``backbone.*`` and
``proposal_generator.*`` weights. We train that part alone, as detectron2's ``ProposalNetwork``,
with detectron2's losses; the checkpoint works as ``MODEL.CLIP.BB_RPN_WEIGHTS`` unchanged.
"""
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..events import put_scalar
from ..structures import Boxes, ImageList, Instances, pairwise_iou
from .box_coder import Box2BoxTransform
from .losses import smooth_l1_loss
from .matcher import IGNORE, NEGATIVE, POSITIVE, Matcher, subsample_labels
from .rpn import RPN, OfflineRPNInput


@dataclass(frozen=True)
class RPNTraining:
    """Anchor labelling and loss settings (``MODEL.RPN.*``), detectron2's defaults.

    Anchors are matched at IoU (0.3, 0.7) with low-quality matches; 256 per image are sampled,
    at most half positive. boundary_thresh: anchors reaching further than this outside the
    image are ignored; < 0 keeps all. objectness_weight = LOSS_WEIGHT, box_weight =
    LOSS_WEIGHT x BBOX_REG_LOSS_WEIGHT.
    """

    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    iou_thresholds: Tuple[float, ...] = (0.3, 0.7)
    iou_labels: Tuple[int, ...] = (0, -1, 1)
    boundary_thresh: float = -1.0
    smooth_l1_beta: float = 0.0
    objectness_weight: float = 1.0
    box_weight: float = 1.0


@torch.no_grad()
def label_anchors(anchors: Boxes, gt_boxes: Boxes, image_size,
                  settings: RPNTraining) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sampled labels [A] (1 object, 0 background, -1 ignored) and matched gt boxes [A, 4].

    anchors: all levels' anchors of one image; gt_boxes: that image's boxes. Labelled anchors
    outside the random balanced sample become ignored.
    """
    matcher = Matcher(settings.iou_thresholds, settings.iou_labels, allow_low_quality_matches=True)
    matched_idxs, labels = matcher(pairwise_iou(gt_boxes, anchors))
    if settings.boundary_thresh >= 0:
        (height, width), t, box = image_size, settings.boundary_thresh, anchors.tensor
        inside = ((box[:, 0] >= -t) & (box[:, 1] >= -t)
                  & (box[:, 2] < width + t) & (box[:, 3] < height + t))
        labels[~inside] = IGNORE
    pos, neg = subsample_labels(labels, settings.batch_size_per_image, settings.positive_fraction,
                                NEGATIVE)
    labels = torch.full_like(labels, IGNORE)
    labels[pos], labels[neg] = POSITIVE, NEGATIVE
    if len(gt_boxes) == 0:
        return labels, torch.zeros_like(anchors.tensor)
    return labels, gt_boxes.tensor[matched_idxs]


def rpn_losses(anchors: Boxes, logits: torch.Tensor, deltas: torch.Tensor, labels: torch.Tensor,
               matched_boxes: torch.Tensor, box_coder: Box2BoxTransform,
               settings: RPNTraining) -> Dict[str, torch.Tensor]:
    """``loss_rpn_cls`` and ``loss_rpn_loc`` of a batch.

    anchors: [A] shared by all images; logits: [N, A]; deltas: [N, A, 4]; labels: [N, A] from
    `label_anchors`; matched_boxes: [N, A, 4]. Both sums are divided by
    batch_size_per_image x N, as detectron2 (not by the anchors actually sampled).
    """
    positive = labels == POSITIVE
    valid = labels >= 0
    anchor_idx = positive.nonzero()[:, 1]
    targets = box_coder.get_deltas(anchors.tensor[anchor_idx], matched_boxes[positive])
    box_loss = smooth_l1_loss(deltas[positive], targets, settings.smooth_l1_beta)
    objectness_loss = F.binary_cross_entropy_with_logits(
        logits[valid], labels[valid].to(logits.dtype), reduction="sum")
    normalizer = settings.batch_size_per_image * labels.shape[0]
    return {"loss_rpn_cls": objectness_loss / normalizer * settings.objectness_weight,
            "loss_rpn_loc": box_loss / normalizer * settings.box_weight}


def batch_rpn_losses(rpn: RPN, head_outputs, gt_boxes: Sequence[Boxes], image_sizes,
                     settings: RPNTraining) -> Dict[str, torch.Tensor]:
    """RPN losses of a batch from ``rpn.head_outputs(features)`` and each image's gt boxes."""
    anchors, logits, deltas = head_outputs
    anchors = Boxes.cat(anchors)
    labelled = [label_anchors(anchors, gt, size, settings)
                for gt, size in zip(gt_boxes, image_sizes)]
    labels, matched = (torch.stack(t) for t in zip(*labelled))
    put_scalar("rpn/num_pos_anchors", (labels == POSITIVE).sum() / len(labels))
    put_scalar("rpn/num_neg_anchors", (labels == NEGATIVE).sum() / len(labels))
    return rpn_losses(anchors, torch.cat(logits, dim=1), torch.cat(deltas, dim=1), labels,
                      matched, rpn.box2box_transform, settings)


def rescale_proposals(proposals: Instances, height: int, width: int) -> Instances:
    """Proposals in the original image's pixels (detectron2's ``detector_postprocess``)."""
    scale_x, scale_y = width / proposals.image_size[1], height / proposals.image_size[0]
    result = Instances((height, width), **proposals.get_fields())
    result.proposal_boxes = result.proposal_boxes.clone()
    result.proposal_boxes.scale(scale_x, scale_y)
    result.proposal_boxes.clip((height, width))
    return result[result.proposal_boxes.nonempty()]


class ProposalNetwork(nn.Module):
    """A detectron2 backbone + RPN, trained alone (detectron2's ``ProposalNetwork``).

    Parameter names are ``backbone.*`` and ``proposal_generator.*``, those of the offline RPN
    files. Training mode returns ``{"loss_rpn_cls", "loss_rpn_loc"}``; eval mode returns
    ``[{"proposals": Instances}]`` at each input's ``height`` x ``width``.
    """

    def __init__(self, *, backbone: nn.Module, proposal_generator: RPN,
                 input_normalization: OfflineRPNInput, settings: RPNTraining):
        """input_normalization: pixel mean/std and channel order, shared with the offline-RPN
        path so a trained RPN sees identically normalised images when it is used there."""
        super().__init__()
        self.backbone = backbone
        self.proposal_generator = proposal_generator
        self.input_normalization = input_normalization
        self.training_settings = settings

    @property
    def device(self) -> torch.device:
        return next(self.proposal_generator.parameters()).device

    def preprocess(self, batched_inputs: List[Dict]) -> ImageList:
        images = [self.input_normalization.normalize(x["image"].to(self.device))
                  for x in batched_inputs]
        return ImageList.from_tensors(images, self.backbone.size_divisibility)

    def forward(self, batched_inputs: List[Dict]):
        images = self.preprocess(batched_inputs)
        features = self.backbone(images.tensor)
        if self.training:
            return self.losses(images, features, batched_inputs)
        proposals = self.proposal_generator(images, features)
        return [{"proposals": rescale_proposals(p, x.get("height", p.image_size[0]),
                                                x.get("width", p.image_size[1]))}
                for p, x in zip(proposals, batched_inputs)]

    def losses(self, images: ImageList, features: Dict[str, torch.Tensor],
               batched_inputs: Sequence[Dict]) -> Dict[str, torch.Tensor]:
        if any("instances" not in x for x in batched_inputs):
            raise ValueError("Training an RPN needs 'instances' with gt_boxes in every input")
        outputs = self.proposal_generator.head_outputs(features)
        gt_boxes = [x["instances"].gt_boxes.to(self.device) for x in batched_inputs]
        return batch_rpn_losses(self.proposal_generator, outputs, gt_boxes, images.image_sizes,
                                self.training_settings)
