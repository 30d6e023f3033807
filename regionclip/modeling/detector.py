"""CLIPFastRCNN: proposals -> region embeddings -> scores against a vocabulary.

Attribute names are the official state-dict prefixes: ``backbone`` (CLIP trunk, including
res5 and the attention pool), ``roi_heads`` (predictor and mask head), ``offline_backbone``
and ``offline_proposal_generator`` (the frozen RPN, present with RPN proposals) and
``lang_encoder`` (the text tower, present when asked for).
"""
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ..structures import Boxes, ImageList, Instances
from .mask_head import paste_masks
from .offline_rpn import OfflineRPNInput, offline_proposals
from .region_head import RegionHead

PROPOSAL_SOURCES = ("GT", "RPN")


class CLIPFastRCNN(nn.Module):
    def __init__(
        self,
        *,
        backbone: nn.Module,
        roi_heads: RegionHead,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        proposal_source: str = "RPN",
        offline_backbone: Optional[nn.Module] = None,
        offline_proposal_generator: Optional[nn.Module] = None,
        offline_input: Optional[OfflineRPNInput] = None,
        lang_encoder: Optional[nn.Module] = None,
    ):
        """pixel_mean / pixel_std: per-channel, 0-255 scale, in the input's channel order."""
        super().__init__()
        if proposal_source not in PROPOSAL_SOURCES:
            raise ValueError(f"Unknown proposal source {proposal_source!r}: {PROPOSAL_SOURCES}")
        if proposal_source == "RPN" and offline_backbone is None:
            raise ValueError("RPN proposals need an offline RPN (MODEL.CLIP.OFFLINE_RPN_CONFIG)")
        self.backbone = backbone
        self.roi_heads = roi_heads
        self.proposal_source = proposal_source
        self.offline_backbone = offline_backbone
        self.offline_proposal_generator = offline_proposal_generator
        self.offline_input = offline_input
        self.lang_encoder = lang_encoder
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def forward(self, batched_inputs: List[Dict]):
        """Detections for each input dict (``image`` [3, H, W] 0-255 in the config's format,
        optional ``height``/``width`` of the original image, ``instances`` for GT proposals);
        in training mode the loss dict of `losses`."""
        if self.training:
            return self.losses(batched_inputs)
        return self.inference(batched_inputs)

    def losses(self, batched_inputs: List[Dict]) -> Dict[str, torch.Tensor]:
        """``loss_cls``, ``loss_box_reg`` (and ``loss_mask``) of a training batch.

        Each input needs ``instances`` at the input size with ``gt_boxes``, ``gt_classes``
        (contiguous training-vocabulary ids) and, with a mask head, ``gt_masks``. Proposals
        come without gradient from the ground truth or the offline RPN, which stays in eval
        mode (TEST settings) while the model trains, as in the original.
        """
        if any("instances" not in x for x in batched_inputs):
            raise ValueError("Training needs ground-truth 'instances' in every input")
        targets = [x["instances"].to(self.device) for x in batched_inputs]
        proposals = self.get_proposals(batched_inputs)
        features = self.backbone(self.preprocess_image(batched_inputs).tensor)
        return self.roi_heads.losses(features, proposals, targets, self.backbone.layer4,
                                     self.backbone.attnpool)

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        images = [(x["image"].to(self.device).float() - self.pixel_mean) / self.pixel_std
                  for x in batched_inputs]
        return ImageList.from_tensors(images)

    @torch.no_grad()
    def get_proposals(self, batched_inputs: List[Dict]) -> List[Instances]:
        """Region proposals in the input image's coordinates."""
        if self.proposal_source == "GT":
            return [self._gt_proposals(x) for x in batched_inputs]
        raw = [x["image"].to(self.device) for x in batched_inputs]
        return offline_proposals(
            self.offline_backbone, self.offline_proposal_generator, self.offline_input, raw
        )

    def _gt_proposals(self, record: Dict) -> Instances:
        size = tuple(record["image"].shape[-2:])
        boxes = record["instances"].gt_boxes.tensor if "instances" in record else torch.zeros(0, 4)
        boxes = boxes.to(self.device)
        return Instances(size, proposal_boxes=Boxes(boxes),
                         objectness_logits=torch.ones(len(boxes), device=self.device))

    def inference(self, batched_inputs: List[Dict], proposals: Optional[List[Instances]] = None,
                  keep_embeddings: bool = False):
        """``[{"instances": Instances}]`` at the original image sizes; ``keep_embeddings`` adds
        each detection's unnormalised region embedding as ``region_embeddings``."""
        if proposals is None:
            proposals = self.get_proposals(batched_inputs)
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        results = self.roi_heads(features, proposals, self.backbone.layer4, self.backbone.attnpool,
                                 keep_embeddings)
        return [{"instances": postprocess(r, x.get("height", r.image_size[0]),
                                          x.get("width", r.image_size[1]))}
                for r, x in zip(results, batched_inputs)]


def postprocess(result: Instances, height: int, width: int) -> Instances:
    """Rescale detections to the original image size; paste masks into it.

    Returns new Instances; the input's boxes are left as they were.
    """
    scale_x, scale_y = width / result.image_size[1], height / result.image_size[0]
    result = Instances((height, width), **result.get_fields())
    result.pred_boxes = result.pred_boxes.clone()
    result.pred_boxes.scale(scale_x, scale_y)
    result.pred_boxes.clip((height, width))
    result = result[result.pred_boxes.nonempty()]
    if result.has("pred_masks"):
        result.pred_masks = paste_masks(result.pred_masks, result.pred_boxes.tensor,
                                        (height, width))
    return result
