"""Draw detections on images, with the original tool's filters for readable pictures."""
import colorsys
from typing import Dict, List, Sequence

import cv2
import numpy as np


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


def draw_predictions(image_bgr: np.ndarray, predictions: Sequence[Dict],
                     class_names: Sequence[str], category_to_index: Dict[int, int]) -> np.ndarray:
    """A copy of the image with each prediction's box, class name and score drawn."""
    canvas = image_bgr.copy()
    thickness = max(1, round(max(canvas.shape[:2]) / 500))
    for pred in predictions:
        index = category_to_index[pred["category_id"]]
        x, y, w, h = (int(round(v)) for v in pred["bbox"])
        color = _color(index)
        cv2.rectangle(canvas, (x, y), (x + w, y + h), color, thickness)
        label = f"{class_names[index]} {pred['score']:.0%}"
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thickness, 1)
        top = max(y - th - base, 0)
        cv2.rectangle(canvas, (x, top), (x + tw, top + th + base), color, -1)
        cv2.putText(canvas, label, (x, top + th), cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thickness,
                    (0, 0, 0), 1, cv2.LINE_AA)
    return canvas
