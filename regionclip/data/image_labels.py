"""Image-labelled data in Detic's format: images with class labels and captions, no boxes.

The json is LVIS-style (``{"images", "categories", "annotations": []}``); each image has
``id``, ``file_name`` (or ``coco_url``), ``height``, ``width``, ``pos_category_ids`` (category
ids of the classes it shows, e.g. the class names found in its captions) and optionally
``captions`` (a list of strings). Records carry ``pos_category_ids`` as contiguous ids (the
categories sorted by id, as every loader here), ``captions`` and no annotations. Also here:
Detic's preparation of OV-COCO (class image counts, image labels from COCO captions).
"""
import json
import os
from collections import Counter, defaultdict
from typing import Dict, List, Optional


def _file_name(image: Dict, image_root: str) -> str:
    if "file_name" in image:
        return os.path.join(image_root, image["file_name"])
    split_folder, name = image["coco_url"].split("/")[-2:]
    return os.path.join(image_root, split_folder, name)


def load_image_label_json(json_file: str, image_root: str) -> List[Dict]:
    """One record per image of ``json_file``, in increasing image id order."""
    with open(json_file) as f:
        data = json.load(f)
    try:
        return _image_label_records(data, json_file, image_root)
    except KeyError as missing:
        raise ValueError(f"{json_file} lacks the key {missing} (an image-label json has "
                         "'images' with id, file_name, height, width, and 'categories' with id)"
                         ) from None


def _image_label_records(data: Dict, json_file: str, image_root: str) -> List[Dict]:
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


def class_image_counts(instances: Dict) -> List[Dict]:
    """Detic's ``*_cat_info.json`` of a COCO instances dict: its categories, each with
    ``image_count`` (images holding the class) and ``instance_count``."""
    images, boxes = defaultdict(set), Counter()
    for ann in instances["annotations"]:
        images[ann["category_id"]].add(ann["image_id"])
        boxes[ann["category_id"]] += 1
    return [{**cat, "image_count": len(images[cat["id"]]), "instance_count": boxes[cat["id"]]}
            for cat in instances["categories"]]


def _phrase(name: str) -> str:
    """A class name as it appears in text: lower case, ``_`` as space, no parenthesised part."""
    return name.replace("_", " ").split("(")[0].strip().lower()


def mentions(text: str, phrase: str) -> bool:
    """Whether ``phrase`` occurs in ``text`` as whole words (Detic's caption matching)."""
    return f" {phrase} " in text or text.startswith(f"{phrase} ") or text.endswith(f" {phrase}")


def caption_image_labels(captions: Dict, categories: List[Dict],
                         synonyms: Optional[Dict[str, List[str]]] = None) -> Dict:
    """An image-label dict from a COCO captions dict: each image with all its ``captions`` and
    as ``pos_category_ids`` the classes whose name (or a synonym) its joined, lower-cased
    captions mention; images without any are dropped. ``synonyms``: class name -> phrases."""
    synonyms = synonyms or {}
    phrases = {cat["id"]: [_phrase(n) for n in [cat["name"], *synonyms.get(cat["name"], [])]]
               for cat in categories}
    per_image = defaultdict(list)
    for ann in captions["annotations"]:
        per_image[ann["image_id"]].append(ann["caption"])
    images = []
    for image in captions["images"]:
        texts = per_image[image["id"]]
        text = " ".join(texts).lower()
        labels = [c for c, names in phrases.items() if any(mentions(text, n) for n in names)]
        if labels:
            images.append({**image, "captions": texts, "pos_category_ids": labels})
    return {"images": images, "categories": categories, "annotations": []}
