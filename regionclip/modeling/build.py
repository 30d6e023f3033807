"""cfg -> model: the only modeling code that reads the config.

Every model class takes plain arguments; the functions here translate the config keys into
them: the CLIP detector (``CLIPFastRCNN``), the pretrainer (``PretrainFastRCNN``), a CLIP
trained from scratch (``CLIP``). The RPNs are built by ``build_rpn.py``, Detic's models by
``detic/build.py``: the two other config readers of modeling.
"""
import logging
from typing import Optional

import torch

from ..config import finalize_clip_settings, resolve_clip_variant
from ..config.variants import CLIPVariant
from .box_predictor import InferenceSettings, LossSettings, TextEmbeddingPredictor
from .build_rpn import (
    build_proposal_network,
    build_rpn_backbone,
    build_rpn_head,
    is_unit_scale,
    offline_rpn_parts,
    rpn_training_settings,
)
from .clip_model import CLIPModel
from .clip_resnet import CLIPResNet
from .detector import CLIPFastRCNN
from .detic.build import build_custom_rcnn, clip_detector
from .matcher import RoISampling
from .pretrainer import LOSS_NAMES, REGION_LOSSES, PretrainFastRCNN
from .region_head import MaskHead, RegionHead
from .text_encoder import TextEncoder, load_embeddings

logger = logging.getLogger("regionclip")

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
    if not box_head.CLS_AGNOSTIC_BBOX_REG:
        raise ValueError("MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG False (per-class box deltas) "
                         "is not supported: these detectors regress one box per region, as "
                         "every RegionCLIP and Detic config does; set it to True")
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
    if not clip.USE_TEXT_EMB_CLASSIFIER:
        raise ValueError("MODEL.CLIP.USE_TEXT_EMB_CLASSIFIER False (a learnt linear classifier) "
                         "is not supported: CLIPFastRCNN classifies by text embeddings, as every "
                         "RegionCLIP config does; set it to True")
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
        **offline_rpn_parts(cfg),
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
    losses, parts = _pretrain_losses(cfg), offline_rpn_parts(cfg)
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
        teacher_temperature=clip.TEACHER_TEMP,
        teacher_crop_context=clip.TEACHER_CROP_CONTEXT,
        gather=clip.GATHER_GPUS,
        **parts,
    )
    logger.info("Built PretrainFastRCNN: student %s, teacher %s, losses %s", student.name,
                teacher.name, list(losses))
    return model


def build_clip_model(cfg) -> CLIPModel:
    """A whole-image CLIP trained from scratch on image-caption pairs (``clip_model.py``)."""
    mean, std = _pixel_stats(cfg)
    return CLIPModel(resolve_clip_variant(cfg), [m / 255.0 for m in mean],
                     [s / 255.0 for s in std], gather=cfg.MODEL.CLIP.GATHER_GPUS)


def _build_custom_rcnn(cfg):
    """Detic's CustomRCNN (`detic/build.py`) from the core's RPN and RoI-head builders."""
    return build_custom_rcnn(cfg, build_rpn_backbone, build_rpn_head, rpn_training_settings,
                             inference_settings, roi_sampling, loss_settings)


META_ARCHITECTURES = {
    "CLIP": build_clip_model,  # the toy world's stand-in for OpenAI CLIP
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
    if cfg.MODEL.CHANNELS_LAST:  # conv weights; activations follow them
        model = model.to(memory_format=torch.channels_last)
    device = cfg.MODEL.DEVICE
    if device.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("MODEL.DEVICE is %s but no GPU is available: running on the CPU", device)
        device = "cpu"
    return model.to(torch.device(device))
