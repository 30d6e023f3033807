"""Test-time mapper: record dict -> model input dict.

The model input is ``{"image": float32 [3, H, W] in 0-255 and the configured channel order,
"height", "width" (original size, for rescaling predictions), "image_id", "file_name"}`` plus
``"instances"`` (resized non-crowd ground-truth boxes and classes) when ground-truth boxes are
the proposals (``MODEL.CLIP.CROP_REGION_TYPE GT``) or an evaluation needs them.
"""

import numpy as np
import torch

from regionclip.data.image_io import read_image
from regionclip.data.transforms import ResizeShortestEdge, transform_boxes_xyxy
from regionclip.structures import Boxes, BoxMode, Instances


class ImageSizeMismatchError(ValueError):
    """The decoded image does not have the size its record (json) states."""


class InferenceMapper:
    """Decode, resize the shortest edge, and (optionally) carry ground-truth boxes.

    Args:
        min_size: target short side (``INPUT.MIN_SIZE_TEST``); 0 keeps the original size.
        max_size: cap on the long side (``INPUT.MAX_SIZE_TEST``).
        image_format: "RGB" or "BGR" (``INPUT.FORMAT``).
        keep_annotations: attach ``instances`` built from the record's non-crowd annotations.
    """

    def __init__(self, min_size=800, max_size=1333, image_format="RGB", keep_annotations=False):
        self.resize = ResizeShortestEdge(min_size, max_size)
        self.image_format = image_format
        self.keep_annotations = keep_annotations

    def __call__(self, record):
        image = read_image(record["file_name"], self.image_format)
        check_image_size(record, image)
        result, transform = self.map_image(image)
        result.update(height=record.get("height", result["height"]),
                      width=record.get("width", result["width"]),
                      image_id=record.get("image_id"), file_name=record["file_name"])
        if self.keep_annotations and "annotations" in record:
            result["instances"] = annotations_to_instances(
                record["annotations"], transform, tuple(result["image"].shape[-2:])
            )
        return result

    def map_image(self, image):
        """A decoded uint8 [H, W, 3] image (in ``image_format``) -> (model input with
        ``image``, ``height``, ``width``; the resize transform)."""
        height, width = image.shape[:2]
        transform = self.resize.get_transform(height, width)
        chw = np.ascontiguousarray(transform.apply_image(image).transpose(2, 0, 1))
        return {"image": torch.as_tensor(chw, dtype=torch.float32), "height": height,
                "width": width}, transform


def check_image_size(record, image):
    expected = (record.get("height"), record.get("width"))
    if None in expected or expected == image.shape[:2]:
        return
    raise ImageSizeMismatchError(
        f"{record['file_name']}: decoded size (h, w) = {image.shape[:2]} but the annotations "
        f"say {expected}"
    )


def annotations_to_instances(annotations, transform, image_size):
    """``Instances`` with ``gt_boxes`` (transformed, clipped) and ``gt_classes`` (int64).

    Crowd regions are skipped: they are not objects to classify.
    """
    kept = [ann for ann in annotations if not ann.get("iscrowd", 0)]
    boxes = np.array(
        [BoxMode.convert(list(ann["bbox"]), ann["bbox_mode"], BoxMode.XYXY_ABS) for ann in kept],
        dtype=np.float64,
    ).reshape(-1, 4)
    boxes = transform_boxes_xyxy(transform, boxes, image_size)
    classes = torch.tensor([ann["category_id"] for ann in kept], dtype=torch.int64)
    return Instances(image_size, gt_boxes=Boxes(boxes), gt_classes=classes)


def build_inference_mapper(cfg, keep_annotations=False):
    """``InferenceMapper`` from ``INPUT.{MIN,MAX}_SIZE_TEST``, ``INPUT.FORMAT`` and
    ``MODEL.CLIP.CROP_REGION_TYPE`` (ground-truth boxes are kept for "GT", or when
    ``keep_annotations``: an evaluation that needs them, such as proposal recall)."""
    return InferenceMapper(
        min_size=cfg.INPUT.MIN_SIZE_TEST,
        max_size=cfg.INPUT.MAX_SIZE_TEST,
        image_format=cfg.INPUT.FORMAT,
        keep_annotations=keep_annotations or cfg.MODEL.CLIP.CROP_REGION_TYPE == "GT",
    )
