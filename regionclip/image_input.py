"""What the Python API accepts as an image or as boxes, turned into arrays it can use."""
import os
from typing import Tuple, Union

import numpy as np
from PIL import Image

from .data.image_io import read_image
from .data.transforms import transform_boxes_xyxy

ImageInput = Union[str, os.PathLike, np.ndarray, Image.Image]
_ACCEPTED = "a file path, an HxWx3 uint8 RGB numpy array or a PIL image"


def is_single_image(images) -> bool:
    """False for a list or tuple of images, True otherwise."""
    return not isinstance(images, (list, tuple))


def to_rgb_array(image: ImageInput) -> np.ndarray:
    """uint8 [H, W, 3] RGB. Files are decoded upright (EXIF applied); greyscale arrays
    ([H, W] or [H, W, 1]) are repeated to 3 channels and RGBA arrays lose their alpha."""
    if isinstance(image, (str, os.PathLike)):
        return read_image(image, "RGB")
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    if not isinstance(image, np.ndarray):
        raise TypeError(f"unsupported image type {type(image).__name__}: give {_ACCEPTED}")
    if image.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8 (0-255), got {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4) or min(image.shape[:2]) == 0:
        raise ValueError(f"image arrays must be [H, W, 3] RGB (or [H, W] grey, [H, W, 4] "
                         f"RGBA), got shape {list(image.shape)}")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])


def as_box_array(boxes) -> np.ndarray:
    """[N, 4] float64 xyxy boxes with x1 > x0 and y1 > y0; ValueError naming a bad box."""
    array = np.asarray(boxes, dtype=np.float64)
    if array.size == 0:
        return array.reshape(0, 4)
    if array.ndim == 1 and array.shape[0] == 4:
        array = array[None]
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"boxes must be [N, 4] (x0, y0, x1, y1), got shape {list(array.shape)}")
    for index, box in enumerate(array):
        if not np.isfinite(box).all() or box[2] <= box[0] or box[3] <= box[1]:
            raise ValueError(f"box {index} {box.tolist()} is not a valid x0, y0, x1, y1 box "
                             "(needs x1 > x0 and y1 > y0)")
    return array


def map_boxes(boxes, transform, resized_size: Tuple[int, int],
              original_size: Tuple[int, int]) -> np.ndarray:
    """Boxes in original pixels -> [N, 4] in the resized input, clipped to the image;
    ValueError for a box that lies outside the image."""
    array = as_box_array(boxes)
    height, width = original_size
    clipped = array.copy()
    clipped[:, 0::2] = clipped[:, 0::2].clip(0, width)
    clipped[:, 1::2] = clipped[:, 1::2].clip(0, height)
    outside = (clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])
    if outside.any():
        index = int(outside.nonzero()[0][0])
        raise ValueError(f"box {index} {array[index].tolist()} lies outside the "
                         f"{width}x{height} image")
    return transform_boxes_xyxy(transform, clipped, resized_size)
