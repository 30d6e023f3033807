"""Record dict -> model input, at test and at training time, and image decoding.

The model input is ``{"image": float32 [3, H, W] in 0-255 and the configured channel order,
"height", "width" (original size, for rescaling predictions), "image_id", "file_name"}`` plus
``"instances"``. At test time these are the resized non-crowd ground-truth boxes and classes,
when they are the proposals (``MODEL.CLIP.CROP_REGION_TYPE GT``) or an evaluation needs them. In
training they are the augmented ``gt_boxes``, ``gt_classes`` and (``MODEL.MASK_ON``) bool
``gt_masks`` [N, H, W]; crowd annotations and boxes left empty by the augmentation are dropped.
"""
import numpy as np
import pycocotools.mask as mask_util
import torch
from PIL import Image, ImageOps

from regionclip.data.transforms import (
    RandomHorizontalFlip,
    ResizeShortestEdge,
    apply_augmentations,
    transform_boxes_xyxy,
)
from regionclip.structures import Boxes, BoxMode, Instances

SUPPORTED_FORMATS = ("RGB", "BGR")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# EXIF orientations 5..8 rotate by 90 degrees, which swaps width and height.
_EXIF_ORIENTATION_TAG = 0x0112
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
# PIL modes holding integers wider than 8 bits (16-bit PNG/TIFF greyscale).
_WIDE_INT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
_UINT16_TO_UINT8 = 255.0 / 65535.0
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
FLIP_MODES = ("horizontal", "none")
# detectron2's filter_empty_instances threshold on box sides (pixels)
EMPTY_BOX_THRESHOLD = 1e-5


class ImageReadError(OSError):
    """An image file is missing, unreadable or corrupt; the message names the file."""


class ImageSizeMismatchError(ValueError):
    """The decoded image does not have the size its record (json) states."""


def read_image(path, format="RGB", background=None):
    """Decode ``path`` into an upright uint8 array of shape [H, W, 3] in ``format``.

    Upright: the EXIF orientation is applied, as detectron2 does, so pixels match what the
    COCO/LVIS annotations refer to. Greyscale, palette, CMYK and RGBA files become RGB; alpha is
    dropped, as in detectron2, or, given a ``background`` RGB colour, transparent pixels are
    composited onto it (for drawings). 16-bit greyscale is scaled to 8 bits over its full range.
    """
    if format not in SUPPORTED_FORMATS:
        raise ValueError(f"image format must be one of {SUPPORTED_FORMATS}, got {format!r}")
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            if background is not None and (image.mode in _ALPHA_MODES
                                           or "transparency" in image.info):
                array = composite_over(np.asarray(image.convert("RGBA")), background)
            elif image.mode in _WIDE_INT_MODES:
                wide = np.asarray(image, dtype=np.float64)
                grey = np.clip(np.rint(wide * _UINT16_TO_UINT8), 0, 255).astype(np.uint8)
                array = np.repeat(grey[:, :, None], 3, axis=2)
            else:
                rgb = image if image.mode == "RGB" else image.convert("RGB")
                array = np.asarray(rgb, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as error:
        raise ImageReadError(f"cannot read image {path}: {error}") from error
    return np.ascontiguousarray(array[:, :, ::-1] if format == "BGR" else array)


def composite_over(image, background):
    """uint8 [H, W, 4] with alpha last -> [H, W, 3] over a uniform ``background`` colour (in
    the image's channel order)."""
    alpha = image[:, :, 3:].astype(np.float32) / 255.0
    blended = image[:, :, :3] * alpha + np.asarray(background, np.float32) * (1.0 - alpha)
    return np.rint(blended).astype(np.uint8)


def read_image_size(path):
    """(height, width) of the upright image, from the file header only (no pixel decoding)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except (OSError, ValueError, SyntaxError) as error:
        raise ImageReadError(f"cannot read image {path}: {error}") from error
    return (width, height) if orientation in _TRANSPOSING_ORIENTATIONS else (height, width)


def _read_record_image(record, image_format):
    image = read_image(record["file_name"], image_format)
    expected = (record.get("height"), record.get("width"))
    if None not in expected and expected != image.shape[:2]:
        raise ImageSizeMismatchError(f"{record['file_name']}: decoded size (h, w) = "
                                     f"{image.shape[:2]} but the annotations say {expected}")
    return image


def _chw_float(image):
    """uint8 [H, W, 3] -> float32 [3, H, W] tensor."""
    return torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)), dtype=torch.float32)


def _record_fields(record, height, width):
    """The record's size (else the decoded ``height`` x ``width``), image_id and file_name."""
    return {"height": record.get("height", height), "width": record.get("width", width),
            "image_id": record.get("image_id"), "file_name": record["file_name"]}


def _gt_boxes_xyxy(annotations):
    """The non-crowd annotations and their boxes as float64 XYXY_ABS [N, 4]."""
    kept = [ann for ann in annotations if not ann.get("iscrowd", 0)]
    boxes = [BoxMode.convert(list(ann["bbox"]), ann["bbox_mode"], BoxMode.XYXY_ABS) for ann in kept]
    return kept, np.array(boxes, dtype=np.float64).reshape(-1, 4)


def _instances(kept, xyxy, transform, image_size):
    boxes = Boxes(transform_boxes_xyxy(transform, xyxy, image_size))
    classes = torch.tensor([ann["category_id"] for ann in kept], dtype=torch.int64)
    return Instances(image_size, gt_boxes=boxes, gt_classes=classes)


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
        result, transform = self.map_image(_read_record_image(record, self.image_format))
        result.update(_record_fields(record, result["height"], result["width"]))
        if self.keep_annotations and "annotations" in record:
            result["instances"] = _instances(*_gt_boxes_xyxy(record["annotations"]), transform,
                                             tuple(result["image"].shape[-2:]))
        return result

    def map_image(self, image):
        """A decoded uint8 [H, W, 3] image (in ``image_format``) -> (model input with
        ``image``, ``height``, ``width``; the resize transform)."""
        height, width = image.shape[:2]
        transform = self.resize.get_transform(height, width)
        return {"image": _chw_float(transform.apply_image(image)), "height": height,
                "width": width}, transform


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
        original = _read_record_image(record, self.image_format)
        image, transforms = apply_augmentations(self.augmentations, original, rng)
        instances = training_instances(record.get("annotations", []), transforms,
                                       original.shape[:2], image.shape[:2], self.use_masks)
        return {"image": _chw_float(image), "instances": instances,
                **_record_fields(record, *original.shape[:2])}


def training_instances(annotations, transforms, original_size, image_size, use_masks=False):
    """``Instances`` of the non-crowd annotations after ``transforms``, empty boxes removed."""
    kept, xyxy = _gt_boxes_xyxy(annotations)
    instances = _instances(kept, xyxy, transforms, image_size)
    if use_masks:
        masks = [_mask(ann, box, transforms, original_size, image_size)
                 for ann, box in zip(kept, xyxy)]
        instances.gt_masks = torch.as_tensor(np.stack(masks) if masks else
                                             np.zeros((0, *image_size), dtype=bool))
    return instances[instances.gt_boxes.nonempty(threshold=EMPTY_BOX_THRESHOLD)]


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
