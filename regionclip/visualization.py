"""Draw detections on images, with the original tool's filters for readable pictures.

Labels do not hide each other where the image has room: each takes the first free spot among
above / inside / below its box, and stays inside the image.
"""
import colorsys
from typing import Dict, List, Sequence, Tuple

import cv2
import numpy as np

from .data.mapper import composite_over

Rect = Tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, exclusive ends
DRAWING_BACKGROUND = (255, 255, 255)  # white: what transparent pixels are drawn over
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_PAD = 2  # pixels between a label's text and its edge
_LIGHT_LUMA = 150  # label colours brighter than this get black text


def select_predictions(
    predictions: Sequence[Dict],
    conf_threshold: float = 0.5,
    unique_boxes: bool = False,
    max_boxes: int = 30,
    small_region_px: float = 0.0,
) -> List[Dict]:
    """The predictions of one image worth drawing (COCO results dicts, xywh boxes).

    Keeps scores above ``conf_threshold``. With ``unique_boxes`` (for unregressed proposals,
    where one box is reported once per class) only the best class of each exact box is kept,
    among the ``max_boxes`` best predictions, dropping boxes smaller than ``small_region_px``
    square pixels, as the original's ``--show-unique-boxes`` did.
    """
    ranked = sorted((p for p in predictions if p["score"] > conf_threshold),
                    key=lambda p: -p["score"])
    if not unique_boxes:
        return ranked
    seen, kept = set(), []
    for pred in ranked[:max_boxes]:
        w, h = pred["bbox"][2:]
        key = tuple(pred["bbox"])
        if w * h < small_region_px or key in seen:
            continue
        seen.add(key)
        kept.append(pred)
    return kept


def _color(index: int) -> tuple:
    """A distinct, stable BGR colour per class."""
    r, g, b = colorsys.hsv_to_rgb((index * 0.618033988749895) % 1.0, 0.75, 0.95)
    return int(b * 255), int(g * 255), int(r * 255)


def _text_color(bgr: Tuple[int, int, int]) -> Tuple[int, int, int]:
    """Black on light label colours, white on dark ones (ITU-R BT.601 luma)."""
    blue, green, red = bgr
    return (0, 0, 0) if 0.299 * red + 0.587 * green + 0.114 * blue > _LIGHT_LUMA else \
        (255, 255, 255)


def _overlap(a: Rect, b: Rect) -> int:
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


def _candidates(box: Rect, size: Tuple[int, int], image_size: Tuple[int, int]) -> List[Rect]:
    """Label rectangles for ``box`` in order of preference, all inside the image: above the
    box, inside its top, below it, inside its bottom; left-aligned, then right-aligned."""
    (w, h), (height, width) = size, image_size
    x0, y0, x1, y1 = box
    rects = []
    for left in (x0, x1 - w):
        left = min(max(left, 0), width - w)
        for top in (y0 - h, y0, y1, y1 - h):
            top = min(max(top, 0), height - h)
            rects.append((left, top, left + w, top + h))
    return rects


def place_labels(boxes: Sequence[Rect], sizes: Sequence[Tuple[int, int]],
                 image_size: Tuple[int, int]) -> List[Rect]:
    """One label rectangle (x0, y0, x1, y1), inside the ``(height, width)`` image, per box.

    Boxes are served in order (the best-scoring first): each takes its first candidate
    position that overlaps no label placed before it, or the least overlapping one.
    Sizes are (width, height) and must fit in the image.
    """
    placed: List[Rect] = []
    for box, size in zip(boxes, sizes):
        options = _candidates(box, size, image_size)
        placed.append(min(options, key=lambda r: sum(_overlap(r, p) for p in placed)))
    return placed


def _label_size(text: str, scale: float, image_size: Tuple[int, int]):
    """(font scale, (w, h) of the label with its padding, baseline); a label larger than the
    image is drawn smaller."""
    (tw, th), base = cv2.getTextSize(text, _FONT, scale, 1)
    w, h = tw + 2 * _PAD, th + base + 2 * _PAD
    shrink = min(1.0, image_size[1] / w, image_size[0] / h)
    if shrink < 1.0:
        scale *= shrink
        (tw, th), base = cv2.getTextSize(text, _FONT, scale, 1)
        w, h = tw + 2 * _PAD, th + base + 2 * _PAD
    return scale, (min(w, image_size[1]), min(h, image_size[0])), base


def score_texts(scores: Sequence[float]) -> List[str]:
    """Scores as labels: percentages when all are probabilities; two decimals for all of them
    when one exceeds 1 (RPN-fused scores, sqrt(p x objectness logit), are not probabilities)."""
    if any(score > 1.0 for score in scores):
        return [f"{score:.2f}" for score in scores]
    return [f"{score:.0%}" for score in scores]


def draw_predictions(image_bgr: np.ndarray, predictions: Sequence[Dict],
                     class_names: Sequence[str], category_to_index: Dict[int, int]) -> np.ndarray:
    """A copy of the image with each prediction's box, class name and score drawn.

    ``image_bgr`` is [H, W, 3] BGR, or [H, W, 4] BGRA (composited onto white first, so
    transparent areas do not show whatever colour they store). Labels are drawn after all
    boxes, in prediction order, where they overlap no earlier label if possible (see
    :func:`place_labels`), inside the image, in black or white to contrast with their colour.
    """
    is_bgra = image_bgr.ndim == 3 and image_bgr.shape[2] == 4
    canvas = composite_over(image_bgr, DRAWING_BACKGROUND) if is_bgra else image_bgr.copy()
    height, width = canvas.shape[:2]
    thickness = max(1, round(max(height, width) / 500))
    boxes, texts, colors, fonts = [], [], [], []
    scores = score_texts([pred["score"] for pred in predictions])
    for pred, score in zip(predictions, scores):
        index = category_to_index[pred["category_id"]]
        x, y, w, h = (int(round(v)) for v in pred["bbox"])
        boxes.append((x, y, x + w, y + h))
        colors.append(_color(index))
        cv2.rectangle(canvas, (x, y), (x + w, y + h), colors[-1], thickness)
        texts.append(f"{class_names[index]} {score}")
        fonts.append(_label_size(texts[-1], 0.4 * thickness, (height, width)))
    rects = place_labels(boxes, [size for _, size, _ in fonts], (height, width))
    for text, color, (scale, _, base), (x0, y0, x1, y1) in zip(texts, colors, fonts, rects):
        cv2.rectangle(canvas, (x0, y0), (x1 - 1, y1 - 1), color, -1)
        cv2.putText(canvas, text, (x0 + _PAD, y1 - _PAD - base), _FONT, scale,
                    _text_color(color), 1, cv2.LINE_AA)
    return canvas
