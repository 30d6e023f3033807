"""Training RoIs: ground truth appended to the proposals, IoU labels, balanced sampling.

detectron2's ``ROIHeads.label_and_sample_proposals`` with RegionCLIP's
``ONLY_SAMPLE_FG_PROPOSALS`` option: the frozen offline RPN proposes, each proposal takes the
class of its best ground truth when their IoU reaches 0.5 (background otherwise), and 512 RoIs
per image are sampled with at most 25% foreground.
"""
import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

from ..structures import Boxes, Instances, pairwise_iou
from .box_coder import Box2BoxTransform
from .matcher import IGNORE, NEGATIVE, Matcher, subsample_labels

# Objectness logit of an appended ground-truth box: sigmoid^-1(1 - 1e-10), as detectron2.
GT_OBJECTNESS_LOGIT = math.log((1.0 - 1e-10) / (1 - (1.0 - 1e-10)))


@dataclass(frozen=True)
class RoISampling:
    """How training RoIs are chosen (``MODEL.ROI_HEADS.*``, ``CLIP.ONLY_SAMPLE_FG_PROPOSALS``).

    only_foreground: keep only foreground RoIs (up to batch_size * positive_fraction); an image
    without ground truth keeps one background RoI, as the original.
    """

    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    iou_thresholds: Tuple[float, ...] = (0.5,)
    iou_labels: Tuple[int, ...] = (0, 1)
    append_gt: bool = True
    only_foreground: bool = False

    def matcher(self) -> Matcher:
        return Matcher(self.iou_thresholds, self.iou_labels, allow_low_quality_matches=False)


def append_ground_truth(proposals: List[Instances], targets: List[Instances]) -> List[Instances]:
    """Proposals followed by their image's ground-truth boxes (objectness: near-certain)."""
    merged = []
    for props, gt in zip(proposals, targets):
        boxes = gt.gt_boxes.tensor.to(props.proposal_boxes.device)
        logits = torch.full((len(boxes),), GT_OBJECTNESS_LOGIT, device=boxes.device)
        gt_props = Instances(props.image_size, proposal_boxes=Boxes(boxes),
                             objectness_logits=logits.to(props.objectness_logits.dtype))
        merged.append(Instances.cat([props, gt_props]))
    return merged


def _check_classes(gt_classes: torch.Tensor, num_classes: int) -> None:
    if gt_classes.numel() and not bool(((gt_classes >= 0) & (gt_classes < num_classes)).all()):
        raise ValueError(
            f"Ground-truth classes must be contiguous ids in [0, {num_classes}) (the training "
            f"vocabulary, MODEL.ROI_HEADS.NUM_CLASSES), got values in "
            f"[{int(gt_classes.min())}, {int(gt_classes.max())}]"
        )


def _label_proposals(matched_idxs, matched_labels, gt_classes, num_classes: int):
    """[N] class of each proposal: its gt's class, ``num_classes`` for background, -1 ignored."""
    if gt_classes.numel() == 0:
        return torch.full_like(matched_idxs, num_classes)
    labels = gt_classes[matched_idxs]
    labels[matched_labels == NEGATIVE] = num_classes
    labels[matched_labels == IGNORE] = -1
    return labels


def _sample(labels: torch.Tensor, has_gt: bool, num_classes: int, sampling: RoISampling):
    """Indices of the sampled proposals: foreground first, then background."""
    fg, bg = subsample_labels(labels, sampling.batch_size_per_image, sampling.positive_fraction,
                              num_classes)
    if not sampling.only_foreground:
        return torch.cat([fg, bg])
    if has_gt:
        return fg
    return torch.zeros(min(1, labels.numel()), dtype=torch.int64, device=labels.device)


def _sample_image(props: Instances, gt: Instances, num_classes: int,
                  sampling: RoISampling) -> Instances:
    has_gt = len(gt) > 0
    _check_classes(gt.gt_classes, num_classes)
    quality = pairwise_iou(gt.gt_boxes, props.proposal_boxes)
    matched_idxs, matched_labels = sampling.matcher()(quality)
    labels = _label_proposals(matched_idxs, matched_labels, gt.gt_classes, num_classes)
    keep = _sample(labels, has_gt, num_classes, sampling)
    sampled = props[keep]
    sampled.gt_classes = labels[keep]
    sampled.gt_index = matched_idxs[keep]
    # Background RoIs keep their best gt's box (or their own without gt): it is never used.
    gt_boxes = gt.gt_boxes.tensor[matched_idxs[keep]] if has_gt else sampled.proposal_boxes.tensor
    sampled.gt_boxes = Boxes(gt_boxes.clone())
    return sampled


@torch.no_grad()
def label_and_sample_proposals(proposals: List[Instances], targets: List[Instances],
                               num_classes: int, sampling: RoISampling) -> List[Instances]:
    """Training RoIs of each image.

    Args:
        proposals: per image ``proposal_boxes`` and ``objectness_logits``.
        targets: per image ``gt_boxes`` and ``gt_classes`` (contiguous, < num_classes).
        num_classes: foreground classes; label ``num_classes`` is background.
    Returns:
        per image the sampled proposals (foreground first) with ``gt_classes`` (class or
        background), ``gt_boxes`` (matched ground-truth box) and ``gt_index`` (index of that
        box in the image's targets, e.g. to crop its mask).
    """
    if sampling.append_gt:
        proposals = append_ground_truth(proposals, targets)
    return [_sample_image(p, t.to(p.proposal_boxes.device), num_classes, sampling)
            for p, t in zip(proposals, targets)]


def regression_targets(sampled: Sequence[Instances], num_classes: int,
                       box_coder: Box2BoxTransform) -> Tuple[torch.Tensor, torch.Tensor]:
    """(foreground [R] bool, target deltas [F, 4]) of the sampled RoIs of all images.

    Deltas encode each foreground RoI's matched ground-truth box relative to the RoI.
    """
    classes = torch.cat([s.gt_classes for s in sampled])
    foreground = (classes >= 0) & (classes < num_classes)
    boxes = torch.cat([s.proposal_boxes.tensor for s in sampled])
    gt_boxes = torch.cat([s.gt_boxes.tensor for s in sampled])
    return foreground, box_coder.get_deltas(boxes[foreground], gt_boxes[foreground])
