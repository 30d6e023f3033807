"""RegionCLIP's detector fine-tuned with Detic's weak supervision as well.

`CLIPFastRCNN` (a CLIP ResNet whose region embeddings are scored against class text
embeddings) trained on mixed batches (``WITH_IMAGE_LABELS``, ``DATALOADER.DATASET_ANN``): box
batches with its own losses, image-labelled batches with Detic's ``image_loss`` on the offline
RPN's top proposals and the whole-image box. Captions are embedded by the detector's own CLIP
text tower (``lang_encoder``, from the pretrained RegionCLIP checkpoint, frozen) and scored like
classes: cosine / ``MODEL.CLIP.CLSS_TEMP``. RegionCLIP scores classes with a softmax, so
``MODEL.ROI_BOX_HEAD.SOFTMAX_WEAK_LOSS True`` (cross-entropy of the chosen region) is its
natural image-label loss.
"""
from typing import Dict, List

import torch
import torch.nn.functional as F

from ..detector import CLIPFastRCNN
from .weak_losses import (
    WeakSupervision,
    batch_ann_type,
    encode_captions,
    top_proposals,
    weak_losses,
)


class WeaklySupervisedCLIPFastRCNN(CLIPFastRCNN):
    """``CLIPFastRCNN`` whose training batches may be image-labelled or captioned.

    Args:
        weak: Detic's weak-supervision settings; the other arguments are CLIPFastRCNN's (RPN
            proposals and, for captions, ``lang_encoder``).
    """

    def __init__(self, *, weak: WeakSupervision, **kwargs):
        super().__init__(**kwargs)
        if self.proposal_source != "RPN":
            raise ValueError("image-labelled training needs proposals: set "
                             "MODEL.CLIP.CROP_REGION_TYPE RPN")
        self.weak = weak

    def losses(self, batched_inputs: List[Dict]) -> Dict[str, torch.Tensor]:
        """CLIPFastRCNN's losses plus ``image_loss`` (0 on box batches; the only non-zero
        loss of image-labelled ones, whose other losses are zeros connected to the graph)."""
        ann_type = batch_ann_type(batched_inputs)
        captions = encode_captions(self.lang_encoder, batched_inputs, ann_type, self.weak,
                                   self.device)
        if ann_type == "box":
            losses = super().losses(batched_inputs)
            return {**losses, "image_loss": losses["loss_cls"] * 0.0}
        regions = top_proposals(self.get_proposals(batched_inputs), self.weak)
        embeddings = self.embed_regions(batched_inputs,
                                        [r.proposal_boxes.tensor for r in regions])
        predictor = self.roi_heads.box_predictor
        logits, deltas = predictor(embeddings)
        if captions is not None:
            caption_logits = (F.normalize(embeddings, dim=1)
                              @ F.normalize(captions.features, dim=1).t()) / predictor.temperature
            logits = torch.cat([logits, caption_logits], dim=1)
        labels = [x.get("pos_category_ids", []) for x in batched_inputs]
        zero = logits.sum() * 0.0 + deltas.sum() * 0.0
        losses = {"loss_cls": zero, "loss_box_reg": zero,
                  "image_loss": weak_losses(logits, regions, labels, captions, ann_type,
                                            self.weak)}
        if self.roi_heads.mask_head is not None:
            losses["loss_mask"] = zero + sum(p.sum() for p in
                                             self.roi_heads.mask_head.parameters()) * 0.0
        return losses
