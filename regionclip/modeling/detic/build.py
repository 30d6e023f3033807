"""cfg -> Detic's CustomRCNN and the weak-supervision settings (Detic's key names).

The second cfg reader of modeling, next to `modeling/build.py`, which calls it: that module's
builders of the detectron2-compatible ResNet and RPN (here trainable) and of the RoI-head
settings shared with RegionCLIP's detectors (post-processing, RoI sampling, box loss) are
passed in, since build.py imports this module.
"""
import json
import logging
import math
import os
from typing import Callable, Dict, Optional, Tuple, Type

import torch

from ...config.variants import get_variant
from ..detector import CLIPFastRCNN
from ..text_encoder import TextEncoder
from .clip_weak import WeaklySupervisedCLIPFastRCNN
from .meta_arch import CustomRCNN
from .predictor import DeticBoxPredictor
from .roi_heads import DeticRes5ROIHeads, build_res5
from .weak_losses import ANN_TYPES, WeakSupervision
from .zero_shot_classifier import ZeroShotClassifier, load_class_embeddings

logger = logging.getLogger("regionclip")

# CLIP ViT-B/32's text tower (Detic's) has the shapes of RN101's: width 512, 8 heads, 12 layers.
TEXT_TOWERS = {"ViT-B/32": "RN101"}
DEFAULT_POOLER_RESOLUTION = 14  # detectron2's ROI_BOX_HEAD.POOLER_RESOLUTION


def weak_supervision(cfg) -> WeakSupervision:
    box_head = cfg.MODEL.ROI_BOX_HEAD
    return WeakSupervision(
        num_proposals=box_head.WS_NUM_PROPS, add_image_box=box_head.ADD_IMAGE_BOX,
        image_box_size=box_head.IMAGE_BOX_SIZE, image_label_loss=box_head.IMAGE_LABEL_LOSS,
        softmax=box_head.SOFTMAX_WEAK_LOSS, image_loss_weight=box_head.IMAGE_LOSS_WEIGHT,
        caption_weight=box_head.CAPTION_WEIGHT, neg_caption_weight=box_head.NEG_CAP_WEIGHT,
        sync_captions=cfg.MODEL.SYNC_CAPTION_BATCH,
        caption_batch_ratio=cfg.MODEL.CAP_BATCH_RATIO,
    )


def check_weak_supervision(cfg) -> None:
    """DATALOADER.DATASET_ANN names known supervisions; captions need the text tower."""
    if not cfg.WITH_IMAGE_LABELS:
        return
    unknown = set(cfg.DATALOADER.DATASET_ANN) - set(ANN_TYPES)
    if unknown:
        raise ValueError(f"DATALOADER.DATASET_ANN has unknown types {sorted(unknown)}; valid: "
                         f"{ANN_TYPES}")
    if any("caption" in a for a in cfg.DATALOADER.DATASET_ANN) and not cfg.MODEL.WITH_CAPTION:
        raise ValueError("DATALOADER.DATASET_ANN uses captions: set MODEL.WITH_CAPTION True")


def caption_text_tower(cfg) -> Optional[TextEncoder]:
    """The frozen text tower of the caption loss (``MODEL.CAPTION_TEXT_TOWER``)."""
    if not cfg.MODEL.WITH_CAPTION:
        return None
    name = cfg.MODEL.CAPTION_TEXT_TOWER
    encoder = TextEncoder(get_variant(TEXT_TOWERS.get(name, name)))
    dim = cfg.MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_DIM
    if encoder.output_dim != dim:
        raise ValueError(f"MODEL.CAPTION_TEXT_TOWER {name} embeds captions in "
                         f"{encoder.output_dim} dimensions but MODEL.ROI_BOX_HEAD."
                         f"ZEROSHOT_WEIGHT_DIM is {dim}")
    return encoder


def zero_shot_classifier(cfg, input_size: int) -> ZeroShotClassifier:
    box_head = cfg.MODEL.ROI_BOX_HEAD
    if not box_head.USE_ZEROSHOT_CLS:
        raise ValueError("CustomRCNN is carried with its CLIP-embedding classifier only: set "
                         "MODEL.ROI_BOX_HEAD.USE_ZEROSHOT_CLS True")
    path, dim = box_head.ZEROSHOT_WEIGHT_PATH, box_head.ZEROSHOT_WEIGHT_DIM
    embeddings = load_class_embeddings(path, dim) if path else None
    num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    if embeddings is not None and len(embeddings) != num_classes:
        raise ValueError(f"MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH {path} holds "
                         f"{len(embeddings)} classes but MODEL.ROI_HEADS.NUM_CLASSES is "
                         f"{num_classes}")
    return ZeroShotClassifier(input_size, num_classes, dim, embeddings, box_head.NORM_WEIGHT,
                              box_head.NORM_TEMP, box_head.USE_BIAS)


def class_frequencies(cfg) -> Optional[torch.Tensor]:
    """[C] ``image_count ** FED_LOSS_FREQ_WEIGHT`` per class (sorted by category id) from
    ``CAT_FREQ_PATH``, with ``IGNORE_ZERO_CATS``. Without the file, NaNs for a checkpoint's
    ``freq_weight`` to replace (training without either stops with a message)."""
    box_head = cfg.MODEL.ROI_BOX_HEAD
    if not box_head.IGNORE_ZERO_CATS:
        return None
    path = box_head.CAT_FREQ_PATH
    if not (path and os.path.isfile(path)):
        logger.info("MODEL.ROI_BOX_HEAD.CAT_FREQ_PATH %r not found: the class frequencies of "
                    "IGNORE_ZERO_CATS must come from MODEL.WEIGHTS", path)
        return torch.full((cfg.MODEL.ROI_HEADS.NUM_CLASSES,), math.nan)
    with open(path) as f:
        categories = json.load(f)
    if not isinstance(categories, list) or any("image_count" not in c for c in categories):
        raise ValueError(f"{path}: expected a json list of categories with 'image_count' "
                         "(tools/prepare_detic_coco.py writes one)")
    counts = [c["image_count"] for c in sorted(categories, key=lambda c: c["id"])]
    if len(counts) != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
        raise ValueError(f"{path} lists {len(counts)} categories but MODEL.ROI_HEADS."
                         f"NUM_CLASSES is {cfg.MODEL.ROI_HEADS.NUM_CLASSES}")
    return torch.tensor(counts, dtype=torch.float32) ** box_head.FED_LOSS_FREQ_WEIGHT


def res5_head(cfg) -> Tuple[torch.nn.Sequential, int]:
    """detectron2's ``Res5ROIHeads`` res5 stage and its output width."""
    res = cfg.MODEL.RESNETS
    out_channels = res.RES2_OUT_CHANNELS * 8
    res5 = build_res5(out_channels // 2, res.NUM_GROUPS * res.WIDTH_PER_GROUP * 8, out_channels,
                      num_groups=res.NUM_GROUPS, norm=res.NORM,
                      stride_in_1x1=res.STRIDE_IN_1X1, dilation=res.RES5_DILATION)
    return res5, out_channels


def clip_detector(cfg) -> Tuple[Type[CLIPFastRCNN], Dict]:
    """RegionCLIP's detector class and its extra arguments: with ``WITH_IMAGE_LABELS`` the
    subclass that also learns from image labels and captions (`clip_weak.py`)."""
    if not cfg.WITH_IMAGE_LABELS:
        return CLIPFastRCNN, {}
    check_weak_supervision(cfg)
    return WeaklySupervisedCLIPFastRCNN, {"weak": weak_supervision(cfg)}


def build_custom_rcnn(cfg, build_backbone: Callable, build_rpn: Callable, rpn_training: Callable,
                      inference: Callable, sampling: Callable, losses: Callable) -> CustomRCNN:
    """Detic's CustomRCNN with CustomRes5ROIHeads (the OV-COCO models), from the core's
    builders: ``build_backbone(cfg)``, ``build_rpn(cfg, shapes)`` and the settings functions
    ``rpn_training``, ``inference``, ``sampling``, ``losses`` of cfg."""
    if cfg.MODEL.ROI_HEADS.NAME != "CustomRes5ROIHeads":
        raise ValueError(f"MODEL.ROI_HEADS.NAME {cfg.MODEL.ROI_HEADS.NAME!r}: CustomRCNN is "
                         "carried with 'CustomRes5ROIHeads' (the R50-C4 OV-COCO models)")
    check_weak_supervision(cfg)
    backbone = build_backbone(cfg)
    res5, width = res5_head(cfg)
    box_head = cfg.MODEL.ROI_BOX_HEAD
    predictor = DeticBoxPredictor(
        width, zero_shot_classifier(cfg, width), use_sigmoid_ce=box_head.USE_SIGMOID_CE,
        ignore_zero_cats=box_head.IGNORE_ZERO_CATS, freq_weight=class_frequencies(cfg),
        inference=inference(cfg), loss_settings=losses(cfg))
    roi_heads = DeticRes5ROIHeads(res5, predictor,
                                  box_head.POOLER_RESOLUTION or DEFAULT_POOLER_RESOLUTION,
                                  sampling(cfg), weak_supervision(cfg))
    return CustomRCNN(
        backbone=backbone, proposal_generator=build_rpn(cfg, backbone.output_shape()),
        roi_heads=roi_heads, pixel_mean=cfg.MODEL.PIXEL_MEAN, pixel_std=cfg.MODEL.PIXEL_STD,
        rpn_training=rpn_training(cfg), with_image_labels=cfg.WITH_IMAGE_LABELS,
        text_encoder=caption_text_tower(cfg), fp16=cfg.FP16)


def test_classifier(cfg, index: int) -> Optional[torch.Tensor]:
    """[C, D] class embeddings for ``DATASETS.TEST[index]`` (``MODEL.RESET_CLS_TESTS``), or
    None to keep the model's classifier."""
    if not cfg.MODEL.RESET_CLS_TESTS:
        return None
    paths, counts = cfg.MODEL.TEST_CLASSIFIERS, cfg.MODEL.TEST_NUM_CLASSES
    if not len(paths) == len(counts) == len(cfg.DATASETS.TEST):
        raise ValueError(f"MODEL.RESET_CLS_TESTS needs one MODEL.TEST_CLASSIFIERS and one "
                         f"MODEL.TEST_NUM_CLASSES entry per DATASETS.TEST dataset; got "
                         f"{len(paths)}, {len(counts)} and {len(cfg.DATASETS.TEST)}")
    embeddings = load_class_embeddings(paths[index], cfg.MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_DIM)
    if len(embeddings) != counts[index]:
        raise ValueError(f"MODEL.TEST_CLASSIFIERS {paths[index]} holds {len(embeddings)} "
                         f"classes but MODEL.TEST_NUM_CLASSES says {counts[index]}")
    return embeddings
