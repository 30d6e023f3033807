"""Text-embedding classifier and box post-processing of the region head.

Region embeddings are classified by cosine similarity with frozen text embeddings divided by
a temperature; background is a fixed all-zero embedding, so its logit is always 0. Deltas are
class-agnostic and regressed from the unnormalised embedding, as in the original.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import batched_nms
from ..structures import Boxes, Instances
from .box_coder import Box2BoxTransform
from .losses import box_regression_loss, classification_loss
from .roi_sampling import regression_targets
from .soft_nms import batched_soft_nms


def _frozen_linear(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight.data.copy_(weight)
    layer.weight.requires_grad_(False)
    return layer


class TextEmbeddingPredictor(nn.Module):
    """Scores regions against a vocabulary of text embeddings.

    Attribute names are the official checkpoint names under ``roi_heads.box_predictor``:
    ``cls_score`` (training vocabulary, [C, D]), ``cls_bg_score`` (zeros, [1, D]),
    ``test_cls_score`` (open-set test vocabulary, [C_test, D], optional), ``bbox_pred``.
    """

    def __init__(
        self,
        train_embeddings: torch.Tensor,
        test_embeddings: Optional[torch.Tensor] = None,
        temperature: float = 0.01,
    ):
        super().__init__()
        embed_dim = train_embeddings.shape[1]
        self.temperature = temperature
        self.cls_score = _frozen_linear(train_embeddings)
        self.cls_bg_score = _frozen_linear(torch.zeros(1, embed_dim))
        self.test_cls_score = None if test_embeddings is None else _frozen_linear(test_embeddings)
        self.bbox_pred = nn.Linear(embed_dim, 4)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.bbox_pred.bias)

    @property
    def num_classes(self) -> int:
        """Classes scored now: the test vocabulary in eval mode when one is set."""
        return self._vocabulary().weight.shape[0]

    def _vocabulary(self) -> nn.Linear:
        if not self.training and self.test_cls_score is not None:
            return self.test_cls_score
        return self.cls_score

    def set_test_embeddings(self, embeddings: torch.Tensor) -> None:
        """Replace the test vocabulary ([C, D], unnormalised rows are fine)."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.cls_score.weight.shape[1]:
            raise ValueError(
                f"Vocabulary embeddings must be [C, {self.cls_score.weight.shape[1]}], "
                f"got {list(embeddings.shape)}"
            )
        device = self.cls_score.weight.device
        self.test_cls_score = _frozen_linear(embeddings.to(device, torch.float32))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """x: [R, D] region embeddings -> (logits [R, C+1] with background last, deltas [R, 4])."""
        normalized = F.normalize(x, dim=1)
        text = F.normalize(self._vocabulary().weight, dim=1)
        background = self.cls_bg_score(normalized)
        logits = torch.cat([normalized @ text.t(), background], dim=1) / self.temperature
        return logits, self.bbox_pred(x)


@dataclass
class InferenceSettings:
    """Post-processing knobs (ROI_HEADS.* and MODEL.CLIP.* of the config)."""

    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_image: int = 100
    no_box_delta: bool = False
    multiply_rpn_score: bool = False
    report_unfused_scores: bool = False  # MODEL.CLIP.VIS
    soft_nms: bool = False
    soft_nms_method: str = "gaussian"
    soft_nms_sigma: float = 0.5
    soft_nms_prune: float = 0.001
    box_reg_weights: Tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)


@dataclass(frozen=True)
class LossSettings:
    """Training-loss knobs: MODEL.CLIP.FOCAL_SCALED_LOSS (gamma, 0 = plain or weighted CE) and
    BG_CLS_LOSS_WEIGHT, MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA / BBOX_REG_LOSS_WEIGHT /
    BBOX_REG_WEIGHTS."""

    focal_gamma: float = 0.0
    bg_weight: float = 1.0
    smooth_l1_beta: float = 0.0
    box_reg_loss_weight: float = 1.0
    box_reg_weights: Tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)


def predictor_losses(logits: torch.Tensor, deltas: torch.Tensor, sampled: List[Instances],
                     settings: LossSettings) -> Dict[str, torch.Tensor]:
    """``loss_cls`` and ``loss_box_reg`` of the sampled RoIs of a batch (reference 6.2).

    logits: [R, C + 1] against the training vocabulary (background last); deltas: [R, 4];
    sampled: per image RoIs with ``gt_classes`` and ``gt_boxes`` (`label_and_sample_proposals`).
    """
    classes = torch.cat([s.gt_classes for s in sampled])
    coder = Box2BoxTransform(weights=settings.box_reg_weights)
    foreground, targets = regression_targets(sampled, logits.shape[1] - 1, coder)
    box_loss = box_regression_loss(deltas, targets, foreground, settings.smooth_l1_beta)
    return {
        "loss_cls": classification_loss(logits, classes, settings.focal_gamma, settings.bg_weight),
        "loss_box_reg": box_loss * settings.box_reg_loss_weight,
    }


def predict_probs(logits: torch.Tensor, proposals: List[Instances], fuse_rpn: bool):
    """Softmax over classes + background, optionally fused with the RPN score.

    The original fuses with the proposal's *raw objectness logit*: sqrt(p * logit). Proposals
    with a negative logit get NaN scores and are dropped later as non-finite; scores can
    exceed 1. This is kept on purpose so that published LVIS numbers reproduce.
    Returns (fused probs, unfused probs), each split per image.
    """
    probs = F.softmax(logits, dim=-1)
    fused = probs
    if fuse_rpn:
        objectness = torch.cat([p.objectness_logits for p in proposals])
        fused = (probs * objectness[:, None]) ** 0.5
    sizes = [len(p) for p in proposals]
    return fused.split(sizes), probs.split(sizes)


def predict_boxes(deltas, proposals: List[Instances], settings: InferenceSettings):
    boxes = [p.proposal_boxes.tensor for p in proposals]
    if settings.no_box_delta:
        return boxes
    coder = Box2BoxTransform(weights=settings.box_reg_weights)
    decoded = coder.apply_deltas(deltas, torch.cat(boxes))
    return decoded.split([len(b) for b in boxes])


def detect_single_image(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    unfused_scores: torch.Tensor,
    image_size: Tuple[int, int],
    settings: InferenceSettings,
) -> Tuple[Instances, torch.Tensor]:
    """Threshold, per-class NMS (or soft-NMS) and top-k for one image.

    boxes: [R, 4] class-agnostic; scores, unfused_scores: [R, C+1] (background last).
    Returns the detections and, for each, the index of the proposal it came from.
    """
    valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores).all(dim=1)
    proposal_index = valid.nonzero().squeeze(1)
    boxes = Boxes(boxes[valid])
    boxes.clip(image_size)
    scores, unfused_scores = scores[valid, :-1], unfused_scores[valid, :-1]

    candidates = (scores > settings.score_thresh).nonzero()
    rows, classes = candidates.unbind(1)
    cand_boxes, cand_scores = boxes.tensor[rows], scores[rows, classes]
    if settings.soft_nms:
        keep, cand_scores = batched_soft_nms(
            cand_boxes, cand_scores, classes, settings.soft_nms_method,
            settings.soft_nms_sigma, settings.nms_thresh, settings.soft_nms_prune,
        )
        reported = cand_scores
    else:
        keep = batched_nms(cand_boxes, cand_scores, classes, settings.nms_thresh)
        reported = cand_scores[keep]
    if settings.detections_per_image >= 0:  # negative keeps all, as detectron2
        keep = keep[: settings.detections_per_image]
        reported = reported[: settings.detections_per_image]
    if settings.report_unfused_scores and not settings.soft_nms:
        reported = unfused_scores[rows[keep], classes[keep]]

    result = Instances(image_size)
    result.pred_boxes = Boxes(cand_boxes[keep])
    result.scores = reported
    result.pred_classes = classes[keep]
    return result, proposal_index[rows[keep]]
