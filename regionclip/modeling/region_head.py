"""The region head: region embeddings -> class scores, boxes and masks; training losses.

The mask head is the class-agnostic one of the LVIS fine-tuned checkpoints: detectron2's
``MaskRCNNConvUpsampleHead`` with no conv layers, a 2x transposed conv on the res5 RoI features
(the input of the attention pool) and a 1x1 predictor, so a 7x7 (RN50) or 9x9 (RN50x4) RoI
yields a 14x14 or 18x18 mask.

Regions are embedded by the CLIP trunk itself (:meth:`CLIPResNet.embed_regions`: RoIAlign on
res4 -> res5 -> attention pool), whose weights are ``backbone.layer4.*`` and
``backbone.attnpool.*`` in every official checkpoint; the trunk is passed in at call time. This
head owns only the predictor and the optional mask head, so its state-dict keys are
``roi_heads.box_predictor.*`` and ``roi_heads.mask_head.*``.
"""
import dataclasses
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..structures import Instances
from .box_predictor import (
    InferenceSettings,
    LossSettings,
    TextEmbeddingPredictor,
    detect_images,
    fusion_can_pass,
    predict_boxes,
    predict_probs,
    predictor_losses,
)
from .clip_resnet import CLIPResNet
from .losses import crop_and_resize_masks, mask_loss
from .matcher import RoISampling, label_and_sample_proposals


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


class RegionHead(nn.Module):
    """Turns region embeddings into class scores, boxes and masks."""

    def __init__(
        self,
        box_predictor: TextEmbeddingPredictor,
        pooler_resolution: int,
        inference: InferenceSettings,
        mask_head: Optional[MaskHead] = None,
        sampling: RoISampling = RoISampling(),
        loss_settings: LossSettings = LossSettings(),
    ):
        super().__init__()
        self.box_predictor = box_predictor
        self.mask_head = mask_head
        self.pooler_resolution = pooler_resolution
        self.inference_settings = inference
        self.sampling = sampling
        self.loss_settings = loss_settings

    def predict(self, embeddings: torch.Tensor, proposals: List[Instances], res4: torch.Tensor,
                trunk: CLIPResNet, given_boxes: bool = False) -> List[Instances]:
        """Detections per image, in the (resized) input coordinates.

        embeddings: [sum R_i, D] of the proposals. ``given_boxes``: the proposals are regions
        chosen by the caller (or ground truth): kept as they are and not fused with an
        objectness they do not have. Each result also carries ``proposal_index``, the
        proposal a detection came from.
        """
        settings = self._settings(given_boxes)
        logits, deltas = self.box_predictor(embeddings)
        scores, unfused = predict_probs(logits, proposals, settings.multiply_rpn_score)
        boxes = predict_boxes(deltas, proposals, settings)
        detected = detect_images(boxes, scores, unfused, [p.image_size for p in proposals],
                                 settings)
        results = []
        for result, index in detected:
            result.proposal_index = index
            results.append(result)
        if self.mask_head is not None:
            self._predict_masks(res4, trunk, results)
        return results

    def _settings(self, given_boxes: bool) -> InferenceSettings:
        if given_boxes:
            return dataclasses.replace(self.inference_settings, no_box_delta=True,
                                       multiply_rpn_score=False)
        return self.inference_settings

    def scorable(self, proposals: List[Instances], given_boxes: bool = False) -> List[torch.Tensor]:
        """Per image, the indices of the proposals that can yield a detection: with RPN-score
        fusion, those whose objectness lets the fused score pass the threshold
        (`fusion_can_pass`); otherwise all. The others need not be embedded."""
        settings = self._settings(given_boxes)
        if not settings.multiply_rpn_score:
            return [torch.arange(len(p), device=p.objectness_logits.device) for p in proposals]
        return [fusion_can_pass(p.objectness_logits, settings.score_thresh).nonzero().squeeze(1)
                for p in proposals]

    def _predict_masks(self, res4, trunk: CLIPResNet, results: List[Instances]) -> None:
        class_specific = self.mask_head.predictor.out_channels > 1
        if class_specific and self.box_predictor.test_cls_score is not None:
            raise ValueError("class-specific masks (MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK False) "
                             "have one channel per training class, but the detections are of a "
                             "test vocabulary; use a class-agnostic mask head, as every "
                             "RegionCLIP mask config does")
        boxes = [r.pred_boxes.tensor for r in results]
        if sum(len(b) for b in boxes) == 0:
            for r in results:
                size = self.pooler_resolution
                r.pred_masks = res4.new_zeros((0, 1, size, size))
            return
        features = trunk.region_features(res4, boxes, self.pooler_resolution)
        attach_mask_probs(self.mask_head(features), results)

    @property
    def num_train_classes(self) -> int:
        """Classes of the training vocabulary; label ``num_train_classes`` is background."""
        return self.box_predictor.cls_score.weight.shape[0]

    def losses(self, res4: torch.Tensor, proposals: List[Instances], targets: List[Instances],
               trunk: CLIPResNet) -> Dict[str, torch.Tensor]:
        """Training losses: ``loss_cls``, ``loss_box_reg`` and, with a mask head, ``loss_mask``.

        targets: per image ``gt_boxes``, ``gt_classes`` (contiguous training ids) and, for the
        mask loss, ``gt_masks`` (bool [N, H, W] at the input size).
        """
        sampled = label_and_sample_proposals(proposals, targets, self.num_train_classes,
                                             self.sampling)
        res5_features = trunk.region_features(
            res4, [s.proposal_boxes.tensor for s in sampled], self.pooler_resolution)
        logits, deltas = self.box_predictor(trunk.attnpool(res5_features))
        losses = predictor_losses(logits, deltas, sampled, self.loss_settings)
        if self.mask_head is not None:
            losses["loss_mask"] = self._mask_loss(res5_features, sampled, targets)
        return losses

    def _mask_loss(self, res5_features, sampled: List[Instances], targets: List[Instances]):
        """Mask loss of the foreground RoIs; the mask head sees their res5 maps, as in the
        original (the input of the attention pool)."""
        foreground = [(s.gt_classes >= 0) & (s.gt_classes < self.num_train_classes)
                      for s in sampled]
        mask_logits = self.mask_head(res5_features[torch.cat(foreground)])
        crops = []
        for s, t, fg in zip(sampled, targets, foreground):
            if not t.has("gt_masks"):
                raise ValueError("MODEL.MASK_ON training needs gt_masks in every input's instances")
            crops.append(crop_and_resize_masks(t.gt_masks, s.proposal_boxes.tensor[fg],
                                               mask_logits.shape[-1], s.gt_index[fg]))
        classes = torch.cat([s.gt_classes[fg] for s, fg in zip(sampled, foreground)])
        return mask_loss(mask_logits, torch.cat(crops).to(mask_logits.device), classes)


_BACKGROUND = "the background embedding is fixed at zero"
_LEARNT = "learnt from its initialisation in this training"
_NO_DELTAS = "box deltas are not applied (MODEL.CLIP.NO_BOX_DELTA or ground-truth boxes)"


def missing_by_design(model: nn.Module, training: bool) -> Dict[str, str]:
    """Model-key prefixes a checkpoint may lack without harm -> why (for the load report).

    A pretrained RegionCLIP file has no box predictor: its background embedding is a constant,
    and its box regression (and mask head) only matter once trained or when deltas are applied.
    """
    head = getattr(model, "roi_heads", None)
    if not isinstance(head, RegionHead):
        return {}
    reasons = {"roi_heads.box_predictor.cls_bg_score": _BACKGROUND}
    if training:
        reasons["roi_heads.box_predictor.bbox_pred"] = _LEARNT
        if head.mask_head is not None:
            reasons["roi_heads.mask_head"] = _LEARNT
    elif head.inference_settings.no_box_delta:
        reasons["roi_heads.box_predictor.bbox_pred"] = _NO_DELTAS
    return reasons
