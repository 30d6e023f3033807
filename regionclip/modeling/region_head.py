"""Region embeddings: RoIAlign on res4 -> CLIP res5 -> attention pool.

The res5 stage and the attention pool belong to the CLIP trunk (their weights are
``backbone.layer4.*`` and ``backbone.attnpool.*`` in every official checkpoint) and are passed
in at call time; this head owns only the predictor and the optional mask head, so its
state-dict keys are ``roi_heads.box_predictor.*`` and ``roi_heads.mask_head.*``.
"""
from typing import Dict, List, Optional

import torch
from torch import nn

from ..ops import roi_align
from ..structures import Instances
from .box_predictor import InferenceSettings, LossSettings, TextEmbeddingPredictor
from .box_predictor import detect_single_image, predict_boxes, predict_probs, predictor_losses
from .losses import crop_and_resize_masks, mask_loss
from .mask_head import MaskHead, attach_mask_probs
from .roi_sampling import RoISampling, label_and_sample_proposals


INFERENCE_CHUNK = 128  # regions per res5 pass at inference
_BACKGROUND = "the background embedding is fixed at zero"
_LEARNT = "learnt from its initialisation in this training"
_NO_DELTAS = "box deltas are not applied (MODEL.CLIP.NO_BOX_DELTA or ground-truth boxes)"


def pool_regions(
    res4: torch.Tensor, boxes: List[torch.Tensor], resolution: int, stride: int = 16
) -> torch.Tensor:
    """RoIAlign ("ROIAlignV2": aligned, adaptive sampling) of xyxy boxes given per image.

    res4: [N, C, H, W]; boxes: N tensors [R_i, 4] in input-image pixels -> [sum R_i, C, S, S].
    """
    return roi_align(res4, boxes, resolution, spatial_scale=1.0 / stride, sampling_ratio=0,
                     aligned=True)


class RegionHead(nn.Module):
    """Turns proposals into region embeddings, class scores, boxes and masks."""

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

    def region_features(self, res4, boxes: List[torch.Tensor], res5: nn.Module):
        """res5 feature maps [R, C5, S/2, S/2] of the given boxes."""
        return res5(pool_regions(res4, boxes, self.pooler_resolution))

    def embed(self, res4, boxes: List[torch.Tensor], res5: nn.Module, attnpool: nn.Module):
        """Unnormalised region embeddings [R, D] of the given boxes.

        Without gradients, regions go through res5 in chunks: the res5 activations of a
        thousand RN50x4 regions alone would take gigabytes.
        """
        pooled = pool_regions(res4, boxes, self.pooler_resolution)
        if torch.is_grad_enabled():
            return attnpool(res5(pooled))
        chunks = pooled.split(INFERENCE_CHUNK) if len(pooled) else [pooled]
        return torch.cat([attnpool(res5(chunk)) for chunk in chunks])

    def forward(
        self,
        features: Dict[str, torch.Tensor],
        proposals: List[Instances],
        res5: nn.Module,
        attnpool: nn.Module,
        keep_embeddings: bool = False,
    ) -> List[Instances]:
        """Detections per image, in the (resized) input coordinates.

        Each result also carries ``proposal_index`` (the proposal a detection came from) and,
        with ``keep_embeddings``, ``region_embeddings`` (its unnormalised embedding, [N, D]).
        """
        res4 = features["res4"]
        embeddings = self.embed(res4, [p.proposal_boxes.tensor for p in proposals], res5, attnpool)
        results = self.predict(embeddings, proposals, res4, res5)
        if keep_embeddings:
            per_image = embeddings.split([len(p) for p in proposals])
            for result, image_embeddings in zip(results, per_image):
                result.region_embeddings = image_embeddings[result.proposal_index]
        return results

    def predict(self, embeddings, proposals: List[Instances], res4, res5) -> List[Instances]:
        settings = self.inference_settings
        logits, deltas = self.box_predictor(embeddings)
        scores, unfused = predict_probs(logits, proposals, settings.multiply_rpn_score)
        boxes = predict_boxes(deltas, proposals, settings)
        results = []
        for b, s, u, p in zip(boxes, scores, unfused, proposals):
            result, index = detect_single_image(b, s, u, p.image_size, settings)
            result.proposal_index = index
            results.append(result)
        if self.mask_head is not None:
            self._predict_masks(res4, res5, results)
        return results

    def _predict_masks(self, res4, res5: nn.Module, results: List[Instances]) -> None:
        boxes = [r.pred_boxes.tensor for r in results]
        if sum(len(b) for b in boxes) == 0:
            for r in results:
                size = self.pooler_resolution
                r.pred_masks = res4.new_zeros((0, 1, size, size))
            return
        attach_mask_probs(self.mask_head(self.region_features(res4, boxes, res5)), results)

    @property
    def num_train_classes(self) -> int:
        """Classes of the training vocabulary; label ``num_train_classes`` is background."""
        return self.box_predictor.cls_score.weight.shape[0]

    def losses(
        self,
        features: Dict[str, torch.Tensor],
        proposals: List[Instances],
        targets: List[Instances],
        res5: nn.Module,
        attnpool: nn.Module,
    ) -> Dict[str, torch.Tensor]:
        """Training losses: ``loss_cls``, ``loss_box_reg`` and, with a mask head, ``loss_mask``.

        targets: per image ``gt_boxes``, ``gt_classes`` (contiguous training ids) and, for the
        mask loss, ``gt_masks`` (bool [N, H, W] at the input size).
        """
        sampled = label_and_sample_proposals(proposals, targets, self.num_train_classes,
                                             self.sampling)
        res5_features = self.region_features(
            features["res4"], [s.proposal_boxes.tensor for s in sampled], res5)
        logits, deltas = self.box_predictor(attnpool(res5_features))
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
