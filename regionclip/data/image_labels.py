"""Image-labelled data in Detic's format: images with class labels and captions, no boxes.

The json is LVIS-style (``{"images", "categories", "annotations": []}``); each image has
``id``, ``file_name`` (or ``coco_url``), ``height``, ``width``, ``pos_category_ids`` (category
ids of the classes it shows, e.g. the class names found in its captions) and optionally
``captions`` (a list of strings). Records carry ``pos_category_ids`` as contiguous ids (the
categories sorted by id, as every loader here), ``captions`` and no annotations.
"""
import json
import os
from typing import Dict, List


def _file_name(image: Dict, image_root: str) -> str:
    if "file_name" in image:
        return os.path.join(image_root, image["file_name"])
    split_folder, name = image["coco_url"].split("/")[-2:]
    return os.path.join(image_root, split_folder, name)


def load_image_label_json(json_file: str, image_root: str) -> List[Dict]:
    """One record per image of ``json_file``, in increasing image id order."""
    with open(json_file) as f:
        data = json.load(f)
    categories = sorted(data["categories"], key=lambda cat: cat["id"])
    id_map = {cat["id"]: index for index, cat in enumerate(categories)}
    records = []
    for image in sorted(data["images"], key=lambda img: img["id"]):
        unknown = set(image.get("pos_category_ids", [])) - set(id_map)
        if unknown:
            raise ValueError(f"{json_file}: image {image['id']} has pos_category_ids "
                             f"{sorted(unknown)} that are not in its categories")
        records.append({
            "file_name": _file_name(image, image_root),
            "height": image["height"],
            "width": image["width"],
            "image_id": image["id"],
            "pos_category_ids": [id_map[c] for c in image.get("pos_category_ids", [])],
            "captions": list(image.get("captions", [])),
            "annotations": [],
        })
    return records
