"""cfg -> model: the only modeling code that reads the config.

Every model class takes plain arguments; the functions here translate the config keys into
them: the CLIP detector (``CLIPFastRCNN``), the pretrainer (``PretrainFastRCNN``), the frozen
offline RPN of both (from the second YAML named by ``MODEL.CLIP.OFFLINE_RPN_CONFIG``) and an RPN
trained alone (``ProposalNetwork``, and the original's ``GeneralizedRCNN`` RPN configs).
"""
import logging
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ..config import finalize_clip_settings, load_config, resolve_clip_variant
from ..config.variants import CLIPVariant
from .box_coder import Box2BoxTransform
from .box_predictor import InferenceSettings, LossSettings, TextEmbeddingPredictor
from .clip_resnet import CLIPResNet
from .detector import CLIPFastRCNN
from .detic.build import build_custom_rcnn, clip_detector
from .matcher import RoISampling
from .pretrainer import LOSS_NAMES, REGION_LOSSES, PretrainFastRCNN
from .region_head import MaskHead, RegionHead
from .resnet_fpn import FPN, ResNet, ShapeSpec, build_resnet
from .rpn import RPN, DefaultAnchorGenerator, OfflineRPNInput, StandardRPNHead
from .rpn_training import ProposalNetwork, RPNTraining
from .text_encoder import TextEncoder, load_embeddings

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


def _pixel_stats(cfg):
    """Mean/std on the 0-255 scale: CLIP configs give them on the 0-1 scale."""
    mean, std = list(cfg.MODEL.PIXEL_MEAN), list(cfg.MODEL.PIXEL_STD)
    if is_unit_scale(mean):
        if cfg.INPUT.FORMAT != "RGB":
            raise ValueError("MODEL.PIXEL_MEAN on the 0-1 scale (CLIP) needs INPUT.FORMAT RGB")
        mean, std = [255.0 * m for m in mean], [255.0 * s for s in std]
    return mean, std


# ---------------------------------------------------------------------------------------------
# CLIP detector and pretrainer
# ---------------------------------------------------------------------------------------------
def _class_embeddings(path: str, num_classes: int, variant: CLIPVariant, key: str):
    """Embeddings from ``path``, or a placeholder that a checkpoint is expected to fill."""
    if not path:
        return torch.randn(num_classes, variant.embed_dim) if num_classes else None
    emb = load_embeddings(path, expected_dim=variant.embed_dim)
    if num_classes and emb.shape[0] != num_classes:
        raise ValueError(
            f"{key} {path} holds {emb.shape[0]} class embeddings but "
            f"MODEL.ROI_HEADS.NUM_CLASSES is {num_classes}"
        )
    return emb


def inference_settings(cfg) -> InferenceSettings:
    clip, heads = cfg.MODEL.CLIP, cfg.MODEL.ROI_HEADS
    gt_boxes = clip.CROP_REGION_TYPE == "GT"
    if gt_boxes and clip.MULTIPLY_RPN_SCORE:
        raise ValueError("MODEL.CLIP.MULTIPLY_RPN_SCORE needs RPN proposals; set it to False "
                         "with MODEL.CLIP.CROP_REGION_TYPE GT")
    return InferenceSettings(
        score_thresh=heads.SCORE_THRESH_TEST,
        nms_thresh=heads.NMS_THRESH_TEST,
        detections_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
        no_box_delta=clip.NO_BOX_DELTA or gt_boxes,  # ground-truth boxes are never regressed
        multiply_rpn_score=clip.MULTIPLY_RPN_SCORE,
        report_unfused_scores=clip.VIS,
        soft_nms=heads.SOFT_NMS_ENABLED,
        soft_nms_method=heads.SOFT_NMS_METHOD,
        soft_nms_sigma=heads.SOFT_NMS_SIGMA,
        soft_nms_prune=heads.SOFT_NMS_PRUNE,
        box_reg_weights=tuple(cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS),
    )


def roi_sampling(cfg) -> RoISampling:
    heads = cfg.MODEL.ROI_HEADS
    return RoISampling(
        batch_size_per_image=heads.BATCH_SIZE_PER_IMAGE,
        positive_fraction=heads.POSITIVE_FRACTION,
        iou_thresholds=tuple(heads.IOU_THRESHOLDS),
        iou_labels=tuple(heads.IOU_LABELS),
        append_gt=heads.PROPOSAL_APPEND_GT,
        only_foreground=cfg.MODEL.CLIP.ONLY_SAMPLE_FG_PROPOSALS,
    )


def loss_settings(cfg) -> LossSettings:
    box_head = cfg.MODEL.ROI_BOX_HEAD
    if box_head.BBOX_REG_LOSS_TYPE != "smooth_l1":
        raise ValueError(f"MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE {box_head.BBOX_REG_LOSS_TYPE!r}"
                         " is not supported; valid: 'smooth_l1'")
    return LossSettings(
        focal_gamma=cfg.MODEL.CLIP.FOCAL_SCALED_LOSS,
        bg_weight=cfg.MODEL.CLIP.BG_CLS_LOSS_WEIGHT,
        smooth_l1_beta=box_head.SMOOTH_L1_BETA,
        box_reg_loss_weight=box_head.BBOX_REG_LOSS_WEIGHT,
        box_reg_weights=tuple(box_head.BBOX_REG_WEIGHTS),
    )


def build_region_head(cfg, variant: CLIPVariant) -> RegionHead:
    clip = cfg.MODEL.CLIP
    num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    train_emb = _class_embeddings(clip.TEXT_EMB_PATH, num_classes, variant,
                                  "MODEL.CLIP.TEXT_EMB_PATH")
    test_emb = _class_embeddings(clip.OPENSET_TEST_TEXT_EMB_PATH, 0, variant,
                                 "MODEL.CLIP.OPENSET_TEST_TEXT_EMB_PATH")
    predictor = TextEmbeddingPredictor(train_emb, test_emb, temperature=clip.CLSS_TEMP)
    mask_head = None
    if cfg.MODEL.MASK_ON:
        if cfg.MODEL.ROI_MASK_HEAD.NUM_CONV != 0:
            raise ValueError("Only the official class-agnostic mask head "
                             "(MODEL.ROI_MASK_HEAD.NUM_CONV 0) is supported")
        num_mask_classes = 1 if cfg.MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK else num_classes
        mask_head = MaskHead(variant.attnpool_dim, cfg.MODEL.ROI_MASK_HEAD.CONV_DIM,
                             num_mask_classes)
    return RegionHead(predictor, cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION,
                      inference_settings(cfg), mask_head, sampling=roi_sampling(cfg),
                      loss_settings=loss_settings(cfg))


def build_clip_fast_rcnn(cfg) -> CLIPFastRCNN:
    variant = resolve_clip_variant(cfg)
    clip = cfg.MODEL.CLIP
    mean, std = _pixel_stats(cfg)
    text = clip.GET_CONCEPT_EMB or cfg.MODEL.WITH_CAPTION  # (Detic's caption loss)
    lang_encoder: Optional[TextEncoder] = TextEncoder(variant) if text else None
    detector, weak = clip_detector(cfg)  # WITH_IMAGE_LABELS: with Detic's weak supervision
    model = detector(
        backbone=CLIPResNet(variant, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT),
        roi_heads=build_region_head(cfg, variant),
        pixel_mean=mean,
        pixel_std=std,
        proposal_source=clip.CROP_REGION_TYPE,
        lang_encoder=lang_encoder,
        precision=cfg.MODEL.PRECISION,
        **_offline_rpn_parts(cfg),
        **weak,
    )
    logger.info("Built CLIPFastRCNN with CLIP %s, %s proposals, %s inference", variant.name,
                clip.CROP_REGION_TYPE, cfg.MODEL.PRECISION)
    return model


def _pretrain_losses(cfg) -> tuple:
    """The enabled pretraining losses: MODEL.CLIP.PRETRAIN_LOSSES, less img_txt without
    PRETRAIN_IMG_TXT_LEVEL and the region losses without CONCEPT_POOL_EMB."""
    clip = cfg.MODEL.CLIP
    unknown = set(clip.PRETRAIN_LOSSES) - set(LOSS_NAMES)
    if unknown:
        raise ValueError(f"MODEL.CLIP.PRETRAIN_LOSSES has unknown names {sorted(unknown)}; "
                         f"valid names: {list(LOSS_NAMES)}")
    losses = tuple(clip.PRETRAIN_LOSSES)
    if not clip.PRETRAIN_IMG_TXT_LEVEL:
        losses = tuple(name for name in losses if name != "img_txt")
    if not clip.CONCEPT_POOL_EMB and any(name in REGION_LOSSES for name in losses):
        logger.warning("MODEL.CLIP.CONCEPT_POOL_EMB is empty: pretraining without the region "
                       "losses %s", [name for name in losses if name in REGION_LOSSES])
        losses = tuple(name for name in losses if name not in REGION_LOSSES)
    if "img_txt" in losses and not clip.PRETRAIN_ONLY_EOT:
        raise ValueError("MODEL.CLIP.PRETRAIN_ONLY_EOT False gives one feature per token, which "
                         "cannot be matched to whole images; set it to True")
    return losses


def build_pretrain_fast_rcnn(cfg) -> PretrainFastRCNN:
    clip = cfg.MODEL.CLIP
    student, teacher = resolve_clip_variant(cfg), resolve_clip_variant(cfg, teacher=True)
    losses, parts = _pretrain_losses(cfg), _offline_rpn_parts(cfg)
    if any(name in REGION_LOSSES for name in losses):
        teacher_pool = clip.TEACHER_CONCEPT_POOL_EMB or clip.CONCEPT_POOL_EMB
        parts.update(concept_emb=load_embeddings(clip.CONCEPT_POOL_EMB, student.embed_dim),
                     teacher_concept_emb=load_embeddings(teacher_pool, teacher.embed_dim))
    if "img_txt" in losses:
        parts["lang_encoder"] = TextEncoder(student)
    mean, std = _pixel_stats(cfg)
    model = PretrainFastRCNN(
        backbone=CLIPResNet(student, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT),
        teacher_backbone=CLIPResNet(teacher),
        pixel_mean=[m / 255.0 for m in mean],  # pretraining images are in [0, 1]
        pixel_std=[s / 255.0 for s in std],
        pooler_resolution=cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION,
        teacher_pooler_resolution=clip.TEACHER_POOLER_RESOLUTION,
        losses=losses,
        sample_regions=clip.PRETRAIN_SAMPLE_REGIONS,
        concept_thres=clip.CONCEPT_THRES,
        temperature=clip.CLSS_TEMP,
        gather=clip.GATHER_GPUS,
        **parts,
    )
    logger.info("Built PretrainFastRCNN: student %s, teacher %s, losses %s", student.name,
                teacher.name, list(losses))
    return model


# ---------------------------------------------------------------------------------------------
# Offline RPN and RPN training
# ---------------------------------------------------------------------------------------------
def _offline_rpn_parts(cfg) -> Dict[str, nn.Module]:
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


def _build_custom_rcnn(cfg):
    """Detic's CustomRCNN (`detic/build.py`) from the core's RPN and RoI-head builders."""
    return build_custom_rcnn(cfg, build_rpn_backbone, build_rpn_head, rpn_training_settings,
                             inference_settings, roi_sampling, loss_settings)


META_ARCHITECTURES = {
    "CLIPFastRCNN": build_clip_fast_rcnn,
    "PretrainFastRCNN": build_pretrain_fast_rcnn,
    "CustomRCNN": _build_custom_rcnn,  # Detic's open-vocabulary COCO models
    "ProposalNetwork": build_proposal_network,  # trains an offline RPN (rpn_training.py)
    # The original's mask_rcnn_* configs: only their RPN is built and trained, for
    # MODEL.CLIP.BB_RPN_WEIGHTS (the log says so).
    "GeneralizedRCNN": build_proposal_network,
}


def build_model(cfg) -> torch.nn.Module:
    """The model of ``MODEL.META_ARCHITECTURE`` on ``MODEL.DEVICE``; sizes the config leaves
    at 0 follow from the CLIP variant."""
    cfg = finalize_clip_settings(cfg)
    name = cfg.MODEL.META_ARCHITECTURE
    if name not in META_ARCHITECTURES:
        raise ValueError(f"MODEL.META_ARCHITECTURE {name!r} is not available; valid names: "
                         f"{sorted(META_ARCHITECTURES)}")
    model = META_ARCHITECTURES[name](cfg)
    device = cfg.MODEL.DEVICE
    if device.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("MODEL.DEVICE is %s but no GPU is available: running on the CPU", device)
        device = "cpu"
    return model.to(torch.device(device))
