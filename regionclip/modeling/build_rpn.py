"""cfg -> the detectron2-compatible RPNs: the frozen offline RPN of RegionCLIP's models (from
the second YAML named by ``MODEL.CLIP.OFFLINE_RPN_CONFIG``) and an RPN trained alone
(``ProposalNetwork``, and the original's ``GeneralizedRCNN`` RPN configs). A config reader, as
``build.py``, which calls it.
"""
import logging
from typing import Dict, Tuple

from torch import nn

from ..config import load_config
from .box_coder import Box2BoxTransform
from .resnet_fpn import FPN, ResNet, ShapeSpec, build_resnet
from .rpn import RPN, DefaultAnchorGenerator, OfflineRPNInput, StandardRPNHead
from .rpn_training import ProposalNetwork, RPNTraining

logger = logging.getLogger("regionclip")

# A pixel mean summing below this is on the 0-1 scale (CLIP style), as the original guessed.
UNIT_SCALE_MEAN_SUM = 3.0
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
# Config META_ARCHITECTUREs whose RPN part `build_proposal_network` builds.
RPN_ARCHITECTURES = ("ProposalNetwork", "GeneralizedRCNN")
SUPPORTED_BOX_LOSS = "smooth_l1"


def is_unit_scale(pixel_mean) -> bool:
    return sum(pixel_mean) < UNIT_SCALE_MEAN_SUM


def offline_rpn_parts(cfg) -> Dict[str, nn.Module]:
    """The frozen offline RPN (keyword arguments of both models) when proposals come from it."""
    if cfg.MODEL.CLIP.CROP_REGION_TYPE != "RPN":
        return {}
    backbone, generator, offline_input = build_offline_rpn(offline_rpn_cfg(cfg),
                                                           cfg.INPUT.FORMAT)
    return dict(offline_backbone=backbone, offline_proposal_generator=generator,
                offline_input=offline_input)


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
    return backbone, proposal_generator, rpn_input(rpn_cfg, input_format)


def rpn_input(rpn_cfg, input_format: str) -> OfflineRPNInput:
    """How images in ``input_format`` reach an RPN built from ``rpn_cfg``."""
    mean = tuple(rpn_cfg.MODEL.PIXEL_MEAN)
    return OfflineRPNInput(input_format=input_format, format=rpn_cfg.INPUT.FORMAT,
                           pixel_mean=mean, pixel_std=tuple(rpn_cfg.MODEL.PIXEL_STD),
                           unit_scale=is_unit_scale(mean))


def rpn_training_settings(cfg) -> RPNTraining:
    rpn = cfg.MODEL.RPN
    if rpn.BBOX_REG_LOSS_TYPE != SUPPORTED_BOX_LOSS:
        raise ValueError(f"MODEL.RPN.BBOX_REG_LOSS_TYPE {rpn.BBOX_REG_LOSS_TYPE!r} is not "
                         f"supported; valid: {SUPPORTED_BOX_LOSS!r}")
    return RPNTraining(
        batch_size_per_image=rpn.BATCH_SIZE_PER_IMAGE, positive_fraction=rpn.POSITIVE_FRACTION,
        iou_thresholds=tuple(rpn.IOU_THRESHOLDS), iou_labels=tuple(rpn.IOU_LABELS),
        boundary_thresh=rpn.BOUNDARY_THRESH, smooth_l1_beta=rpn.SMOOTH_L1_BETA,
        objectness_weight=rpn.LOSS_WEIGHT, box_weight=rpn.LOSS_WEIGHT * rpn.BBOX_REG_LOSS_WEIGHT,
    )


def build_proposal_network(cfg) -> ProposalNetwork:
    """The backbone + RPN of a detectron2 RPN or Mask R-CNN config, trainable.

    A ``GeneralizedRCNN`` config (the original's ``mask_rcnn_*`` files) gets its RPN part only:
    its ROI box and mask heads are not built, because RegionCLIP uses only the RPN.
    """
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch not in RPN_ARCHITECTURES:
        raise ValueError(f"An RPN can be built from META_ARCHITECTURE {RPN_ARCHITECTURES}, "
                         f"not {arch!r}")
    if arch != "ProposalNetwork" or cfg.MODEL.MASK_ON:
        logger.info("Building only the RPN (backbone + proposal_generator) of this %s config: "
                    "RegionCLIP uses only the RPN of such a detector (MODEL.CLIP.BB_RPN_WEIGHTS)"
                    ", so its ROI box and mask heads are neither built nor trained", arch)
    backbone = build_rpn_backbone(cfg)
    generator = build_rpn_head(cfg, backbone.output_shape())
    return ProposalNetwork(backbone=backbone, proposal_generator=generator,
                           input_normalization=rpn_input(cfg, cfg.INPUT.FORMAT),
                           settings=rpn_training_settings(cfg))
