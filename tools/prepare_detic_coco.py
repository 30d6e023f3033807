"""Build the files of Detic's open-vocabulary COCO datasets from the COCO 2017 annotations.

Reads ``<coco-root>/annotations/instances_{train,val}2017.json`` and ``captions_train2017.json``
and writes, under ``<coco-root>``:

- ``zero-shot/instances_train2017_seen_2_oriorder.json``: the 48 base classes' boxes
  (``coco_zeroshot_train_oriorder``), and ``zero-shot/instances_val2017_all_2_oriorder.json``:
  the 65 OV-COCO classes' boxes (``coco_generalized_zeroshot_val``); both list all 80 COCO
  categories, so that class ids match Detic's 80-row classifier;
- ``zero-shot/instances_train2017_seen_2_oriorder_cat_info.json``: images per class
  (``MODEL.ROI_BOX_HEAD.CAT_FREQ_PATH``; the novel classes have none);
- ``annotations/captions_train2017_tags_allcaps.json``: the training images with their
  captions and, as image labels, the classes their captions name (``coco_caption_train_tags``).

The images of each split are those holding at least one box of its classes (the OVR-CNN split
of ``tools/prepare_coco_ovd.py``). Class names are matched as whole words; Detic also matched
the synonyms of each class's LVIS synset, which ``--synonyms`` (a json ``{name: [phrase,
...]}``) can supply.
"""
import argparse
import json
import logging
import os
import sys

from regionclip.data.coco_ovd import build_ovd_split
from regionclip.data.image_labels import caption_image_labels, class_image_counts
from regionclip.engine.defaults import run_tool
from regionclip.evaluation.results import write_json_atomic

logger = logging.getLogger("prepare_detic_coco")
ZERO_SHOT = "zero-shot"
TRAIN_FILE = "instances_train2017_seen_2_oriorder.json"
VAL_FILE = "instances_val2017_all_2_oriorder.json"
CAT_INFO_FILE = "instances_train2017_seen_2_oriorder_cat_info.json"
TAGS_FILE = "captions_train2017_tags_allcaps.json"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coco-root", default=os.path.join("datasets", "coco"),
                        help="folder holding annotations/ (default: %(default)s)")
    parser.add_argument("--synonyms", default="",
                        help="json {class name: [synonym, ...]} for the caption tags")
    return parser.parse_args(argv)


def _read(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _write(content, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json_atomic(content, path)
    logger.info("wrote %s", path)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    annotations = os.path.join(args.coco_root, "annotations")
    inputs = [os.path.join(annotations, f"{name}.json") for name in
              ("instances_train2017", "instances_val2017", "captions_train2017")]
    missing = [path for path in inputs + [args.synonyms] if path and not os.path.isfile(path)]
    if missing:  # before anything is written, so no half of the outputs is left behind
        raise SystemExit(f"error: {', '.join(missing)} not found; see datasets/README.md for the "
                         "layout")
    synonyms = _read(args.synonyms) if args.synonyms else {}
    train = _read(os.path.join(annotations, "instances_train2017.json"))
    categories = train["categories"]
    seen = {**build_ovd_split(train, "b"), "categories": categories}
    _write(seen, os.path.join(args.coco_root, ZERO_SHOT, TRAIN_FILE))
    _write(class_image_counts(seen), os.path.join(args.coco_root, ZERO_SHOT, CAT_INFO_FILE))
    val = _read(os.path.join(annotations, "instances_val2017.json"))
    _write({**build_ovd_split(val, "all"), "categories": categories},
           os.path.join(args.coco_root, ZERO_SHOT, VAL_FILE))
    tags = caption_image_labels(_read(os.path.join(annotations, "captions_train2017.json")),
                                categories, synonyms)
    logger.info("%d training images have image labels", len(tags["images"]))
    _write(tags, os.path.join(annotations, TAGS_FILE))


if __name__ == "__main__":
    sys.exit(run_tool(main, "prepare_detic_coco"))
