"""CLIPFastRCNN: proposals -> region embeddings -> scores against a vocabulary.

Attribute names are the official state-dict prefixes: ``backbone`` (CLIP trunk, including
res5 and the attention pool), ``roi_heads`` (predictor and mask head), ``offline_backbone``
and ``offline_proposal_generator`` (the frozen RPN, present with RPN proposals) and
``lang_encoder`` (the text tower, present when asked for, frozen).
"""
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ..structures import Boxes, ImageList, Instances
from .clip_resnet import CLIPResNet
from .precision import FastCopies, check_precision, fast_trunk, tf32_mode, trunk_autocast
from .region_head import RegionHead, paste_masks
from .rpn import OfflineRPNInput, offline_proposals

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
        precision: str = "fp32",
    ):
        """pixel_mean / pixel_std: per-channel, 0-255 scale, in the input's channel order.
        precision: inference precision, one of `precision.PRECISIONS` (training is fp32)."""
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
        # the text tower embeds names and captions; nothing here trains it
        self.lang_encoder = None if lang_encoder is None else lang_encoder.requires_grad_(False)
        self.precision = check_precision(precision)
        self._fast = FastCopies()
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def train(self, mode: bool = True) -> "CLIPFastRCNN":
        super().train(mode)
        if self.lang_encoder is not None:
            self.lang_encoder.eval()
        return self

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
        return self.roi_heads.losses(self.res4(batched_inputs), proposals, targets,
                                     self.backbone)

    def preprocess(self, batched_inputs: List[Dict]) -> ImageList:
        """CLIP-normalised images, padded to one batch."""
        images = [(x["image"].to(self.device).float() - self.pixel_mean) / self.pixel_std
                  for x in batched_inputs]
        return ImageList.from_tensors(images)

    def trunk(self) -> CLIPResNet:
        """The CLIP trunk of this pass: ``backbone`` when training or in fp32, else its fast
        inference copy (`precision.fast_trunk`)."""
        if self.training or self.precision == "fp32":
            return self.backbone
        return self._fast.get(self.backbone, fast_trunk)

    def res4(self, batched_inputs: List[Dict]) -> torch.Tensor:
        """The trunk's stride-16 features of the batch, [N, C4, H/16, W/16]."""
        with trunk_autocast(self._autocast_precision(), self.device.type):
            return self.trunk()(self.preprocess(batched_inputs).tensor)["res4"]

    def embed_regions(self, batched_inputs: List[Dict], boxes: List[torch.Tensor],
                      res4: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Unnormalised float32 region embeddings [sum R_i, D] of per-image xyxy boxes given
        in input pixels (``res4``: the batch's features, when already computed)."""
        res4 = self.res4(batched_inputs) if res4 is None else res4
        boxes = [b.to(self.device, torch.float32) for b in boxes]
        with trunk_autocast(self._autocast_precision(), self.device.type):
            return self.trunk().embed_regions(res4, boxes, self.roi_heads.pooler_resolution)

    def _autocast_precision(self) -> str:
        return "fp32" if self.training else self.precision

    @torch.no_grad()
    def get_proposals(self, batched_inputs: List[Dict]) -> List[Instances]:
        """Region proposals in the input image's coordinates: the ground-truth boxes of each
        input's ``instances`` (GT source) or the offline RPN's."""
        if self.proposal_source == "GT":
            return [boxes_as_proposals(_gt_boxes(x), x["image"].shape[-2:], self.device)
                    for x in batched_inputs]
        raw = [x["image"].to(self.device) for x in batched_inputs]
        return offline_proposals(
            self.offline_backbone, self.offline_proposal_generator, self.offline_input, raw
        )

    def inference(self, batched_inputs: List[Dict], boxes: Optional[List[torch.Tensor]] = None,
                  keep_embeddings: bool = False) -> List[Dict]:
        """``[{"instances": Instances}]`` at the original image sizes.

        boxes: per input, regions to score ([R_i, 4] xyxy in input pixels) instead of the
        proposal source; like ground-truth boxes they are kept as given (no regression, no
        objectness fusion). ``keep_embeddings`` adds each detection's unnormalised region
        embedding as ``region_embeddings``.

        Proposals are exact on every precision: the RPN's top-k and NMS would turn rounding
        differences into other boxes.
        """
        given = boxes is not None or self.proposal_source == "GT"
        if boxes is None:
            with tf32_mode(False):
                proposals = self.get_proposals(batched_inputs)
        else:
            proposals = [boxes_as_proposals(b, x["image"].shape[-2:], self.device)
                         for b, x in zip(boxes, batched_inputs)]
        with tf32_mode(self.precision in ("tf32", "bf16")):
            return self._detect(batched_inputs, proposals, given, keep_embeddings)

    def _detect(self, batched_inputs, proposals: List[Instances], given: bool,
                keep_embeddings: bool) -> List[Dict]:
        res4 = self.res4(batched_inputs)
        # Regions that cannot yield a detection are not embedded (see RegionHead.scorable).
        scorable = self.roi_heads.scorable(proposals, given)
        proposals = [p[index] for p, index in zip(proposals, scorable)]
        embeddings = self.embed_regions(
            batched_inputs, [p.proposal_boxes.tensor for p in proposals], res4)
        results = self.roi_heads.predict(embeddings, proposals, res4.float(), self.trunk(),
                                         given)
        for result, image_embeddings, index in zip(
                results, embeddings.split([len(p) for p in proposals]), scorable):
            if keep_embeddings:
                result.region_embeddings = image_embeddings[result.proposal_index]
            result.proposal_index = index[result.proposal_index]
        return [{"instances": postprocess(r, x.get("height", r.image_size[0]),
                                          x.get("width", r.image_size[1]))}
                for r, x in zip(results, batched_inputs)]


def _gt_boxes(record: Dict) -> torch.Tensor:
    return record["instances"].gt_boxes.tensor if "instances" in record else torch.zeros(0, 4)


def boxes_as_proposals(boxes: torch.Tensor, image_size, device) -> Instances:
    """Regions chosen by the caller (or ground truth) as proposals with objectness 1."""
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4).to(device)
    return Instances(tuple(image_size), proposal_boxes=Boxes(boxes),
                     objectness_logits=torch.ones(len(boxes), device=device))


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
