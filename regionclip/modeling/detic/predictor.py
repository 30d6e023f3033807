"""Detic's box predictor (``DeticFastRCNNOutputLayers`` of the OV-COCO models).

Classification by the zero-shot classifier (``cls_score``), class-agnostic box deltas from a
two-layer MLP (``bbox_pred.0`` / ``bbox_pred.2``), sigmoid (or softmax) scores. With
``IGNORE_ZERO_CATS`` the classes without training images (``freq_weight`` 0: the novel ones)
get no loss at all, neither as positives nor as negatives. Post-processing and box coding are
the core's (`box_predictor.py`).
"""
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...structures import Instances
from ..box_coder import Box2BoxTransform
from ..box_predictor import InferenceSettings, LossSettings, detect_images, predict_boxes
from ..losses import box_regression_loss, put_classification_stats
from ..matcher import regression_targets
from ..resnet_fpn import c2_xavier_fill
from .zero_shot_classifier import ZeroShotClassifier

# A class counts as seen in training when its frequency weight exceeds this (Detic's cut-off).
MIN_CLASS_FREQUENCY = 1e-4


def sigmoid_cross_entropy(logits: torch.Tensor, classes: torch.Tensor,
                          class_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-class BCE of [R, C + 1] logits (background column unused) against one-hot targets
    (all zero for background RoIs), weighted per class ([C]), summed and divided by R."""
    num_rois, num_classes = logits.shape[0], logits.shape[1] - 1
    if num_rois == 0:
        return logits.sum() * 0.0
    target = F.one_hot(classes, num_classes + 1)[:, :num_classes].to(logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits[:, :-1], target, reduction="none")
    if class_weight is not None:
        loss = loss * class_weight[None, :]
    return loss.sum() / num_rois


def softmax_cross_entropy(logits: torch.Tensor, classes: torch.Tensor,
                          class_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Cross-entropy over C + 1 columns; ``class_weight`` [C] weights the foreground classes
    (background keeps 1), PyTorch's weighted mean."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    weight = None if class_weight is None else torch.cat([class_weight, class_weight.new_ones(1)])
    return F.cross_entropy(logits, classes, weight=weight)


class DeticBoxPredictor(nn.Module):
    """Logits, deltas, losses and detections of the res5 head's [R, input_size] features.

    Args:
        cls_score: the zero-shot classifier.
        use_sigmoid_ce: sigmoid BCE loss and sigmoid scores (Detic's OV-COCO models), else
            softmax.
        freq_weight: [C] class frequencies (``CAT_FREQ_PATH`` counts ** FED_LOSS_FREQ_WEIGHT),
            given with ``ignore_zero_cats``; a persistent buffer, as in Detic's checkpoints.
    """

    def __init__(self, input_size: int, cls_score: ZeroShotClassifier, *,
                 use_sigmoid_ce: bool = True, ignore_zero_cats: bool = False,
                 freq_weight: Optional[torch.Tensor] = None,
                 inference: InferenceSettings = InferenceSettings(),
                 loss_settings: LossSettings = LossSettings()):
        super().__init__()
        self.cls_score = cls_score
        self.bbox_pred = nn.Sequential(nn.Linear(input_size, input_size), nn.ReLU(inplace=True),
                                       nn.Linear(input_size, 4))
        c2_xavier_fill(self.bbox_pred[0])
        nn.init.normal_(self.bbox_pred[-1].weight, std=0.001)
        nn.init.zeros_(self.bbox_pred[-1].bias)
        self.use_sigmoid_ce = use_sigmoid_ce
        self.ignore_zero_cats = ignore_zero_cats
        if ignore_zero_cats and freq_weight is None:
            raise ValueError("IGNORE_ZERO_CATS needs class frequencies (CAT_FREQ_PATH)")
        self.register_buffer("freq_weight", freq_weight)
        self.inference_settings = inference
        self.loss_settings = loss_settings

    @property
    def num_classes(self) -> int:
        """Classes scored now (the test vocabulary in eval mode, when one is set)."""
        return self.cls_score.num_classes

    def forward(self, x: torch.Tensor, captions: Optional[torch.Tensor] = None):
        """x: [R, input_size] -> (logits [R, C + 1 (+ N)], deltas [R, 4]); with [N, D]
        ``captions`` their logits follow the class columns."""
        logits = self.cls_score(x)
        if captions is not None:
            logits = torch.cat([logits, self.cls_score(x, classifier=captions)], dim=1)
        return logits, self.bbox_pred(x)

    def class_weight(self) -> Optional[torch.Tensor]:
        if not self.ignore_zero_cats:
            return None
        if not bool(torch.isfinite(self.freq_weight).all()):
            raise ValueError("IGNORE_ZERO_CATS: the class frequencies are missing; set "
                             "MODEL.ROI_BOX_HEAD.CAT_FREQ_PATH (tools/prepare_detic_coco.py) or "
                             "start from a checkpoint that holds freq_weight")
        return (self.freq_weight > MIN_CLASS_FREQUENCY).float()

    def losses(self, logits: torch.Tensor, deltas: torch.Tensor,
               sampled: List[Instances]) -> Dict[str, torch.Tensor]:
        """``loss_cls`` and ``loss_box_reg`` of the sampled RoIs of a box-annotated batch."""
        classes = torch.cat([s.gt_classes for s in sampled])
        put_classification_stats(logits, classes)
        loss = sigmoid_cross_entropy if self.use_sigmoid_ce else softmax_cross_entropy
        settings = self.loss_settings
        coder = Box2BoxTransform(weights=settings.box_reg_weights)
        foreground, targets = regression_targets(sampled, logits.shape[1] - 1, coder)
        box_loss = box_regression_loss(deltas, targets, foreground, settings.smooth_l1_beta)
        return {"loss_cls": loss(logits.float(), classes, self.class_weight()),
                "loss_box_reg": box_loss * settings.box_reg_loss_weight}

    def predict(self, logits: torch.Tensor, deltas: torch.Tensor,
                proposals: List[Instances]) -> List[Instances]:
        """Detections per image (threshold, per-class NMS, top-k), one box per RoI shared by
        all its classes."""
        probs = logits.float().sigmoid() if self.use_sigmoid_ce else logits.float().softmax(-1)
        probs = probs.split([len(p) for p in proposals])
        boxes = predict_boxes(deltas.float(), proposals, self.inference_settings)
        detections = detect_images(boxes, probs, probs, [p.image_size for p in proposals],
                                   self.inference_settings)
        return [result for result, _ in detections]

