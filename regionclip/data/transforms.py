"""Geometric augmentations built on fvcore ``Transform`` objects.

An augmentation looks at an image size and returns a deterministic fvcore ``Transform``; the
same transform is then applied to the image and to its boxes, so both always agree.
"""

import numpy as np
from fvcore.transforms.transform import HFlipTransform, NoOpTransform, ScaleTransform, TransformList
from PIL import Image

_PIL_INTERPOLATION = {"bilinear": Image.BILINEAR, "nearest": Image.NEAREST}
SAMPLE_STYLES = ("choice", "range")


class ResizeTransform(ScaleTransform):
    """fvcore ``ScaleTransform`` that resizes uint8 images with PIL, as detectron2 does.

    fvcore resizes with ``torch.nn.functional.interpolate``, which does not antialias when
    shrinking; the published numbers were produced with PIL's bilinear filter, so uint8 images
    go through PIL. Float images and all coordinates keep fvcore's behaviour.
    """

    def apply_image(self, img, interp=None):
        method = interp if interp is not None else self.interp
        if img.dtype != np.uint8 or method not in _PIL_INTERPOLATION:
            return super().apply_image(img, interp)
        assert img.shape[:2] == (self.h, self.w), "image size differs from the transform's"
        squeeze = img.ndim == 3 and img.shape[2] == 1
        pil_image = Image.fromarray(img[:, :, 0] if squeeze else img)
        resized = np.asarray(pil_image.resize((self.new_w, self.new_h), _PIL_INTERPOLATION[method]))
        return resized[:, :, None] if squeeze else resized


def shortest_edge_size(height, width, short_edge, max_size):
    """Output (h, w) of detectron2's ResizeShortestEdge for one short-edge length.

    The short side becomes ``short_edge`` unless the long side would then exceed ``max_size``,
    in which case the long side becomes ``max_size``; sides are rounded half up.
    """
    scale = short_edge / min(height, width)
    # The short side is set to the exact length (not side * scale) so that float error
    # cannot move it across the rounding boundary; this mirrors detectron2 bit for bit.
    if height < width:
        new_h, new_w = float(short_edge), width * scale
    else:
        new_h, new_w = height * scale, float(short_edge)
    longest = max(new_h, new_w)
    if max_size > 0 and longest > max_size:
        new_h, new_w = new_h * max_size / longest, new_w * max_size / longest
    return int(new_h + 0.5), int(new_w + 0.5)


class ResizeShortestEdge:
    """Resize so the short side is one of ``short_edge_lengths`` (capped by ``max_size``).

    ``sample_style`` "choice" picks one of the lengths, "range" samples an integer in
    ``[lengths[0], lengths[1]]``; a single length is deterministic (the test-time case).
    A sampled length of 0 means "keep the size".
    """

    def __init__(self, short_edge_lengths, max_size=0, sample_style="choice", interp="bilinear"):
        if isinstance(short_edge_lengths, int):
            short_edge_lengths = (short_edge_lengths,)
        if sample_style not in SAMPLE_STYLES:
            raise ValueError(f"sample_style must be one of {SAMPLE_STYLES}, got {sample_style!r}")
        if sample_style == "range" and len(short_edge_lengths) != 2:
            raise ValueError(f"'range' needs two lengths, got {short_edge_lengths}")
        self.short_edge_lengths = tuple(int(x) for x in short_edge_lengths)
        self.max_size = int(max_size)
        self.sample_style = sample_style
        self.interp = interp

    def _sample_length(self, rng):
        if len(self.short_edge_lengths) == 1:
            return self.short_edge_lengths[0]
        if self.sample_style == "range":
            low, high = self.short_edge_lengths
            return int(rng.integers(low, high + 1))
        return int(rng.choice(self.short_edge_lengths))

    def get_transform(self, height, width, rng=None):
        length = self._sample_length(rng if rng is not None else np.random.default_rng())
        if length == 0:
            return NoOpTransform()
        new_h, new_w = shortest_edge_size(height, width, length, self.max_size)
        return ResizeTransform(height, width, new_h, new_w, self.interp)


class RandomHorizontalFlip:
    """Flip left-right with probability ``prob`` (used by training mappers)."""

    def __init__(self, prob=0.5):
        self.prob = prob

    def get_transform(self, height, width, rng=None):
        rng = rng if rng is not None else np.random.default_rng()
        if rng.random() < self.prob:
            return HFlipTransform(width)
        return NoOpTransform()


def apply_augmentations(augmentations, image, rng=None):
    """Apply augmentations in order to ``image`` [H, W, C]; returns the new image and the
    ``TransformList`` to replay on boxes or masks."""
    transforms = []
    for augmentation in augmentations:
        transform = augmentation.get_transform(image.shape[0], image.shape[1], rng)
        image = transform.apply_image(image)
        transforms.append(transform)
    return image, TransformList(transforms)


def transform_boxes_xyxy(transform, boxes, image_size):
    """Apply ``transform`` to float boxes [N, 4] (XYXY_ABS) and clip them to ``(h, w)``."""
    boxes = transform.apply_box(np.asarray(boxes, dtype=np.float64).reshape(-1, 4))
    height, width = image_size
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    return boxes
