"""The frozen offline RPN: its config, cfg -> (backbone, RPN), its own preprocessing, proposals.

RegionCLIP crops regions proposed by an ordinary detectron2 RPN (R50-C4 for COCO, R50-FPN for
LVIS and pretraining) that was trained on BGR images with detectron2's pixel means. It sees the
same resized image as the CLIP branch, re-normalised its own way; padding is right/bottom only,
so proposals are in the coordinates of the resized image shared by both branches.

A detector holds the two modules as `offline_backbone` / `offline_proposal_generator` (the
official checkpoint prefixes) and calls `offline_proposals` with its raw images.
"""
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

from regionclip.config import load_config
from regionclip.modeling.box_coder import Box2BoxTransform
from regionclip.modeling.resnet_fpn import FPN, ResNet, ShapeSpec, build_resnet
from regionclip.modeling.rpn import RPN, DefaultAnchorGenerator, StandardRPNHead
from regionclip.structures.image_list import ImageList
from regionclip.structures.instances import Instances

CHANNEL_ORDERS = ("RGB", "BGR")
# Architecture of detectron2's LSJ "new baselines" (OFFLINE_RPN_LSJ_PRETRAINED).
LSJ_OVERRIDES = (
    "MODEL.BACKBONE.FREEZE_AT", 0, "MODEL.RESNETS.NORM", "SyncBN", "MODEL.FPN.NORM", "SyncBN",
    "MODEL.RPN.CONV_DIMS", [-1, -1],
)
# Which MODEL.CLIP key sets the offline post-NMS top-k, per meta-architecture (as the original).
POST_NMS_TOPK_KEY = {
    "CLIPFastRCNN": "OFFLINE_RPN_POST_NMS_TOPK_TEST",
    "PretrainFastRCNN": "PRETRAIN_RPN_REGIONS",
}
# A mean summing below this is on the 0-1 scale (CLIP style): divide pixels by 255 first.
UNIT_SCALE_MEAN_SUM = 3.0


@dataclass(frozen=True)
class OfflineRPNInput:
    """How images reach the offline RPN.

    input_format: channel order of the images handed to `offline_proposals` (the detector's
        INPUT.FORMAT). format: the RPN config's INPUT.FORMAT. pixel_mean / pixel_std: the RPN
        config's MODEL.PIXEL_MEAN / STD, in `format` order, 0-255 scale (or 0-1 scale when the
        means sum below 3, in which case pixels are divided by 255 first, as in the original).
    """

    input_format: str
    format: str
    pixel_mean: Tuple[float, ...]
    pixel_std: Tuple[float, ...]

    def __post_init__(self):
        for fmt in (self.input_format, self.format):
            if fmt not in CHANNEL_ORDERS:
                raise ValueError(f"Offline RPN supports INPUT.FORMAT {CHANNEL_ORDERS}, got {fmt!r}")

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """[3, H, W] pixels 0-255 in `input_format` -> [3, H, W] float normalised RPN input."""
        image = image.float()
        if self.input_format != self.format:
            image = image.flip(0)
        if sum(self.pixel_mean) < UNIT_SCALE_MEAN_SUM:
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


def _is_set(value) -> bool:
    """The original's optional MODEL.CLIP numbers default to None; ours may default to 0."""
    return value is not None and value > 0


def offline_rpn_cfg(main_cfg):
    """Load MODEL.CLIP.OFFLINE_RPN_CONFIG into a fresh config with RegionCLIP's overrides.

    OFFLINE_RPN_LSJ_PRETRAINED -> the LSJ architecture (SyncBN, no frozen stages, two head
    convs); OFFLINE_RPN_NMS_THRESH -> RPN.NMS_THRESH; OFFLINE_RPN_POST_NMS_TOPK_TEST
    (CLIPFastRCNN) or PRETRAIN_RPN_REGIONS (PretrainFastRCNN) -> RPN.POST_NMS_TOPK_TEST.
    """
    clip = main_cfg.MODEL.CLIP
    if not clip.OFFLINE_RPN_CONFIG:
        raise ValueError("MODEL.CLIP.CROP_REGION_TYPE RPN needs MODEL.CLIP.OFFLINE_RPN_CONFIG")
    overrides = list(LSJ_OVERRIDES) if clip.OFFLINE_RPN_LSJ_PRETRAINED else []
    if _is_set(clip.OFFLINE_RPN_NMS_THRESH):
        overrides += ["MODEL.RPN.NMS_THRESH", clip.OFFLINE_RPN_NMS_THRESH]
    topk_key = POST_NMS_TOPK_KEY.get(main_cfg.MODEL.META_ARCHITECTURE,
                                     "OFFLINE_RPN_POST_NMS_TOPK_TEST")
    if _is_set(clip.get(topk_key)):
        overrides += ["MODEL.RPN.POST_NMS_TOPK_TEST", clip.get(topk_key)]
    return load_config(clip.OFFLINE_RPN_CONFIG, [str(v) for v in overrides])


def _check_name(value: str, valid: str, key: str) -> None:
    if value != valid:
        raise ValueError(f"{key} {value!r} is not supported by the offline RPN; valid: {valid!r}")


def _build_resnet(cfg) -> ResNet:
    res = cfg.MODEL.RESNETS
    if any(res.DEFORM_ON_PER_STAGE):
        raise ValueError("Deformable convolutions (RESNETS.DEFORM_ON_PER_STAGE) are not supported")
    return build_resnet(
        depth=res.DEPTH, out_features=res.OUT_FEATURES, norm=res.NORM,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT, stem_out_channels=res.STEM_OUT_CHANNELS,
        res2_out_channels=res.RES2_OUT_CHANNELS, num_groups=res.NUM_GROUPS,
        width_per_group=res.WIDTH_PER_GROUP, stride_in_1x1=res.STRIDE_IN_1X1,
        res5_dilation=res.RES5_DILATION, in_channels=len(cfg.MODEL.PIXEL_MEAN),
    )


def _build_resnet_fpn(cfg) -> FPN:
    fpn = cfg.MODEL.FPN
    return FPN(_build_resnet(cfg), fpn.IN_FEATURES, fpn.OUT_CHANNELS, norm=fpn.NORM,
               fuse_type=fpn.FUSE_TYPE)


BACKBONES = {"build_resnet_backbone": _build_resnet, "build_resnet_fpn_backbone": _build_resnet_fpn}


def build_rpn_backbone(cfg) -> nn.Module:
    name = cfg.MODEL.BACKBONE.NAME
    if name not in BACKBONES:
        raise ValueError(f"Offline RPN MODEL.BACKBONE.NAME {name!r} unsupported; valid: "
                         f"{sorted(BACKBONES)}")
    return BACKBONES[name](cfg)


def build_rpn_head(cfg, shapes: Dict[str, ShapeSpec]) -> RPN:
    _check_name(cfg.MODEL.PROPOSAL_GENERATOR.NAME, "RPN", "MODEL.PROPOSAL_GENERATOR.NAME")
    _check_name(cfg.MODEL.RPN.HEAD_NAME, "StandardRPNHead", "MODEL.RPN.HEAD_NAME")
    anchors_cfg, rpn = cfg.MODEL.ANCHOR_GENERATOR, cfg.MODEL.RPN
    _check_name(anchors_cfg.NAME, "DefaultAnchorGenerator", "MODEL.ANCHOR_GENERATOR.NAME")
    in_shapes = [shapes[f] for f in rpn.IN_FEATURES]
    channels = {s.channels for s in in_shapes}
    if len(channels) != 1:
        raise ValueError(f"RPN.IN_FEATURES {rpn.IN_FEATURES} must share one channel count")
    anchors = DefaultAnchorGenerator(anchors_cfg.SIZES, anchors_cfg.ASPECT_RATIOS,
                                     [s.stride for s in in_shapes], anchors_cfg.OFFSET)
    if len(set(anchors.num_cell_anchors)) != 1:
        raise ValueError("The RPN head needs the same number of anchors on every level")
    head = StandardRPNHead(channels.pop(), anchors.num_cell_anchors[0], rpn.CONV_DIMS)
    return RPN(
        in_features=rpn.IN_FEATURES, head=head, anchor_generator=anchors,
        box2box_transform=Box2BoxTransform(weights=tuple(rpn.BBOX_REG_WEIGHTS)),
        nms_thresh=rpn.NMS_THRESH, pre_nms_topk=(rpn.PRE_NMS_TOPK_TRAIN, rpn.PRE_NMS_TOPK_TEST),
        post_nms_topk=(rpn.POST_NMS_TOPK_TRAIN, rpn.POST_NMS_TOPK_TEST),
        min_box_size=cfg.MODEL.PROPOSAL_GENERATOR.MIN_SIZE,
    )


def build_offline_rpn(rpn_cfg, input_format: str) -> Tuple[nn.Module, RPN, OfflineRPNInput]:
    """Frozen (eval, no grad, stays in eval under `train()`) backbone and RPN from `rpn_cfg`.

    input_format: the detector's INPUT.FORMAT, i.e. the channel order of the images that will
    be passed to `offline_proposals`. Parameter names are detectron2's (`stem.*`, `res2.*`,
    `bottom_up.*`, `fpn_lateral2.*`, `rpn_head.*`); no anchor buffers are saved.
    """
    backbone = build_rpn_backbone(rpn_cfg).freeze_all()
    proposal_generator = build_rpn_head(rpn_cfg, backbone.output_shape()).freeze_all()
    offline_input = OfflineRPNInput(
        input_format=input_format, format=rpn_cfg.INPUT.FORMAT,
        pixel_mean=tuple(rpn_cfg.MODEL.PIXEL_MEAN), pixel_std=tuple(rpn_cfg.MODEL.PIXEL_STD),
    )
    return backbone, proposal_generator, offline_input
