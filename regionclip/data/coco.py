"""Read COCO- and LVIS-format json, and image folders, into detectron2-style record dicts;
read class-name files (txt or the categories of a COCO/LVIS json).

A record is ``{"file_name", "height", "width", "image_id", "annotations": [...]}`` where each
annotation is ``{"bbox" (XYWH, pixels), "bbox_mode": BoxMode.XYWH_ABS, "category_id"
(contiguous, 0-based), "iscrowd", "segmentation"?}``. Contiguous ids follow the dataset's
category ids in increasing order, which is the order of the released concept-embedding files.
"""

import contextlib
import io
import json
import logging
import math
import os
from collections import Counter
from typing import List, Sequence, Tuple

from pycocotools.coco import COCO

from regionclip.data.mapper import IMAGE_EXTENSIONS, read_image_size
from regionclip.download_pages import missing_file_message
from regionclip.structures import BoxMode

logger = logging.getLogger(__name__)

LVIS_RARE = "r"
# A valid polygon has at least three (x, y) points.
_MIN_POLYGON_COORDS = 6


def read_categories(json_file):
    """Category dicts of a COCO/LVIS json, sorted by category id."""
    dataset = _read_json(json_file)
    _check_entries(dataset, "categories", json_file)
    return sorted(dataset["categories"], key=lambda cat: cat["id"])


def lvis_base_categories(categories):
    """LVIS categories that are not rare (frequent + common: the 866 base classes)."""
    return [cat for cat in categories if cat["frequency"] != LVIS_RARE]


def load_coco_api(json_file, image_key="file_name"):
    """A pycocotools ``COCO`` of a COCO/LVIS json, checked first (see ``check_coco_dataset``).

    ``image_key``: the key naming an image's file ("file_name"; LVIS: "coco_url").
    """
    dataset = _read_json(json_file)
    check_coco_dataset(dataset, json_file, image_key)
    api = COCO()
    api.dataset = dataset
    # pycocotools prints progress to stdout; keep library output in the log only.
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        api.createIndex()
    logger.debug(buffer.getvalue().strip())
    return api


def _read_json(json_file):
    with open(json_file, encoding="utf-8") as f:
        try:
            dataset = json.load(f)
        except ValueError as err:
            raise ValueError(f"{json_file} is not valid json: {err}") from err
    if not isinstance(dataset, dict):
        raise ValueError(f"{json_file} must hold a json object with 'images', 'annotations' "
                         f"and 'categories', not a {type(dataset).__name__}")
    return dataset


# Keys every entry must have; the image file key depends on the format.
_REQUIRED = {"images": ("id", "height", "width"), "categories": ("id", "name"),
             "annotations": ("id", "image_id", "category_id", "bbox")}
_SINGULAR = {"images": "image", "categories": "category", "annotations": "annotation"}


def check_coco_dataset(dataset, json_file, image_key="file_name"):
    """ValueError naming the file, entries and key for what pycocotools would mis-read
    silently: missing keys, malformed boxes, and repeated image, annotation or category ids
    (an index keeps the last of each, so an image's boxes would be scored against another).
    A missing ``annotations`` list means none."""
    dataset.setdefault("annotations", [])
    for section in ("images", "categories", "annotations"):
        keys = _REQUIRED[section] + ((image_key,) if section == "images" else ())
        _check_entries(dataset, section, json_file, keys)
    bad_boxes = [a["id"] for a in dataset["annotations"]
                 if not (isinstance(a["bbox"], list) and len(a["bbox"]) == 4 and
                         all(isinstance(v, (int, float)) for v in a["bbox"]))]
    if bad_boxes:
        raise ValueError(f"{json_file}: the 'bbox' of {len(bad_boxes)} annotation(s) is not "
                         f"[x, y, width, height] (ids {_some(bad_boxes)})")


def _check_entries(dataset, section, json_file, keys=("id",)):
    entries = dataset.get(section)
    if not isinstance(entries, list):
        raise ValueError(f"{json_file} has no '{section}' list")
    for key in keys:
        missing = [i for i, entry in enumerate(entries)
                   if not isinstance(entry, dict) or key not in entry]
        if missing:
            raise ValueError(f"{json_file}: {len(missing)} of the {section} have no '{key}' "
                             f"(entries {_some(missing)})")
    repeated = sorted(i for i, n in Counter(e["id"] for e in entries).items() if n > 1)
    if repeated:
        raise ValueError(f"{json_file}: duplicate {_SINGULAR[section]} ids "
                         f"{_some(repeated)}; every id must be unique")


def _some(values, limit=10):
    return str(values[:limit])[:-1] + (", ...]" if len(values) > limit else "]")


def load_coco_json(json_file, image_root):
    """Records of a COCO-format json; ``file_name`` is ``image_root/<json file_name>``."""
    api = load_coco_api(json_file)
    categories = sorted(api.dataset["categories"], key=lambda cat: cat["id"])
    id_map = {cat["id"]: index for index, cat in enumerate(categories)}
    return _build_records(api, id_map, lambda img: os.path.join(image_root, img["file_name"]))


def load_lvis_json(json_file, image_root, base_only=False, max_annotations=0):
    """Records of an LVIS v1 json.

    The image path is ``image_root/<split folder>/<file>`` with both parts taken from
    ``coco_url`` (LVIS v1 reuses COCO train2017 and val2017 images). With ``base_only`` rare
    annotations are dropped and ids are contiguous over the 866 base classes; otherwise
    category id = LVIS id - 1. ``max_annotations > 0`` keeps only the first that many
    annotations of an image (the original's memory cap for ground-truth-box inference).
    """
    api = load_coco_api(json_file, image_key="coco_url")
    categories = sorted(api.dataset["categories"], key=lambda cat: cat["id"])
    if base_only:
        categories = lvis_base_categories(categories)
    id_map = {cat["id"]: index for index, cat in enumerate(categories)}
    records = _build_records(api, id_map, _lvis_file_name(image_root))
    for record, img_id in zip(records, sorted(api.imgs)):
        _add_lvis_image_labels(record, api.imgs[img_id], id_map)
    if max_annotations > 0:
        _truncate_annotations(records, max_annotations)
    return records


def _lvis_file_name(image_root):
    def file_name(img):
        split_folder, name = img["coco_url"].split("/")[-2:]
        return os.path.join(image_root, split_folder, name)

    return file_name


def _add_lvis_image_labels(record, img, id_map):
    """Federated labels of an LVIS image, as contiguous ids (for federated training losses)."""
    for key in ("not_exhaustive_category_ids", "neg_category_ids"):
        record[key] = [id_map[cat_id] for cat_id in img.get(key, []) if cat_id in id_map]


def _truncate_annotations(records, max_annotations):
    truncated = 0
    for record in records:
        if len(record["annotations"]) > max_annotations:
            record["annotations"] = record["annotations"][:max_annotations]
            truncated += 1
    if truncated:
        logger.warning("%d images had more than %d annotations; truncated", truncated,
                       max_annotations)


def _build_records(api, id_map, file_name_fn):
    """One record per image of ``api``, in increasing image id order."""
    stats = Counter()
    records = []
    for img_id in sorted(api.imgs):
        img = api.imgs[img_id]
        record = {
            "file_name": file_name_fn(img),
            "height": img["height"],
            "width": img["width"],
            "image_id": img_id,
        }
        anns = api.imgToAnns.get(img_id, [])
        record["annotations"] = _convert_annotations(anns, id_map, img, stats, api.cats)
        stats["without_annotations"] += not record["annotations"]
        records.append(record)
    stats["unknown_image"] = sum(len(anns) for img_id, anns in api.imgToAnns.items()
                                 if img_id not in api.imgs)
    _log_stats(stats, len(records), api)
    return records


def _convert_annotations(anns, id_map, img, stats, known_categories):
    converted = []
    for ann in anns:
        if ann["category_id"] not in id_map:
            known = ann["category_id"] in known_categories
            stats["other_category" if known else "unknown_category"] += 1
            continue
        obj = _convert_annotation(ann, img["height"], img["width"], stats)
        if obj is not None:
            obj["category_id"] = id_map[ann["category_id"]]
            converted.append(obj)
    return converted


def _convert_annotation(ann, height, width, stats):
    """Annotation dict with its box clipped to the image, or None when the box is empty."""
    x, y, w, h = (float(v) for v in ann["bbox"])
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        stats["non_finite_box"] += 1
        return None
    x0, y0 = max(x, 0.0), max(y, 0.0)
    x1, y1 = min(x + w, float(width)), min(y + h, float(height))
    if x1 <= x0 or y1 <= y0:
        stats["empty_box"] += 1
        return None
    if (x0, y0, x1, y1) != (x, y, x + w, y + h):
        stats["clipped_box"] += 1
    obj = {
        "bbox": [x0, y0, x1 - x0, y1 - y0],
        "bbox_mode": BoxMode.XYWH_ABS,
        "iscrowd": int(ann.get("iscrowd", 0)),
    }
    segmentation = _valid_segmentation(ann.get("segmentation"))
    if segmentation:
        obj["segmentation"] = segmentation
    elif "segmentation" in ann:
        stats["invalid_segmentation"] += 1
    return obj


def _valid_segmentation(segmentation):
    """RLE dicts pass through; polygons shorter than three points are removed."""
    if isinstance(segmentation, dict):
        return segmentation
    if not segmentation:
        return None
    polygons = [p for p in segmentation if len(p) % 2 == 0 and len(p) >= _MIN_POLYGON_COORDS]
    return polygons or None


_STAT_MESSAGES = {
    "unknown_category": "annotations have a category id that is not in 'categories'; "
                        "they were dropped",
    "unknown_image": "annotations have an image id that is not in 'images'; they were dropped",
    "non_finite_box": "annotations with a NaN or infinite box were dropped",
    "empty_box": "annotations with an empty box (after clipping to the image) were dropped",
    "clipped_box": "annotation boxes reached outside the image and were clipped",
    "invalid_segmentation": "annotations had no valid polygon; their boxes were kept",
}


def _log_stats(stats, num_images, api):
    logger.info("Loaded %d images, %d annotations", num_images, len(api.anns))
    for key, message in _STAT_MESSAGES.items():
        if stats[key]:
            logger.warning("%d %s", stats[key], message)
    if stats["other_category"]:
        logger.info("%d annotations of classes outside the class list were left out",
                    stats["other_category"])
    if stats["without_annotations"]:
        logger.info("%d of %d images have no usable annotations (kept)",
                    stats["without_annotations"], num_images)


def load_image_folder(folder):
    """Records for every image file in ``folder`` (sorted by name); no annotations.

    ``image_id`` is the position in the sorted list counted from 1, as COCO's ids and the
    ``regionclip detect`` json: the same image has the same id in the results of both, and no
    id is 0, which COCO tools may take for "none". Sizes come from the file headers with the
    EXIF orientation applied, so they match the decoded images.
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(missing_file_message(folder, "image folder"))
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    records = []
    for image_id, name in enumerate(names, start=1):
        path = os.path.join(folder, name)
        height, width = read_image_size(path)
        records.append({"file_name": path, "height": height, "width": width,
                        "image_id": image_id})
    return records


def class_names_from_file(path: str, exclude_rare: bool = False) -> List[str]:
    """Class names from a txt file (one per line, blank lines skipped) or a COCO/LVIS json.

    json: ``categories`` sorted by id (the datasets' contiguous-id order). LVIS files (whose
    categories carry ``synset``) get the original's cleaning: ``_`` -> space, parentheses
    removed. ``exclude_rare`` keeps only LVIS categories whose ``frequency`` is not ``"r"``
    (the 866 base classes).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(missing_file_message(path, "class-name file"))
    if path.endswith(".json"):
        names = [clean for clean, _ in json_class_names(path, exclude_rare)]
    else:
        if exclude_rare:
            raise ValueError(f"exclude_rare needs an LVIS json, got {path}")
        with open(path, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
    return check_class_names(names, path)


def json_class_names(path: str, exclude_rare: bool = False) -> List[Tuple[str, str]]:
    """(class name, name as written in the file) of a COCO/LVIS json's categories, by id; see
    :func:`class_names_from_file` for the cleaning of LVIS names."""
    with open(path, encoding="utf-8") as f:
        categories = json.load(f).get("categories")
    if not isinstance(categories, list):
        raise ValueError(f"{path} has no 'categories' list")
    categories = sorted(categories, key=lambda c: c["id"])
    is_lvis = any("synset" in c for c in categories)
    if exclude_rare:
        if not is_lvis:
            raise ValueError(f"exclude_rare needs an LVIS json (with 'frequency'), got {path}")
        categories = [c for c in categories if c["frequency"] != "r"]
    if not is_lvis:
        return [(c["name"], c["name"]) for c in categories]
    return [(c["name"].replace("_", " ").replace("(", "").replace(")", ""), c["name"])
            for c in categories]


def check_class_names(names: Sequence[str], source: str = "the vocabulary") -> List[str]:
    """The names as a list; ValueError for an empty vocabulary, blank or duplicate names."""
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise ValueError("the vocabulary must be a list of class-name strings, e.g. "
                         "['cat', 'traffic cone']")
    names = list(names)
    if not names:
        raise ValueError(f"empty vocabulary: no class names in {source}")
    blank = [i for i, n in enumerate(names, start=1) if not n.strip()]
    if blank:
        raise ValueError(f"blank class name(s) at position(s) {blank} of {source} (counting "
                         "from 1)")
    duplicates = sorted(n for n, k in Counter(names).items() if k > 1)
    if duplicates:
        raise ValueError(f"duplicate class names in {source}: {duplicates}")
    return names
