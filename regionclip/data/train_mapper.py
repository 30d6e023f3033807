"""Training mapper: record dict -> model input with augmented image, boxes and masks.

The model input is ``{"image": float32 [3, H, W] in 0-255 and the configured channel order,
"instances": Instances(gt_boxes, gt_classes[, gt_masks]), "height", "width" (original size),
"image_id", "file_name"}``. ``gt_masks`` is a bool tensor [N, H, W] at the augmented image's
size. Crowd annotations are dropped and so are boxes left empty by the augmentation.
"""
import numpy as np
import pycocotools.mask as mask_util
import torch

from regionclip.data.image_io import read_image
from regionclip.data.mapper import check_image_size
from regionclip.data.transforms import (
    RandomHorizontalFlip,
    ResizeShortestEdge,
    apply_augmentations,
    transform_boxes_xyxy,
)
from regionclip.structures import Boxes, BoxMode, Instances

FLIP_MODES = ("horizontal", "none")
# detectron2's filter_empty_instances threshold on box sides (pixels)
EMPTY_BOX_THRESHOLD = 1e-5


class TrainingMapper:
    """Decode, resize the shortest edge to a random choice, flip, and build ground truth.

    Args:
        min_sizes: short-side choices (``INPUT.MIN_SIZE_TRAIN``).
        max_size: cap on the long side (``INPUT.MAX_SIZE_TRAIN``).
        sample_style: "choice" or "range" (``INPUT.MIN_SIZE_TRAIN_SAMPLING``).
        flip: "horizontal" (probability 0.5) or "none" (``INPUT.RANDOM_FLIP``).
        image_format: "RGB" or "BGR" (``INPUT.FORMAT``).
        use_masks: add ``gt_masks`` (``MODEL.MASK_ON``).
    """

    def __init__(self, min_sizes=(800,), max_size=1333, sample_style="choice",
                 flip="horizontal", image_format="RGB", use_masks=False):
        if flip not in FLIP_MODES:
            raise ValueError(f"INPUT.RANDOM_FLIP must be one of {FLIP_MODES}, got {flip!r}")
        self.augmentations = [ResizeShortestEdge(min_sizes, max_size, sample_style)]
        if flip == "horizontal":
            self.augmentations.append(RandomHorizontalFlip())
        self.image_format = image_format
        self.use_masks = use_masks

    def __call__(self, record, rng=None):
        """Map one record; ``rng`` (a numpy Generator) draws the augmentation."""
        image = read_image(record["file_name"], self.image_format)
        check_image_size(record, image)
        original_size = image.shape[:2]
        image, transforms = apply_augmentations(self.augmentations, image, rng)
        chw = np.ascontiguousarray(image.transpose(2, 0, 1))
        instances = training_instances(record.get("annotations", []), transforms,
                                       original_size, image.shape[:2], self.use_masks)
        return {
            "image": torch.as_tensor(chw, dtype=torch.float32),
            "instances": instances,
            "height": record.get("height", original_size[0]),
            "width": record.get("width", original_size[1]),
            "image_id": record.get("image_id"),
            "file_name": record["file_name"],
        }


def training_instances(annotations, transforms, original_size, image_size, use_masks=False):
    """``Instances`` of the non-crowd annotations after ``transforms``, empty boxes removed."""
    kept = [ann for ann in annotations if not ann.get("iscrowd", 0)]
    xyxy = np.array(
        [BoxMode.convert(list(ann["bbox"]), ann["bbox_mode"], BoxMode.XYXY_ABS) for ann in kept],
        dtype=np.float64,
    ).reshape(-1, 4)
    boxes = Boxes(torch.as_tensor(transform_boxes_xyxy(transforms, xyxy, image_size),
                                  dtype=torch.float32))
    instances = Instances(image_size, gt_boxes=boxes,
                          gt_classes=torch.tensor([a["category_id"] for a in kept],
                                                  dtype=torch.int64))
    if use_masks:
        masks = [_mask(ann, box, transforms, original_size, image_size)
                 for ann, box in zip(kept, xyxy)]
        instances.gt_masks = torch.as_tensor(np.stack(masks) if masks else
                                             np.zeros((0, *image_size), dtype=bool))
    return instances[boxes.nonempty(threshold=EMPTY_BOX_THRESHOLD)]


def _mask(ann, box_xyxy, transforms, original_size, image_size):
    """bool [H, W] at ``image_size``: polygons are transformed and then rasterised (exact at
    the new size); RLE masks are decoded and resized; a missing mask becomes the box."""
    segmentation = ann.get("segmentation")
    if isinstance(segmentation, dict):
        rle = segmentation
        if isinstance(rle["counts"], list):
            rle = mask_util.frPyObjects(rle, *original_size)
        mask = mask_util.decode(rle).astype(np.uint8)
        return transforms.apply_segmentation(mask).astype(bool)
    if not segmentation:
        x0, y0, x1, y1 = box_xyxy
        segmentation = [[x0, y0, x1, y0, x1, y1, x0, y1]]
    polygons = [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in segmentation]
    polygons = [p.reshape(-1).tolist() for p in transforms.apply_polygons(polygons)]
    return polygons_to_mask(polygons, *image_size)


def polygons_to_mask(polygons, height, width):
    """Union of flat ``[x0, y0, x1, y1, ...]`` polygons rasterised as bool [height, width]."""
    rles = mask_util.frPyObjects(polygons, height, width)
    return mask_util.decode(mask_util.merge(rles)).astype(bool)


def build_training_mapper(cfg):
    """``TrainingMapper`` from ``INPUT.*`` and ``MODEL.MASK_ON``."""
    return TrainingMapper(
        min_sizes=tuple(cfg.INPUT.MIN_SIZE_TRAIN),
        max_size=cfg.INPUT.MAX_SIZE_TRAIN,
        sample_style=cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING,
        flip=cfg.INPUT.RANDOM_FLIP,
        image_format=cfg.INPUT.FORMAT,
        use_masks=cfg.MODEL.MASK_ON,
    )
