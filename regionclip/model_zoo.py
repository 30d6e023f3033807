"""What each official checkpoint is, where the configs are, and where files are found.

One small record per official file (the torchvision ``Weights.meta`` idea): its variant (and
so its embedding width and pooler resolution), the official config it is evaluated with, the
matching RPN and class-embedding files and the published numbers. The Python API and the
command line take their defaults from here, so users never restate architecture flags. Files
without a record are described by :func:`inspect_checkpoint`, from their tensor shapes.
"""
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Tuple

from .checkpoint import DETECTRON2, OPENAI_CLIP, read_state_dict, visual_arch
from .config.variants import get_variant

__all__ = ["CONFIGS_ENV", "DETECTOR_WEIGHTS", "RPN_WEIGHTS", "CheckpointContents",
           "DetectorWeights", "RPNWeights", "VARIANT_CONFIGS", "config_path", "find_companion",
           "inspect_checkpoint", "rpn_for_layout"]

CONFIGS_ENV = "REGIONCLIP_CONFIGS"  # folder holding the YAML configs, when not beside the package
_COCO, _LVIS = "COCO-InstanceSegmentation/", "LVISv1-InstanceSegmentation/"
COCO_C4_RPN = _COCO + "mask_rcnn_R_50_C4_1x_ovd_FSD.yaml"
LVIS_FPN_RPN = _LVIS + "mask_rcnn_R_50_FPN_1x.yaml"
# The original's custom-image flow (visualize_zeroshot_inference.sh): any vocabulary, any image.
ZERO_SHOT_CONFIG = _LVIS + "CLIP_fast_rcnn_R_50_C4_custom_img.yaml"
# Checkpoints of the toy world (tools/toy_world.py) have no record; their variant names the
# configs they were trained with: (zero-shot config, offline RPN config).
VARIANT_CONFIGS = {"toy": ("toyworld/zero_shot.yaml", "toyworld/rpn.yaml")}
# test_transfer_learning.sh evaluates every fine-tuned detector with soft-NMS.
_SOFT_NMS = ("MODEL.ROI_HEADS.SOFT_NMS_ENABLED", True)
# pretrained_ckpt/ layout: a file's companions sit in sibling folders.
_COMPANION_DIRS = (".", "../rpn", "../regionclip", "../clip", "../concept_emb")


@dataclass(frozen=True)
class RPNWeights:
    """An offline RPN file (``MODEL.CLIP.BB_RPN_WEIGHTS``) and how to build its network."""

    file_name: str
    config: str  # MODEL.CLIP.OFFLINE_RPN_CONFIG, relative to configs/
    lsj: bool = False  # MODEL.CLIP.OFFLINE_RPN_LSJ_PRETRAINED
    trained_on: str = ""


@dataclass(frozen=True)
class DetectorWeights:
    """An official RegionCLIP detector file."""

    file_name: str
    variant: str
    kind: str  # "pretrained" (zero-shot; carries a text tower) or "finetuned"
    config: str  # official inference config, relative to configs/
    rpn: str  # file name of the matching offline RPN (a key of RPN_WEIGHTS)
    embeddings: Tuple[str, ...]  # matching class-embedding files (pretrained_ckpt/concept_emb/)
    published: Dict[str, float] = field(default_factory=dict)
    overrides: Tuple = ()  # KEY VALUE pairs the official scripts add to `config`
    # A file with the text tower that made the released embeddings ("" = this file has one).
    text_weights: str = ""

    @property
    def embed_dim(self) -> int:
        return get_variant(self.variant).embed_dim

    @property
    def pooler_resolution(self) -> int:
        return get_variant(self.variant).pooler_resolution

    @property
    def has_text_tower(self) -> bool:
        return self.kind == "pretrained"


RPN_WEIGHTS = {r.file_name: r for r in (
    RPNWeights("rpn_coco_48.pth", COCO_C4_RPN, trained_on="COCO 48 base classes"),
    RPNWeights("rpn_coco_65.pth", COCO_C4_RPN, trained_on="COCO 65 classes"),
    RPNWeights("rpn_coco_80.pth", COCO_C4_RPN, trained_on="COCO 80 classes"),
    RPNWeights("rpn_lvis_866.pth", LVIS_FPN_RPN, trained_on="LVIS 866 base classes"),
    RPNWeights("rpn_lvis_866_lsj.pth", LVIS_FPN_RPN, lsj=True,
               trained_on="LVIS 866 base classes, large-scale jitter"),
)}


def _pretrained(variant: str, suffix: str, rpn_ap50: float, gt_ap50: float) -> DetectorWeights:
    return DetectorWeights(
        f"regionclip_pretrained-cc_{variant.lower()}.pth", variant, "pretrained",
        ZERO_SHOT_CONFIG, "rpn_lvis_866.pth",
        (f"coco_65_cls_emb{suffix}.pth", f"lvis_1203_cls_emb{suffix}.pth"),
        {"COCO zero-shot AP50, RPN boxes": rpn_ap50, "COCO zero-shot AP50, GT boxes": gt_ap50},
    )


def _finetuned(variant: str, suffix: str, dataset: str, published) -> DetectorWeights:
    coco = dataset == "coco"
    config = _COCO + "CLIP_fast_rcnn_R_50_C4_ovd.yaml" if coco else \
        _LVIS + "CLIP_fast_rcnn_R_50_C4.yaml"
    return DetectorWeights(
        f"regionclip_finetuned-{dataset}_{variant.lower()}.pth", variant, "finetuned", config,
        "rpn_coco_48.pth" if coco else "rpn_lvis_866_lsj.pth",
        (f"coco_48_base_cls_emb{suffix}.pth", f"coco_65_cls_emb{suffix}.pth") if coco else
        (f"lvis_866_base_cls_emb{suffix}.pth", f"lvis_1203_cls_emb{suffix}.pth"),
        published, _SOFT_NMS, text_weights=f"regionclip_pretrained-cc_{variant.lower()}.pth",
    )


DETECTOR_WEIGHTS = {w.file_name: w for w in (
    _pretrained("RN50", "", 26.8, 61.4),
    _pretrained("RN50x4", "_rn50x4", 29.6, 65.5),
    _finetuned("RN50", "", "coco", {"COCO novel AP50": 31.4, "COCO base AP50": 57.1,
                                    "COCO all AP50": 50.4}),
    _finetuned("RN50x4", "_rn50x4", "coco", {"COCO novel AP50": 39.3, "COCO base AP50": 61.6,
                                             "COCO all AP50": 55.7}),
    _finetuned("RN50", "", "lvis", {}),  # the original's model zoo gives no numbers
    _finetuned("RN50x4", "_rn50x4", "lvis", {"LVIS mask APr": 22.0, "LVIS mask AP": 32.3}),
)}


@dataclass(frozen=True)
class CheckpointContents:
    """What a checkpoint holds, read from its key names and tensor shapes."""

    format: str  # regionclip / detectron2 / openai_clip (see regionclip.checkpoint)
    variant: str  # CLIP variant of the image trunk; "" when there is none or it is unknown
    has_text_tower: bool
    rpn_layout: str  # offline RPN it carries: "", "C4", "FPN" or "FPN-LSJ"


def _rpn_layout(keys, backbone: str, generator: str) -> str:
    if not any(k.startswith(generator + "rpn_head.") for k in keys):
        return ""
    if not any(k.startswith(backbone + "fpn_lateral") for k in keys):
        return "C4"
    # The LSJ RPN head has two convolutions, named conv.conv0 / conv.conv1.
    return "FPN-LSJ" if generator + "rpn_head.conv.conv0.weight" in keys else "FPN"


def inspect_checkpoint(path: str) -> CheckpointContents:
    """Describe ``path`` without building a model (reads the file once)."""
    state_dict, fmt = read_state_dict(path)
    shapes = {k: v.shape for k, v in state_dict.items() if hasattr(v, "shape")}
    openai = fmt == OPENAI_CLIP
    arch = visual_arch(shapes, "visual." if openai else "backbone.")
    variant = arch.name if arch is not None and arch.name != "unknown" else ""
    text = any(k.startswith("token_embedding" if openai else "lang_encoder.") for k in shapes)
    if fmt == DETECTRON2:
        layout = _rpn_layout(shapes, "backbone.", "proposal_generator.")
    else:
        layout = _rpn_layout(shapes, "offline_backbone.", "offline_proposal_generator.")
    return CheckpointContents(fmt, variant, text, layout)


def rpn_for_layout(layout: str) -> Optional[RPNWeights]:
    """The official RPN config that builds an RPN of ``layout`` (see CheckpointContents)."""
    configs = {"C4": (COCO_C4_RPN, False), "FPN": (LVIS_FPN_RPN, False),
               "FPN-LSJ": (LVIS_FPN_RPN, True)}
    if layout not in configs:
        return None
    config, lsj = configs[layout]
    return RPNWeights("", config, lsj)


def config_path(name: str) -> str:
    """An existing config file: ``name`` itself, or ``name`` under ``$REGIONCLIP_CONFIGS``, the
    ``configs/`` folder beside the package (source checkouts) or ``./configs``."""
    if os.path.isfile(name):
        return os.path.abspath(name)
    roots = [os.environ.get(CONFIGS_ENV, ""), Path(__file__).resolve().parents[1] / "configs",
             "configs"]
    for root in filter(None, roots):
        candidate = Path(root) / name
        if candidate.is_file():
            return str(candidate.resolve())
    raise FileNotFoundError(
        f"config file not found: {name} (looked in ${CONFIGS_ENV}, the regionclip source tree "
        "and ./configs); pass config= with a path, or set "
        f"{CONFIGS_ENV} to the repository's configs/ folder")


def find_companion(path: str, file_name: str) -> str:
    """``file_name`` in the folder of ``path`` or its pretrained_ckpt/ siblings; "" if absent."""
    if not file_name:
        return ""
    folder = os.path.dirname(os.path.abspath(path))
    for sub in _COMPANION_DIRS:
        candidate = os.path.normpath(os.path.join(folder, sub, file_name))
        if os.path.isfile(candidate):
            return candidate
    return ""
