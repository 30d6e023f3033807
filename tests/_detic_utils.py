"""Detic checkpoints with the released names and shapes, and tiny Detic data, for the tests.

``detic_shapes`` writes the state dict of an OV-COCO CustomRCNN from the reference's key table
(``shared/design/detic_reference.md`` section 2), independently of our modules: 279 tensors,
plus 149 for the CLIP ViT-B/32 text tower of the caption models. With ``tiny=True`` the same
names get the narrow widths of ``configs/tests/tiny_detic.yaml`` (fast end-to-end runs).
"""
import json
import os
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
from _checkpoint_utils import Shapes, prefixed, text_shapes
from _data_utils import make_coco_dataset
from _e2e_utils import sane_state_dict

from regionclip.config.variants import get_variant

REPO = Path(__file__).resolve().parents[1]
DETIC_CONFIGS = REPO / "configs" / "Detic"
TINY_DETIC = REPO / "configs" / "tests" / "tiny_detic.yaml"
OVCOCO_CONFIGS = ("BoxSup_OVCOCO_CLIP_R50_1x", "Detic_OVCOCO_CLIP_R50_1x_max-size",
                  "Detic_OVCOCO_CLIP_R50_1x_caption", "Detic_OVCOCO_CLIP_R50_1x_max-size_caption")
CAPTION_CONFIGS = OVCOCO_CONFIGS[2:]
R50_BLOCKS = (3, 4, 6, 3)
# (stem, res2 out, res2 bottleneck, embedding dim, text tower) of the released and tiny models
WIDTHS = {False: (64, 256, 64, 512, "RN101"), True: (8, 16, 4, 32, "tiny")}
# ViT-B/32's text tower has RN101's text shapes (width 512, 12 layers, 512-d output)
TINY_OVERRIDES = (
    "MODEL.DEVICE", "cpu", "MODEL.CAPTION_TEXT_TOWER", "tiny",
    "MODEL.RESNETS.STEM_OUT_CHANNELS", "8", "MODEL.RESNETS.RES2_OUT_CHANNELS", "16",
    "MODEL.RESNETS.WIDTH_PER_GROUP", "4", "MODEL.ANCHOR_GENERATOR.SIZES", "[[16, 32, 64]]",
    "MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_DIM", "32", "MODEL.RPN.POST_NMS_TOPK_TEST", "30",
    "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "128", "FP16", "False",
    "DATALOADER.NUM_WORKERS", "0", "SOLVER.REFERENCE_WORLD_SIZE", "0",
)


def _norm(shapes: Shapes, name: str, channels: int) -> None:
    shapes.update({f"{name}.{k}": (channels,)
                   for k in ("weight", "bias", "running_mean", "running_var")})


def _conv(shapes: Shapes, name: str, out: int, inp: int, k: int) -> None:
    shapes[f"{name}.weight"] = (out, inp, k, k)
    _norm(shapes, f"{name}.norm", out)


def _resnet(stem: int, res2: int, mid: int) -> Shapes:
    """detectron2 MSRA R50 stem + res2..res5 (FrozenBN: 4 buffers per norm)."""
    shapes: Shapes = {}
    _conv(shapes, "stem.conv1", stem, 3, 7)
    inp, out = stem, res2
    for stage, blocks in enumerate(R50_BLOCKS, start=2):
        for b in range(blocks):
            p = f"res{stage}.{b}"
            if b == 0:
                _conv(shapes, f"{p}.shortcut", out, inp, 1)
            _conv(shapes, f"{p}.conv1", mid, inp if b == 0 else out, 1)
            _conv(shapes, f"{p}.conv2", mid, mid, 3)
            _conv(shapes, f"{p}.conv3", out, mid, 1)
        inp, out, mid = out, out * 2, mid * 2
    return shapes


def detic_shapes(num_classes: int = 80, text: bool = False, tiny: bool = False,
                 anchors: int = 15) -> Shapes:
    """{key: shape} of a Detic OV-COCO checkpoint (BoxSup: 279 tensors; caption: + 149)."""
    stem, res2, mid, dim, tower = WIDTHS[tiny]
    resnet = _resnet(stem, res2, mid)
    shapes = {f"backbone.{k}": s for k, s in resnet.items() if not k.startswith("res5.")}
    shapes.update({f"roi_heads.{k}": s for k, s in resnet.items() if k.startswith("res5.")})
    c4, c5 = res2 * 4, res2 * 8
    head = "proposal_generator.rpn_head."
    shapes.update({head + "conv.weight": (c4, c4, 3, 3), head + "conv.bias": (c4,),
                   head + "objectness_logits.weight": (anchors, c4, 1, 1),
                   head + "objectness_logits.bias": (anchors,),
                   head + "anchor_deltas.weight": (4 * anchors, c4, 1, 1),
                   head + "anchor_deltas.bias": (4 * anchors,)})
    p = "roi_heads.box_predictor."
    shapes.update({p + "cls_score.linear.weight": (dim, c5), p + "cls_score.linear.bias": (dim,),
                   p + "cls_score.zs_weight": (dim, num_classes + 1),
                   p + "bbox_pred.0.weight": (c5, c5), p + "bbox_pred.0.bias": (c5,),
                   p + "bbox_pred.2.weight": (4, c5), p + "bbox_pred.2.bias": (4,),
                   p + "freq_weight": (num_classes,)})
    if text:
        shapes.update(prefixed("text_encoder.", text_shapes(get_variant(tower))))
    return shapes


def detic_state_dict(shapes: Shapes, seed: int = 0) -> Dict[str, torch.Tensor]:
    """`sane_state_dict` values for a Detic model: the stem is scaled for 0-255 pixels and the
    box deltas start at zero, so that proposals and detections are real boxes."""
    state = sane_state_dict(shapes, seed)
    state["backbone.stem.conv1.weight"] = state["backbone.stem.conv1.weight"] / 64.0
    for key in state:
        if ".anchor_deltas." in key or key.startswith("roi_heads.box_predictor.bbox_pred.2."):
            state[key] = state[key] * 0.0
    return state


def save_npy_embeddings(path, num_classes: int, dim: int = 512, seed: int = 0) -> str:
    """A Detic class-embedding file: float16 [C, D], rows unnormalised (norms about 10)."""
    os.makedirs(os.path.dirname(os.fspath(path)), exist_ok=True)
    rng = np.random.default_rng(seed)
    np.save(path, (rng.normal(size=(num_classes, dim)) * 0.45).astype(np.float16))
    return os.fspath(path)


def write_json(path, content) -> str:
    os.makedirs(os.path.dirname(os.fspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(content, f)
    return os.fspath(path)


def image_label_json(path, coco_json: str, captions_per_image: int = 2) -> str:
    """A Detic image-label json over the images of ``coco_json``: each image labelled with the
    classes of its boxes (category ids) and captions naming them; no boxes."""
    with open(coco_json) as f:
        coco = json.load(f)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    labels: Dict[int, List[int]] = {}
    for ann in coco["annotations"]:
        labels.setdefault(ann["image_id"], [])
        if ann["category_id"] not in labels[ann["image_id"]]:
            labels[ann["image_id"]].append(ann["category_id"])
    images = []
    for image in coco["images"]:
        ids = labels.get(image["id"], [])
        text = " and ".join(f"a {names[i]}" for i in ids) or "nothing"
        captions = [f"{text} in a picture", f"a photo of {text}"][:captions_per_image]
        images.append({**image, "pos_category_ids": ids, "captions": captions})
    content = {"images": images, "categories": coco["categories"], "annotations": []}
    return write_json(path, content)


def tiny_detic_data(root) -> Tuple[str, str, str]:
    """(detection json, image-label json, image folder) of three-class rectangle images."""
    json_file, image_dir = make_coco_dataset(root, num_images=6, image_size=(64, 96),
                                             boxes_per_image=2)
    return json_file, image_label_json(Path(root) / "labels.json", json_file), image_dir


def recorded_training(argv, record_file):
    """train_net ``argv`` in this process, writing the ``ann_type`` of each of its training
    batches to ``record_file`` + rank (for the multi-process test)."""
    import torch as _torch

    from regionclip.distributed import get_rank
    from regionclip.engine.defaults import default_argument_parser, main
    from regionclip.modeling.detic.meta_arch import CustomRCNN

    _torch.set_num_threads(1)
    seen, losses = [], CustomRCNN.losses

    def recording(model, batch):
        seen.append(batch[0].get("ann_type", "box"))
        return losses(model, batch)

    CustomRCNN.losses = recording
    try:
        main(default_argument_parser().parse_args([str(a) for a in argv]))
    finally:
        CustomRCNN.losses = losses
    write_json(f"{record_file}.{get_rank()}", seen)
