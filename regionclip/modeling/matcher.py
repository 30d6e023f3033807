"""Assigning predictions to ground truth by IoU, and balanced fg/bg subsampling.

detectron2 semantics (`modeling/matcher.py`, `modeling/sampling.py`), which the RPN and the
RoI heads were trained with.
"""
import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

from ..events import put_scalar
from ..structures import Boxes, Instances, pairwise_iou
from .box_coder import Box2BoxTransform

IGNORE, NEGATIVE, POSITIVE = -1, 0, 1


class Matcher:
    """Give each prediction its best ground truth and a label from IoU thresholds.

    Example: ``Matcher([0.3, 0.5], [0, -1, 1])`` labels IoU < 0.3 as 0 (background),
    0.3 <= IoU < 0.5 as -1 (ignored) and IoU >= 0.5 as 1 (foreground).
    """

    def __init__(
        self,
        thresholds: Sequence[float],
        labels: Sequence[int],
        allow_low_quality_matches: bool = False,
    ):
        """Args:
        thresholds: increasing IoU cut points, the first one > 0.
        labels: len(thresholds) + 1 values in {-1, 0, 1}, one per interval.
        allow_low_quality_matches: also label 1 every prediction that is the best match
            (ties included) of some ground truth, whatever its IoU (Faster R-CNN RPN rule i).
        """
        thresholds = list(thresholds)
        if not thresholds or thresholds[0] <= 0:
            raise ValueError(f"Matcher thresholds must be non-empty and > 0, got {thresholds}")
        if any(lo > hi for lo, hi in zip(thresholds[:-1], thresholds[1:])):
            raise ValueError(f"Matcher thresholds must be increasing, got {thresholds}")
        if len(labels) != len(thresholds) + 1 or any(x not in (-1, 0, 1) for x in labels):
            raise ValueError(f"Need {len(thresholds) + 1} labels in {{-1, 0, 1}}, got {labels}")
        self.thresholds = [-float("inf")] + thresholds + [float("inf")]
        self.labels = list(labels)
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, match_quality_matrix: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """[M, N] non-negative quality (IoU) of M gt x N predictions -> (matches: [N] int64
        index of the best gt, 0 without gt; match_labels: [N] int8, ``labels[0]`` without gt)."""
        if match_quality_matrix.dim() != 2:
            raise ValueError(f"Expected an [M, N] matrix, got {tuple(match_quality_matrix.shape)}")
        num_pred = match_quality_matrix.shape[1]
        if match_quality_matrix.numel() == 0:
            # No gt means IoU 0 with everything, hence the label of the lowest interval.
            matches = match_quality_matrix.new_zeros((num_pred,), dtype=torch.int64)
            labels = match_quality_matrix.new_full((num_pred,), self.labels[0], dtype=torch.int8)
            return matches, labels
        if not bool((match_quality_matrix >= 0).all()):
            raise ValueError("Matcher needs a match quality matrix with values >= 0")

        matched_vals, matches = match_quality_matrix.max(dim=0)
        match_labels = matches.new_full(matches.shape, POSITIVE, dtype=torch.int8)
        for label, low, high in zip(self.labels, self.thresholds[:-1], self.thresholds[1:]):
            match_labels[(matched_vals >= low) & (matched_vals < high)] = label
        if self.allow_low_quality_matches:
            # Like detectron2, ``matches`` is left alone: such a prediction keeps its own best gt.
            best_per_gt = match_quality_matrix.max(dim=1).values
            match_labels[(match_quality_matrix == best_per_gt[:, None]).any(dim=0)] = POSITIVE
        return matches, match_labels


def subsample_labels(
    labels: torch.Tensor, num_samples: int, positive_fraction: float, bg_label: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Random pos_idx [P], neg_idx [Q] (int64 indices into ``labels`` [N], P + Q <= num_samples).

    Positives (label not -1 and not ``bg_label``) are sampled up to
    ``int(num_samples * positive_fraction)``; negatives (``bg_label``) fill the rest.
    """
    positive = ((labels != IGNORE) & (labels != bg_label)).nonzero().flatten()
    negative = (labels == bg_label).nonzero().flatten()
    num_pos = min(positive.numel(), int(num_samples * positive_fraction))
    num_neg = min(negative.numel(), num_samples - num_pos)
    pos_perm = torch.randperm(positive.numel(), device=positive.device)[:num_pos]
    neg_perm = torch.randperm(negative.numel(), device=negative.device)[:num_neg]
    return positive[pos_perm], negative[neg_perm]


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


def _sample_image(props: Instances, gt: Instances, num_classes: int,
                  sampling: RoISampling) -> Instances:
    _check_classes(gt.gt_classes, num_classes)
    matcher = Matcher(sampling.iou_thresholds, sampling.iou_labels)
    matched_idxs, matched_labels = matcher(pairwise_iou(gt.gt_boxes, props.proposal_boxes))
    has_gt = len(gt) > 0
    # Class of each proposal: its gt's class, ``num_classes`` for background, -1 ignored.
    labels = torch.full_like(matched_idxs, num_classes)
    if has_gt:
        labels = gt.gt_classes[matched_idxs]
        labels[matched_labels == NEGATIVE] = num_classes
        labels[matched_labels == IGNORE] = -1
    fg, bg = subsample_labels(labels, sampling.batch_size_per_image, sampling.positive_fraction,
                              num_classes)
    if not sampling.only_foreground:
        keep = torch.cat([fg, bg])
    else:
        keep = fg if has_gt else torch.zeros(min(1, labels.numel()), dtype=torch.int64,
                                             device=labels.device)
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
    """Training RoIs of each image: the sampled ``proposals`` (foreground first) with
    ``gt_classes`` (the class, or ``num_classes`` for background), ``gt_boxes`` (matched
    ground-truth box) and ``gt_index`` (that box's index in ``targets``, e.g. to crop its mask).
    ``targets``: per image ``gt_boxes`` and ``gt_classes`` (contiguous, < num_classes).
    """
    if sampling.append_gt:
        proposals = append_ground_truth(proposals, targets)
    sampled = [_sample_image(p, t.to(p.proposal_boxes.device), num_classes, sampling)
               for p, t in zip(proposals, targets)]
    if sampled:  # per image, as detectron2 reports them
        classes = torch.cat([s.gt_classes for s in sampled])
        put_scalar("roi_head/num_fg_samples",
                   ((classes >= 0) & (classes < num_classes)).sum() / len(sampled))
        put_scalar("roi_head/num_bg_samples", (classes == num_classes).sum() / len(sampled))
    return sampled


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
