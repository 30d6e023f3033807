"""Detic's ``CustomRCNN``: a Faster R-CNN (R50-C4 here) with a CLIP-embedding classifier that
also learns from image labels and captions.

Attribute names are Detic's state-dict prefixes: ``backbone`` (stem, res2..res4),
``proposal_generator`` (RPN), ``roi_heads`` (res5 + box predictor) and ``text_encoder`` (the
frozen CLIP text tower of the caption models). Pixel statistics are non-persistent buffers.

Each training batch holds one kind of supervision (``ann_type`` of its inputs): ``box``
batches train the RPN and the box head as any Faster R-CNN; image-labelled batches (``image``,
``caption``, ``captiontag``) give only ``image_loss`` (`weak_losses.py`), the other losses
being zeros that stay connected to the graph, so that every parameter gets a gradient on
every process and DistributedDataParallel needs no search for unused parameters.
"""
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ...structures import ImageList
from ..detector import postprocess
from ..rpn import RPN
from ..rpn_training import RPNTraining, batch_rpn_losses
from ..text_encoder import TextEncoder
from .roi_heads import DeticRes5ROIHeads
from .weak_losses import batch_ann_type, encode_captions


class CustomRCNN(nn.Module):
    """Args:
        backbone: returns ``{"res4": ...}``; proposal_generator: the RPN on it.
        pixel_mean / pixel_std: 0-255 scale, in the input's channel order (BGR for Detic).
        rpn_training: anchor labelling and RPN loss settings.
        with_image_labels: batches may be image-labelled (``WITH_IMAGE_LABELS``); box batches
            then also report ``image_loss`` (0).
        text_encoder: frozen text tower for the caption loss (``WITH_CAPTION``).
        fp16: on CUDA, run the backbone in float16 (Detic's ``FP16``).
    """

    def __init__(self, *, backbone: nn.Module, proposal_generator: RPN,
                 roi_heads: DeticRes5ROIHeads, pixel_mean: Sequence[float],
                 pixel_std: Sequence[float], rpn_training: RPNTraining = RPNTraining(),
                 with_image_labels: bool = False, text_encoder: Optional[TextEncoder] = None,
                 fp16: bool = False):
        super().__init__()
        self.backbone = backbone
        self.proposal_generator = proposal_generator
        self.roi_heads = roi_heads
        self.text_encoder = text_encoder
        if text_encoder is not None:
            text_encoder.requires_grad_(False).eval()
        self.rpn_training = rpn_training
        self.with_image_labels = with_image_labels
        self.fp16 = fp16
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def train(self, mode: bool = True) -> "CustomRCNN":
        super().train(mode)
        if self.text_encoder is not None:
            self.text_encoder.eval()
        return self

    def set_test_classifier(self, embeddings: Optional[torch.Tensor]) -> None:
        """Classify with [C, D] class embeddings in eval mode (Detic's ``reset_cls_test``,
        here on the single predictor of the C4 head); None restores the trained classifier."""
        self.roi_heads.box_predictor.cls_score.set_test_embeddings(embeddings)

    def preprocess(self, batched_inputs: Sequence[Dict]) -> ImageList:
        images = [(x["image"].to(self.device).float() - self.pixel_mean) / self.pixel_std
                  for x in batched_inputs]
        return ImageList.from_tensors(images, self.backbone.size_divisibility)

    def extract_features(self, images: ImageList) -> Dict[str, torch.Tensor]:
        half = self.fp16 and self.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.float16, enabled=half):
            features = self.backbone(images.tensor)
        return {k: v.float() for k, v in features.items()}

    def forward(self, batched_inputs: List[Dict]):
        """Training: the loss dict; eval: ``[{"instances": Instances}]`` at each input's
        ``height`` x ``width``."""
        if self.training:
            return self.losses(batched_inputs)
        return self.inference(batched_inputs)

    def inference(self, batched_inputs: List[Dict]) -> List[Dict]:
        images = self.preprocess(batched_inputs)
        features = self.extract_features(images)
        proposals = self.proposal_generator(images, features)
        results = self.roi_heads(features, proposals)
        return [{"instances": postprocess(r, x.get("height", r.image_size[0]),
                                          x.get("width", r.image_size[1]))}
                for r, x in zip(results, batched_inputs)]

    def losses(self, batched_inputs: List[Dict]) -> Dict[str, torch.Tensor]:
        ann_type = batch_ann_type(batched_inputs) if self.with_image_labels else "box"
        images = self.preprocess(batched_inputs)
        features = self.extract_features(images)
        captions = encode_captions(self.text_encoder, batched_inputs, ann_type,
                                   self.roi_heads.weak, self.device)
        outputs = self.proposal_generator.head_outputs(features)
        with torch.no_grad():
            proposals = self.proposal_generator.predict_proposals(*outputs, images.image_sizes)
        if ann_type != "box":
            labels = [x.get("pos_category_ids", []) for x in batched_inputs]
            losses = self.roi_heads.weak_losses(features, proposals, labels, captions, ann_type)
            unused = sum(t.sum() for t in outputs[1] + outputs[2]) * 0.0
            return {"loss_rpn_cls": unused, "loss_rpn_loc": unused, **losses}
        if any("instances" not in x for x in batched_inputs):
            raise ValueError("box-supervised training needs 'instances' in every input")
        targets = [x["instances"].to(self.device) for x in batched_inputs]
        losses = batch_rpn_losses(self.proposal_generator, outputs,
                                  [t.gt_boxes for t in targets], images.image_sizes,
                                  self.rpn_training)
        losses.update(self.roi_heads.losses(features, proposals, targets))
        if self.with_image_labels:
            losses["image_loss"] = losses["loss_cls"] * 0.0
        return losses

