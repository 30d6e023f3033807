"""Recall of ground-truth boxes by region proposals (evaluating an RPN alone).

The semantics are detectron2's ``_evaluate_box_proposals``: per image the top-k proposals by
objectness are matched one-to-one to the ground truth greedily (repeatedly the
ground-truth box with the best remaining IoU takes that proposal), a ground-truth box counts
as recalled at IoU t when its matched IoU is >= t, and AR@k is the recall averaged over IoU
0.5:0.95 step 0.05. One deliberate difference: detectron2 skips images without proposals,
ground truth included; here their ground truth counts as missed.
"""
import logging

import torch

from ..structures import Boxes, pairwise_iou

logger = logging.getLogger(__name__)

AR_THRESHOLDS = torch.arange(0.5, 0.95 + 1e-5, 0.05, dtype=torch.float32)


def greedy_matched_overlaps(proposals: Boxes, gt_boxes: Boxes) -> torch.Tensor:
    """IoU of each ground-truth box with the proposal greedily assigned to it [G] (0 = none).

    Every given proposal competes (the caller keeps the top-k); each step takes the best
    remaining (proposal, ground truth) pair and removes both, so a proposal covers one box.
    """
    matched = torch.zeros(len(gt_boxes))
    if len(proposals) == 0 or len(gt_boxes) == 0:
        return matched
    overlaps = pairwise_iou(proposals, gt_boxes).float()
    for _ in range(min(len(proposals), len(gt_boxes))):
        best_per_gt, best_proposal = overlaps.max(dim=0)
        best, gt_index = best_per_gt.max(dim=0)
        matched[gt_index] = best
        overlaps[best_proposal[gt_index], :] = -1
        overlaps[:, gt_index] = -1
    return matched


class ProposalRecallEvaluator:
    """Recall (percent) of non-crowd ground-truth boxes by the top-k proposals of each image.

    Inputs must carry ``instances`` with ``gt_boxes`` (the mapper's ``keep_annotations``, which
    already drops crowd regions); outputs ``{"proposals": Instances}`` with ``proposal_boxes``
    and ``objectness_logits`` at the inputs' ``height`` x ``width``.

    Args:
        output_dir: unused (nothing is written); kept for the evaluators' common signature.
        limits: the k of top-k proposals.
        iou_thresholds: IoUs of the single-threshold recalls ``R@k_IoU<t>``.
    """

    def __init__(self, output_dir="", limits=(100, 1000), iou_thresholds=(0.5, 0.7)):
        self.output_dir = output_dir
        self.limits = tuple(limits)
        self.iou_thresholds = tuple(iou_thresholds)
        self._predictions = []

    @property
    def predictions(self):
        """Per image ``{"image_id", "overlaps": {k: matched IoU per ground-truth box}}``: small
        enough to gather across processes, unlike the proposals themselves."""
        return self._predictions

    def reset(self):
        self._predictions = []

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            if "instances" not in inp:
                raise ValueError("Proposal recall needs ground truth: build the mapper with "
                                 "keep_annotations=True")
            proposals = out["proposals"].to("cpu")
            order = proposals.objectness_logits.argsort(descending=True)
            boxes = proposals.proposal_boxes[order]
            # The mapper's gt_boxes (resized input) in the original pixels of the proposals,
            # with the per-axis factors the model rescales by.
            (height, width), gt = proposals.image_size, inp["instances"]
            gt_boxes = gt.gt_boxes.clone().to("cpu")
            gt_boxes.scale(width / gt.image_size[1], height / gt.image_size[0])
            overlaps = {k: greedy_matched_overlaps(boxes[:k], gt_boxes) for k in self.limits}
            self._predictions.append({"image_id": inp.get("image_id"), "overlaps": overlaps})

    def evaluate(self, predictions=None):
        """``{"proposals": {"AR@k", "R@k_IoU<t>"}}`` in percent of ``predictions`` (default:
        what ``process`` collected in this process); ``{}`` without ground-truth boxes."""
        predictions = self._predictions if predictions is None else predictions
        if sum(len(p["overlaps"][self.limits[0]]) for p in predictions) == 0:
            logger.warning("No ground-truth boxes to recall: no proposal recall is reported")
            return {}
        metrics = {}
        for k in self.limits:
            overlaps = torch.cat([p["overlaps"][k] for p in predictions] or [torch.zeros(0)])
            metrics[f"AR@{k}"] = _mean_recall(overlaps, AR_THRESHOLDS)
            for t in self.iou_thresholds:
                metrics[f"R@{k}_IoU{t:g}"] = _mean_recall(overlaps, torch.tensor([t]))
        logger.info("Proposals: %s", ", ".join(f"{k}={v:.2f}" for k, v in metrics.items()))
        return {"proposals": metrics}


def _mean_recall(overlaps: torch.Tensor, thresholds: torch.Tensor) -> float:
    """Percent of ground-truth boxes with matched IoU >= t, averaged over ``thresholds``."""
    recalls = (overlaps[None, :] >= thresholds[:, None]).float().mean(dim=1)
    return float(recalls.mean() * 100)
