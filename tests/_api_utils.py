"""Working tiny RegionCLIP checkpoints and test images for the API and CLI tests.

The checkpoints have the official layout (``backbone.*``, ``teacher_backbone.*``,
``lang_encoder.*``, ``offline_*``, ``roi_heads.box_predictor.*``) with the tiny CLIP variant's
shapes and values that make a working model: the CLIP towers come from an open_clip reference
model, the offline RPN is the tiny R50-FPN of ``configs/tests`` with calibrated norms.
"""
from pathlib import Path

import numpy as np
import torch
from _checkpoint_utils import box_predictor_shapes, make_state_dict, pretrained_shapes
from _clip_utils import openclip_reference, text_state_dict, visual_state_dict
from _data_utils import draw_boxes
from _rpn_utils import TINY_FPN, build_from_file, randomize_
from PIL import Image

from regionclip.checkpoint import save_checkpoint
from regionclip.config.variants import get_variant

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = str(REPO / "configs" / "tests" / "tiny.yaml")
TINY_RPN_CONFIG = str(TINY_FPN)
TINY = get_variant("tiny")
CLASSES = ["person", "car", "dog"]


def clip_state() -> dict:
    """Student and teacher trunks and the text tower, with the official prefixes."""
    reference = openclip_reference("tiny")
    visual = {k: v for k, v in visual_state_dict(reference).items()
              if not k.endswith("num_batches_tracked")}  # the official files have none
    state = {f"{part}.{k}": v for part in ("backbone", "teacher_backbone")
             for k, v in visual.items()}
    state.update({f"lang_encoder.{k}": v for k, v in text_state_dict(reference).items()})
    assert set(state) == set(pretrained_shapes("tiny", rpn=False))
    return state


def rpn_state(seed: int = 0) -> dict:
    """A tiny offline R50-FPN RPN that proposes a few dozen boxes on 64-96 px images."""
    backbone, generator, _ = build_from_file(TINY_FPN)
    generator_seed = torch.Generator().manual_seed(seed)
    batch = torch.randn(2, 3, 64, 96, generator=generator_seed) * 50  # BGR minus mean scale
    with torch.no_grad():
        randomize_(backbone, seed=seed, calibration_input=batch)
        randomize_(generator, seed=seed + 1)
        generator.rpn_head.anchor_deltas.weight.mul_(0.3)  # moved, not thrown off the image
    state = {f"offline_backbone.{k}": v for k, v in backbone.state_dict().items()}
    state.update({f"offline_proposal_generator.{k}": v for k, v in generator.state_dict().items()})
    return state


def save_pretrained(path, rpn: bool = True) -> str:
    """A pretrained-RegionCLIP-like file (text tower, teacher, optional offline RPN)."""
    state = clip_state()
    if rpn:
        state.update(rpn_state())
    save_checkpoint(path, state)
    return str(path)


def save_finetuned(path, rpn: bool = False, num_classes: int = 3) -> str:
    """A fine-tuned-like file: trunk, box predictor (+ offline RPN); no text tower."""
    state = {k: v for k, v in clip_state().items() if k.startswith("backbone.")}
    predictor = make_state_dict(box_predictor_shapes(TINY.embed_dim, num_classes), seed=3)
    predictor["roi_heads.box_predictor.cls_bg_score.weight"].zero_()
    state.update({k: v * 0.01 if "bbox_pred" in k else v for k, v in predictor.items()})
    if rpn:
        state.update(rpn_state())
    save_checkpoint(path, state)
    return str(path)


def save_checkpoint_files(root: Path) -> dict:
    """A pretrained checkpoint (official file name), a fine-tuned one with an RPN inside and
    one without, under ``root``."""
    return {
        "pretrained": save_pretrained(root / "regionclip_pretrained-cc_rn50.pth"),
        "finetuned": save_finetuned(root / "finetuned_tiny.pth", rpn=True),
        "gt_only": save_finetuned(root / "finetuned_gt_only.pth", rpn=False),
        "root": root,
    }


def tiny_detector(weights, cache_dir, rpn: bool = True, **kwargs):
    from regionclip.api import Detector

    return Detector.from_pretrained(
        weights, variant="tiny", device=kwargs.pop("device", "cpu"), config=TINY_CONFIG,
        rpn_config=TINY_RPN_CONFIG if rpn else None,
        cache_dir=None if cache_dir is None else str(cache_dir), **kwargs)


def scene(size=(60, 80), seed: int = 0) -> np.ndarray:
    """uint8 RGB [h, w, 3]: coloured rectangles on a dark background."""
    rng = np.random.default_rng(seed)
    h, w = size
    boxes = [[int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2)), w // 3, h // 3]
             for _ in range(3)]
    colors = [tuple(int(c) for c in rng.integers(60, 255, 3)) for _ in boxes]
    return draw_boxes(size, boxes, colors)


def write_mixed_images(folder: Path) -> dict:
    """JPEG RGB, PNG grey, PNG RGBA and PNG RGB images of different sizes; name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb_a, rgb_b, rgb_c = scene((60, 80), 1), scene((72, 50), 2), scene((48, 64), 3)
    images = {
        "rgb.jpg": Image.fromarray(rgb_a),
        "grey.png": Image.fromarray(rgb_b).convert("L"),
        "rgba.png": Image.fromarray(np.dstack([rgb_c, np.full(rgb_c.shape[:2], 200, np.uint8)])),
        "wide.png": Image.fromarray(scene((40, 120), 4)),
    }
    paths = {}
    for name, image in images.items():
        paths[name] = str(folder / name)
        image.save(paths[name], quality=95)  # PNG ignores the JPEG quality
    return paths
