"""Tiny synthetic datasets for tests: images with coloured rectangles plus COCO/LVIS json.

Every annotation box is exactly a filled rectangle drawn in its image, so the data is
self-consistent (a detector that finds the rectangles is perfect).
"""

import json
import os

import numpy as np
from PIL import Image

# Real COCO ids and names: 1 and 3 are OVD base classes, 18 (dog) is novel.
DEFAULT_COCO_CATEGORIES = (
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 3, "name": "car", "supercategory": "vehicle"},
    {"id": 18, "name": "dog", "supercategory": "animal"},
)
# LVIS-style categories with one of each frequency group (r = rare = novel).
DEFAULT_LVIS_CATEGORIES = (
    {"id": 1, "name": "apple", "synonyms": ["apple"], "frequency": "f"},
    {"id": 2, "name": "banjo", "synonyms": ["banjo"], "frequency": "r"},
    {"id": 3, "name": "candle", "synonyms": ["candle", "candlestick"], "frequency": "c"},
    {"id": 4, "name": "dog", "synonyms": ["dog"], "frequency": "f"},
)
BACKGROUND = (20, 20, 20)
_MIN_SIDE = 6


def random_boxes(rng, num_boxes, image_size):
    """Integer XYWH boxes [num_boxes, 4] inside an image of ``image_size`` (h, w)."""
    height, width = image_size
    boxes = []
    for _ in range(num_boxes):
        w = int(rng.integers(_MIN_SIDE, max(_MIN_SIDE + 1, width // 2)))
        h = int(rng.integers(_MIN_SIDE, max(_MIN_SIDE + 1, height // 2)))
        x = int(rng.integers(0, width - w + 1))
        y = int(rng.integers(0, height - h + 1))
        boxes.append([x, y, w, h])
    return boxes


def draw_boxes(image_size, boxes, colors):
    """uint8 RGB image [h, w, 3] with each XYWH box filled with its colour."""
    image = np.empty((*image_size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for (x, y, w, h), color in zip(boxes, colors):
        image[y:y + h, x:x + w] = color
    return image


def _category_color(index):
    return tuple(int(v) for v in ((index * 97 + 60) % 256, (index * 53 + 200) % 256, 230))


def _make_images(rng, num_images, categories, image_size, boxes_per_image):
    """Yield (index, image array, [(category_id, xywh box), ...]) per image."""
    for index in range(num_images):
        boxes = random_boxes(rng, boxes_per_image, image_size)
        cats = [categories[(index + k) % len(categories)] for k in range(boxes_per_image)]
        colors = [_category_color(categories.index(cat)) for cat in cats]
        objects = [(cat["id"], box) for cat, box in zip(cats, boxes)]
        yield index, draw_boxes(image_size, boxes, colors), objects


def _annotation(ann_id, image_id, category_id, box):
    x, y, w, h = box
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": [float(v) for v in box],
        "area": float(w * h),
        "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
    }


def make_coco_dataset(root, num_images=3, categories=DEFAULT_COCO_CATEGORIES,
                      image_size=(48, 64), boxes_per_image=2, json_name="annotations.json",
                      image_dirname="images", seed=0):
    """Write PNG images and a COCO instances json under ``root``.

    Image ids are 1..num_images; box k of image i has category ``categories[(i + k) % C]``.
    Returns ``(json_path, image_dir)``.
    """
    rng = np.random.default_rng(seed)
    categories = [dict(cat) for cat in categories]
    image_dir = os.path.join(root, image_dirname)
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for index, array, objects in _make_images(rng, num_images, categories, image_size,
                                              boxes_per_image):
        file_name = f"{index:06d}.png"
        Image.fromarray(array).save(os.path.join(image_dir, file_name))
        images.append({"id": index + 1, "file_name": file_name, "height": image_size[0],
                       "width": image_size[1]})
        for category_id, box in objects:
            ann = _annotation(len(annotations) + 1, index + 1, category_id, box)
            annotations.append({**ann, "iscrowd": 0})
    content = {"images": images, "annotations": annotations, "categories": categories}
    return _write_json(os.path.join(root, json_name), content), image_dir


def coco_json_dataset(root, num_images=3, **kwargs):
    """``make_coco_dataset`` plus its catalog name ``coco_json:<json>:<dir>``."""
    json_path, image_dir = make_coco_dataset(root, num_images=num_images, **kwargs)
    return json_path, image_dir, f"coco_json:{json_path}:{image_dir}"


def make_lvis_dataset(root, num_images=3, categories=DEFAULT_LVIS_CATEGORIES,
                      image_size=(48, 64), boxes_per_image=2, json_name="lvis_v1_val.json",
                      split_folder="val2017", seed=0):
    """Write PNG images under ``root/<split_folder>`` and an LVIS v1 json at ``root/json_name``.

    Images are referenced through ``coco_url`` as in LVIS v1. Each image lists every absent
    category as negative (so false positives on it count) and nothing as non-exhaustive.
    Returns ``(json_path, image_root)`` with ``image_root`` the folder holding
    ``split_folder``.
    """
    rng = np.random.default_rng(seed)
    categories = [{"image_count": 1, "instance_count": 1, **cat} for cat in categories]
    os.makedirs(os.path.join(root, split_folder), exist_ok=True)
    images, annotations = [], []
    for index, array, objects in _make_images(rng, num_images, categories, image_size,
                                              boxes_per_image):
        file_name = f"{index:012d}.png"
        Image.fromarray(array).save(os.path.join(root, split_folder, file_name))
        present = {category_id for category_id, _ in objects}
        images.append({
            "id": index + 1,
            "coco_url": f"http://images.cocodataset.org/{split_folder}/{file_name}",
            "height": image_size[0],
            "width": image_size[1],
            "neg_category_ids": [cat["id"] for cat in categories if cat["id"] not in present],
            "not_exhaustive_category_ids": [],
        })
        for category_id, box in objects:
            annotations.append(_annotation(len(annotations) + 1, index + 1, category_id, box))
    content = {"images": images, "annotations": annotations, "categories": categories}
    return _write_json(os.path.join(root, json_name), content), root


def _write_json(path, content):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(content, f)
    return path
