"""Region proposal network with detectron2 semantics and parameter names.

Anchors, head and proposal selection reproduce detectron2's `DefaultAnchorGenerator`,
`StandardRPNHead` and `find_top_rpn_proposals`, so official detectron2 RPNs give the same
proposals (training one: `rpn_training.py`). RegionCLIP's frozen offline RPN (detector attributes
`offline_backbone` / `offline_proposal_generator`, the checkpoint prefixes) sees the CLIP branch's
resized image re-normalised its own way (`OfflineRPNInput`) and padded right/bottom only, so its
proposals are in the coordinates both branches share.
"""
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

from ..ops import batched_nms
from ..structures import Boxes, ImageList, Instances
from .box_coder import Box2BoxTransform
from .resnet_fpn import Conv2d, Freezable

BOX_DIM = 4
CHANNEL_ORDERS = ("RGB", "BGR")


def _broadcast(params: Sequence, num_levels: int, name: str) -> List[List[float]]:
    """One list of sizes/ratios per level; a single list is shared by all levels."""
    if not isinstance(params[0], (list, tuple)):
        params = [params]
    if len(params) == 1:
        return [list(params[0])] * num_levels
    if len(params) != num_levels:
        raise ValueError(f"ANCHOR_GENERATOR.{name} has {len(params)} entries for {num_levels} "
                         "feature levels")
    return [list(p) for p in params]


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> torch.Tensor:
    """Anchors centred at (0, 0): [len(sizes) * len(ratios), 4] xyxy, sizes outer, ratios inner;
    a size is sqrt(area), a ratio height / width."""
    anchors = []
    for size in sizes:
        for ratio in aspect_ratios:
            w = math.sqrt(size ** 2.0 / ratio)
            h = ratio * w
            anchors.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(anchors, dtype=torch.float32)


class DefaultAnchorGenerator(nn.Module):
    """Cell anchors tiled over each feature map (row-major locations, cell anchors inner); they
    are non-persistent buffers: detectron2 checkpoints carry no anchor keys."""

    def __init__(self, sizes, aspect_ratios, strides: Sequence[int], offset: float = 0.0):
        super().__init__()
        if not 0.0 <= offset < 1.0:
            raise ValueError(f"ANCHOR_GENERATOR.OFFSET must be in [0, 1), got {offset}")
        self.strides = list(strides)
        self.offset = offset
        sizes = _broadcast(sizes, len(self.strides), "SIZES")
        ratios = _broadcast(aspect_ratios, len(self.strides), "ASPECT_RATIOS")
        for i, (s, r) in enumerate(zip(sizes, ratios)):
            self.register_buffer(f"cell_anchors_{i}", cell_anchors(s, r), persistent=False)

    @property
    def cell_anchors(self) -> List[torch.Tensor]:
        return [getattr(self, f"cell_anchors_{i}") for i in range(len(self.strides))]

    @property
    def num_cell_anchors(self) -> List[int]:
        return [len(a) for a in self.cell_anchors]

    def forward(self, features: List[torch.Tensor]) -> List[Boxes]:
        """features[i]: [N, C, Hi, Wi] -> anchors per level, Boxes of [Hi * Wi * A, 4]."""
        anchors = []
        for feature, stride, base in zip(features, self.strides, self.cell_anchors):
            height, width = feature.shape[-2:]
            start = self.offset * stride
            xs = torch.arange(start, width * stride, step=stride, dtype=torch.float32,
                              device=base.device)
            ys = torch.arange(start, height * stride, step=stride, dtype=torch.float32,
                              device=base.device)
            shift_y, shift_x = torch.meshgrid(ys, xs, indexing="ij")
            shifts = torch.stack([shift_x, shift_y, shift_x, shift_y], dim=-1).reshape(-1, 1, 4)
            anchors.append(Boxes((shifts + base.view(1, -1, 4)).reshape(-1, 4)))
        return anchors


class StandardRPNHead(nn.Module):
    """Shared 3x3 conv(s) + ReLU, then 1x1 `objectness_logits` (A) and `anchor_deltas` (A*4).

    One conv is named `conv`; several (the LSJ head, CONV_DIMS [-1, -1]) are `conv.conv{k}`.
    A conv dim of -1 keeps the input channel count.
    """

    def __init__(self, in_channels: int, num_anchors: int, conv_dims: Sequence[int] = (-1,)):
        super().__init__()
        convs = []
        channels = in_channels
        for dim in conv_dims:
            out = channels if dim == -1 else dim
            if out <= 0:
                raise ValueError(f"RPN.CONV_DIMS entries must be positive or -1, got {dim}")
            convs.append(Conv2d(channels, out, kernel_size=3, padding=1, activation=nn.ReLU()))
            channels = out
        self.conv = convs[0] if len(convs) == 1 else nn.Sequential(
            OrderedDict((f"conv{k}", conv) for k, conv in enumerate(convs)))
        self.objectness_logits = nn.Conv2d(channels, num_anchors, kernel_size=1)
        self.anchor_deltas = nn.Conv2d(channels, num_anchors * BOX_DIM, kernel_size=1)
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, std=0.01)
                nn.init.zeros_(layer.bias)

    def forward(self, features: List[torch.Tensor]) -> Tuple[List[torch.Tensor], ...]:
        """features[i]: [N, C, Hi, Wi] -> (logits [N, A, Hi, Wi], deltas [N, A*4, Hi, Wi]) lists."""
        logits, deltas = [], []
        for x in features:
            t = self.conv(x)
            logits.append(self.objectness_logits(t))
            deltas.append(self.anchor_deltas(t))
        return logits, deltas


def find_top_rpn_proposals(
    proposals: List[torch.Tensor], logits: List[torch.Tensor], image_sizes: List[Tuple[int, int]],
    nms_thresh: float, pre_nms_topk: int, post_nms_topk: int, min_box_size: float,
) -> List[Instances]:
    """Per level top-k, then per image: clip, drop small/non-finite, NMS per level, top-k.

    proposals[i]: [N, Hi*Wi*A, 4] decoded boxes; logits[i]: [N, Hi*Wi*A]. `pre_nms_topk` is
    per level and image, `post_nms_topk` per image. Returns per image Instances with
    `proposal_boxes` and raw `objectness_logits`, sorted by logit descending.
    """
    top_boxes, top_scores, level_ids = [], [], []
    for level, (boxes_i, logits_i) in enumerate(zip(proposals, logits)):
        k = min(pre_nms_topk, logits_i.shape[1])
        scores_i, idx = logits_i.topk(k, dim=1)
        top_boxes.append(torch.gather(boxes_i, 1, idx.unsqueeze(-1).expand(-1, -1, BOX_DIM)))
        top_scores.append(scores_i)
        level_ids.append(torch.full((k,), level, dtype=torch.int64, device=scores_i.device))
    top_boxes, top_scores = torch.cat(top_boxes, dim=1), torch.cat(top_scores, dim=1)
    level_ids = torch.cat(level_ids)
    results = []
    for boxes, scores, image_size in zip(top_boxes, top_scores, image_sizes):
        valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
        boxes, scores, levels = Boxes(boxes[valid]), scores[valid], level_ids[valid]
        boxes.clip(image_size)
        keep = boxes.nonempty(threshold=min_box_size)
        boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
        keep = batched_nms(boxes.tensor, scores, levels, nms_thresh)[:post_nms_topk]
        results.append(Instances(image_size, proposal_boxes=boxes[keep],
                                 objectness_logits=scores[keep]))
    return results


class RPN(Freezable):
    """detectron2 `RPN`: head on `in_features`, anchors, decoding, selection (its losses:
    `rpn_training.py`).

    `pre_nms_topk` / `post_nms_topk` are (train, test) pairs chosen by `self.training`.
    """

    def __init__(
        self, *, in_features: Sequence[str], head: StandardRPNHead,
        anchor_generator: DefaultAnchorGenerator, box2box_transform: Box2BoxTransform,
        nms_thresh: float, pre_nms_topk: Tuple[int, int], post_nms_topk: Tuple[int, int],
        min_box_size: float = 0.0,
    ):
        super().__init__()
        self.in_features = list(in_features)
        self.rpn_head = head
        self.anchor_generator = anchor_generator
        self.box2box_transform = box2box_transform
        self.nms_thresh = nms_thresh
        self.pre_nms_topk = {True: pre_nms_topk[0], False: pre_nms_topk[1]}
        self.post_nms_topk = {True: post_nms_topk[0], False: post_nms_topk[1]}
        self.min_box_size = min_box_size

    def forward(self, images: ImageList, features: Dict[str, torch.Tensor]) -> List[Instances]:
        """Proposals (in padded-image coordinates clipped to each image size) per image."""
        anchors, logits, deltas = self.head_outputs(features)
        proposals = []  # per level [N, Hi*Wi*A, 4]: anchors moved by the predicted deltas
        for anchors_i, deltas_i in zip(anchors, deltas):
            n = deltas_i.shape[0]
            boxes = self.box2box_transform.apply_deltas(deltas_i.reshape(-1, BOX_DIM),
                                                        anchors_i.tensor.repeat(n, 1))
            proposals.append(boxes.view(n, -1, BOX_DIM))
        return find_top_rpn_proposals(
            proposals, logits, images.image_sizes, self.nms_thresh,
            self.pre_nms_topk[self.training], self.post_nms_topk[self.training],
            self.min_box_size,
        )

    def head_outputs(self, features: Dict[str, torch.Tensor]):
        """Per level: anchors (Boxes [Hi*Wi*A, 4]), logits [N, Hi*Wi*A], deltas [N, Hi*Wi*A, 4]."""
        features = [features[f] for f in self.in_features]
        anchors = self.anchor_generator(features)
        logits, deltas = self.rpn_head(features)
        # [N, A, H, W] -> [N, H*W*A] and [N, A*4, H, W] -> [N, H*W*A, 4]: anchors' order.
        logits = [x.permute(0, 2, 3, 1).flatten(1) for x in logits]
        deltas = [
            x.view(x.shape[0], -1, BOX_DIM, *x.shape[-2:]).permute(0, 3, 4, 1, 2).flatten(1, -2)
            for x in deltas
        ]
        return anchors, logits, deltas


@dataclass(frozen=True)
class OfflineRPNInput:
    """How images reach the offline RPN.

    input_format: channel order of the images handed to `offline_proposals` (the detector's
        INPUT.FORMAT). format: the RPN config's INPUT.FORMAT. pixel_mean / pixel_std: the RPN
        config's MODEL.PIXEL_MEAN / STD in `format` order, on the 0-255 scale or, with
        ``unit_scale``, on the 0-1 scale (pixels are then divided by 255 first, as in the
        original).
    """

    input_format: str
    format: str
    pixel_mean: Tuple[float, ...]
    pixel_std: Tuple[float, ...]
    unit_scale: bool = False

    def __post_init__(self):
        for fmt in (self.input_format, self.format):
            if fmt not in CHANNEL_ORDERS:
                raise ValueError(f"Offline RPN supports INPUT.FORMAT {CHANNEL_ORDERS}, got {fmt!r}")

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """[3, H, W] pixels 0-255 in `input_format` -> [3, H, W] float normalised RPN input."""
        image = image.float()
        if self.input_format != self.format:
            image = image.flip(0)
        if self.unit_scale:
            image = image / 255.0
        mean = torch.tensor(self.pixel_mean, device=image.device).view(-1, 1, 1)
        std = torch.tensor(self.pixel_std, device=image.device).view(-1, 1, 1)
        return (image - mean) / std


@torch.no_grad()
def offline_proposals(
    backbone: nn.Module, proposal_generator: RPN, offline_input: OfflineRPNInput,
    images: Sequence[torch.Tensor],
) -> List[Instances]:
    """Proposals for each image, in that image's (unpadded) pixel coordinates.

    images: [3, H_i, W_i] tensors, pixels 0-255 (uint8 or float) in
    `offline_input.input_format` (pretraining batches in [0, 1] are multiplied by 255 first,
    as in the original). Returns per image Instances with `proposal_boxes` and raw
    `objectness_logits`, sorted by logit descending, at most RPN.POST_NMS_TOPK_TEST of them.
    """
    batch = ImageList.from_tensors(
        [offline_input.normalize(x) for x in images], backbone.size_divisibility
    )
    return proposal_generator(batch, backbone(batch.tensor))
