"""Image decoding: any common file -> uint8 HxWx3 array in RGB or BGR, upright.

Upright means the EXIF orientation tag is applied, as detectron2's ``read_image`` does, so the
pixels match what a photo viewer shows and what the COCO/LVIS annotations refer to.
"""

import numpy as np
from PIL import Image, ImageOps

SUPPORTED_FORMATS = ("RGB", "BGR")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

# EXIF orientations 5..8 rotate by 90 degrees, which swaps width and height.
_EXIF_ORIENTATION_TAG = 0x0112
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
# PIL modes holding integers wider than 8 bits (16-bit PNG/TIFF greyscale).
_WIDE_INT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
_UINT16_TO_UINT8 = 255.0 / 65535.0
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


class ImageReadError(OSError):
    """An image file is missing, unreadable or corrupt; the message names the file."""


def read_image(path, format="RGB", background=None):
    """Decode ``path`` into an upright uint8 array of shape [H, W, 3] in ``format``.

    Greyscale, palette, CMYK and RGBA files become RGB; alpha is dropped, as in detectron2, or,
    given a ``background`` RGB colour, transparent pixels are composited onto it (for
    drawings). 16-bit greyscale is scaled to 8 bits over its full range rather than clipped.
    """
    if format not in SUPPORTED_FORMATS:
        raise ValueError(f"image format must be one of {SUPPORTED_FORMATS}, got {format!r}")
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            array = _to_rgb_array(image, background)
    except (OSError, ValueError, SyntaxError) as error:
        raise ImageReadError(f"cannot read image {path}: {error}") from error
    if format == "BGR":
        array = array[:, :, ::-1]
    return np.ascontiguousarray(array)


def _to_rgb_array(image, background=None):
    """PIL image of any mode -> uint8 [H, W, 3] RGB."""
    if background is not None and (image.mode in _ALPHA_MODES or "transparency" in image.info):
        return composite_over(np.asarray(image.convert("RGBA")), background)
    if image.mode in _WIDE_INT_MODES:
        wide = np.asarray(image, dtype=np.float64)
        grey = np.clip(np.rint(wide * _UINT16_TO_UINT8), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


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
    if orientation in _TRANSPOSING_ORIENTATIONS:
        return width, height
    return height, width
