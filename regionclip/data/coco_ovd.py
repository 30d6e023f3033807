"""COCO open-vocabulary detection (OVD) splits: 48 base, 17 novel ("target"), 65 all.

The split is OVR-CNN's, used by RegionCLIP. Each split json keeps only its categories (with
their COCO ids), only annotations of those categories, and only images holding at least one
such annotation.
"""

import json
import os

from regionclip.download_pages import COCO_PAGE

# (COCO category id, name); both tuples are in COCO id order.
NOVEL_CATEGORIES = (
    (5, "airplane"), (6, "bus"), (17, "cat"), (18, "dog"), (21, "cow"), (22, "elephant"),
    (28, "umbrella"), (32, "tie"), (36, "snowboard"), (41, "skateboard"), (47, "cup"),
    (49, "knife"), (61, "cake"), (63, "couch"), (76, "keyboard"), (81, "sink"),
    (87, "scissors"),
)
BASE_CATEGORIES = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (7, "train"), (8, "truck"),
    (9, "boat"), (15, "bench"), (16, "bird"), (19, "horse"), (20, "sheep"), (23, "bear"),
    (24, "zebra"), (25, "giraffe"), (27, "backpack"), (31, "handbag"), (33, "suitcase"),
    (34, "frisbee"), (35, "skis"), (38, "kite"), (42, "surfboard"), (44, "bottle"),
    (48, "fork"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"),
    (54, "sandwich"), (55, "orange"), (56, "broccoli"), (57, "carrot"), (59, "pizza"),
    (60, "donut"), (62, "chair"), (65, "bed"), (70, "toilet"), (72, "tv"), (73, "laptop"),
    (74, "mouse"), (75, "remote"), (78, "microwave"), (79, "oven"), (80, "toaster"),
    (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"), (90, "toothbrush"),
)
# The 65-class order of the test set and of coco_65_cls_emb.pth is COCO id order.
ALL_CATEGORIES = tuple(sorted(NOVEL_CATEGORIES + BASE_CATEGORIES))

NOVEL_IDS = frozenset(cat_id for cat_id, _ in NOVEL_CATEGORIES)
BASE_IDS = frozenset(cat_id for cat_id, _ in BASE_CATEGORIES)
ALL_IDS = NOVEL_IDS | BASE_IDS

# Split suffix in dataset/file names -> category ids kept.
SPLIT_IDS = {"all": ALL_IDS, "b": BASE_IDS, "t": NOVEL_IDS}
# COCO 2017 image set -> OVD image-set name used in the dataset names.
IMAGE_SETS = {"train2017": "train", "val2017": "test"}
_FILTERED_KEYS = ("categories", "images", "annotations")


def ovd_json_name(image_set, split):
    """File name of one split, e.g. ``ovd_ins_val2017_b.json``."""
    return f"ovd_ins_{image_set}_{split}.json"


def build_ovd_split(instances, split):
    """Filter a COCO instances dict (json content) down to one OVD split.

    Categories keep their COCO ids and dicts; crowd annotations count like any other, as the
    split only looks at category ids. Returns a new dict; ``instances`` is not modified.
    """
    keep_ids = SPLIT_IDS[split]
    annotations = [ann for ann in instances["annotations"] if ann["category_id"] in keep_ids]
    image_ids = {ann["image_id"] for ann in annotations}
    result = {key: value for key, value in instances.items() if key not in _FILTERED_KEYS}
    result["categories"] = [cat for cat in instances["categories"] if cat["id"] in keep_ids]
    result["images"] = [img for img in instances["images"] if img["id"] in image_ids]
    result["annotations"] = annotations
    return result


def iter_ovd_jsons(coco_root):
    """Yield ``(output_path, json_dict)`` for the six OVD files under ``coco_root/annotations``;
    both COCO instances files are checked before anything is yielded, each is read once."""
    annotation_dir = os.path.join(coco_root, "annotations")
    sources = {s: os.path.join(annotation_dir, f"instances_{s}.json") for s in IMAGE_SETS}
    missing = [path for path in sources.values() if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(
            f"COCO 2017 annotations not found: {', '.join(missing)}; download the 2017 "
            f"train/val annotations from {COCO_PAGE} (see datasets/README.md for the layout)"
        )
    for image_set, source in sources.items():
        with open(source) as f:
            instances = json.load(f)
        for split in SPLIT_IDS:
            path = os.path.join(annotation_dir, ovd_json_name(image_set, split))
            yield path, build_ovd_split(instances, split)
