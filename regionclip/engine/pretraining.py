"""What ``tools/train_net.py`` does differently for region-text pretraining (reference section 5).

A config whose ``MODEL.META_ARCHITECTURE`` is ``PretrainFastRCNN`` trains on image-caption pairs
(``DATASETS.TRAIN`` / ``FACTORY_TRAIN`` / ``PATH_TRAIN``, see ``regionclip/data/image_text.py``)
instead of a detection dataset: no class vocabulary to check, the image-text loader, and no
evaluation unless ``DATASETS.TEST`` is set. Then the student is evaluated as a zero-shot
detector: a ``CLIPFastRCNN`` built from the same config (``MODEL.CLIP.TEXT_EMB_PATH`` holding the
test classes' embeddings, ``MODEL.ROI_HEADS.NUM_CLASSES``, ``TEST.*`` / ``INPUT.*_TEST``) gets
the student trunk and offline RPN weights, as it would from a saved pretraining checkpoint.
"""
import logging
from typing import Callable, Dict, Optional

from torch import nn

from ..config import ConfigError
from ..data.image_text import ImageTextLoader, build_image_text_loader
from ..modeling.build import build_model

logger = logging.getLogger("regionclip")

PRETRAIN_ARCHITECTURE = "PretrainFastRCNN"
ZERO_SHOT_ARCHITECTURE = "CLIPFastRCNN"


def is_pretraining(cfg) -> bool:
    return cfg.MODEL.META_ARCHITECTURE == PRETRAIN_ARCHITECTURE


def build_pretrain_loader(cfg) -> ImageTextLoader:
    """The image-text training loader of ``cfg``, its data described in the log."""
    loader = build_image_text_loader(cfg)
    for source in loader.dataset.sources:
        size = (f"{len(source)} items" if source.indexed else f"{len(source.shards)} shards")
        logger.info("Image-text data: %s %s (%s)", type(source).__name__, source.path, size)
    logger.info("Image-text batches of %d per process, %d loader workers, data seed %d",
                loader.batch_size, loader.num_workers, loader.dataset.seed)
    return loader


def zero_shot_detector_cfg(cfg):
    """``cfg`` with the zero-shot detector as its architecture."""
    if not cfg.MODEL.CLIP.TEXT_EMB_PATH:
        raise ConfigError("Evaluating during pretraining (DATASETS.TEST is set) needs "
                          "MODEL.CLIP.TEXT_EMB_PATH: embeddings of the test classes, in the "
                          "dataset's category order, with MODEL.ROI_HEADS.NUM_CLASSES rows")
    detector_cfg = cfg.clone()
    detector_cfg.defrost()
    detector_cfg.MODEL.META_ARCHITECTURE = ZERO_SHOT_ARCHITECTURE
    detector_cfg.freeze()
    return detector_cfg


def zero_shot_eval_fn(cfg, test_fn: Callable) -> Optional[Callable[[nn.Module], Dict]]:
    """``fn(pretrainer)`` -> ``test_fn(detector_cfg, detector)`` on a zero-shot detector holding
    the pretrainer's current weights; None when ``DATASETS.TEST`` is empty."""
    if not cfg.DATASETS.TEST:
        return None
    detector_cfg = zero_shot_detector_cfg(cfg)
    detector = build_model(detector_cfg)  # built once; its weights are refreshed per evaluation

    def evaluate(pretrainer: nn.Module) -> Dict:
        # The detector's keys are a subset of the pretrainer's (official layout), except its
        # class embeddings, which come from TEXT_EMB_PATH.
        report = detector.load_state_dict(pretrainer.state_dict(), strict=False)
        missing = [key for key in report.missing_keys if not key.startswith("roi_heads.")]
        if missing:
            raise RuntimeError(f"The pretrained model lacks detector weights: {missing[:5]}")
        return test_fn(detector_cfg, detector)

    return evaluate
