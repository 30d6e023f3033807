"""The region head: region embeddings -> class scores, boxes and masks; training losses.

Regions are embedded by the CLIP trunk itself (:meth:`CLIPResNet.embed_regions`: RoIAlign on
res4 -> res5 -> attention pool), whose weights are ``backbone.layer4.*`` and
``backbone.attnpool.*`` in every official checkpoint; the trunk is passed in at call time. This
head owns only the predictor and the optional mask head, so its state-dict keys are
``roi_heads.box_predictor.*`` and ``roi_heads.mask_head.*``.
"""
import dataclasses
from typing import Dict, List, Optional

import torch
from torch import nn

from ..structures import Instances
from .box_predictor import InferenceSettings, LossSettings, TextEmbeddingPredictor
from .box_predictor import detect_single_image, predict_boxes, predict_probs, predictor_losses
from .clip_resnet import CLIPResNet
from .losses import crop_and_resize_masks, mask_loss
from .mask_head import MaskHead, attach_mask_probs
from .roi_sampling import RoISampling, label_and_sample_proposals


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
        settings = self.inference_settings
        if given_boxes:
            settings = dataclasses.replace(settings, no_box_delta=True, multiply_rpn_score=False)
        logits, deltas = self.box_predictor(embeddings)
        scores, unfused = predict_probs(logits, proposals, settings.multiply_rpn_score)
        boxes = predict_boxes(deltas, proposals, settings)
        results = []
        for b, s, u, p in zip(boxes, scores, unfused, proposals):
            result, index = detect_single_image(b, s, u, p.image_size, settings)
            result.proposal_index = index
            results.append(result)
        if self.mask_head is not None:
            self._predict_masks(res4, trunk, results)
        return results

    def _predict_masks(self, res4, trunk: CLIPResNet, results: List[Instances]) -> None:
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
