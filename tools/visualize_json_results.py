#!/usr/bin/env python3
r"""Draw the detections of a results json on the images of a dataset (the original's flags).

    python tools/visualize_json_results.py --input output/inference/lvis_instances_results.json \
        --output output/regions --dataset lvis_v1_val_custom_img --conf-threshold 0.05 \
        --show-unique-boxes --max-boxes 25 --small-region-px 8100

Every image of the dataset is written to ``--output`` under its own file name, with the
predictions that pass the filters drawn on it. ``*_custom_img`` datasets read their images from
``--input-dir`` (the original hard-coded ``./datasets/custom_images``).
"""
import argparse
import json
import os
import sys
from collections import Counter, defaultdict
from typing import Dict, List, Sequence

import cv2
import tqdm

from regionclip.data.catalog import DEFAULT_CUSTOM_IMAGE_DIR, get_dataset_dicts, get_metadata
from regionclip.data.mapper import read_image
from regionclip.engine.defaults import run_tool, setup_logging
from regionclip.engine.preflight import Input, check_inputs, dataset_inputs
from regionclip.visualization import DRAWING_BACKGROUND, draw_predictions, select_predictions

RESULT_KEYS = ("image_id", "category_id", "bbox", "score")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="COCO-format results json")
    parser.add_argument("--output", required=True, help="folder for the drawn images")
    parser.add_argument("--dataset", default="coco_2017_val", help="dataset the results are of")
    parser.add_argument("--conf-threshold", type=float, default=0.5,
                        help="draw predictions scoring above this")
    parser.add_argument("--show-unique-boxes", action="store_true",
                        help="draw each exact box once, with its best class (for proposals "
                        "reported once per class)")
    parser.add_argument("--max-boxes", type=int, default=30,
                        help="with --show-unique-boxes: examine only this many best predictions "
                        "per image")
    parser.add_argument("--small-region-px", type=float, default=0.0,
                        help="with --show-unique-boxes: skip boxes smaller than this many square "
                        "pixels")
    parser.add_argument("--max-images", type=int, default=0,
                        help="draw only the first this many images of the dataset (0 = all)")
    parser.add_argument("--input-dir", default=DEFAULT_CUSTOM_IMAGE_DIR,
                        help="image folder of *_custom_img datasets")
    return parser.parse_args(argv)


def load_results(path: str) -> List[Dict]:
    """The result dicts of a results json, checked for the fields drawing needs."""
    with open(path) as f:
        try:
            results = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid json: {error}") from error
    if not isinstance(results, list):
        raise ValueError(f"{path} must hold a list of COCO result dicts, got "
                         f"{type(results).__name__}")
    for index, result in enumerate(results):
        if not isinstance(result, dict) or not all(key in result for key in RESULT_KEYS):
            raise ValueError(f"{path}: entry {index} is not a result dict with "
                             f"{', '.join(RESULT_KEYS)}: {str(result)[:200]}")
    return results


def group_by_image(results: Sequence[Dict], image_ids: Sequence, category_ids) -> Dict:
    """image id -> its results; every image and category must belong to the dataset."""
    unknown_classes = sorted({r["category_id"] for r in results} - set(category_ids))
    if unknown_classes:
        raise ValueError(f"{len(unknown_classes)} category ids of the results are not classes "
                         f"of the dataset, e.g. {unknown_classes[:5]}: wrong --dataset?")
    unknown_images = sorted({r["image_id"] for r in results} - set(image_ids), key=str)
    if unknown_images:
        raise ValueError(f"{len(unknown_images)} image ids of the results are not images of "
                         f"the dataset, e.g. {unknown_images[:5]}: wrong --dataset or "
                         "--input-dir?")
    by_image = defaultdict(list)
    for result in results:
        by_image[result["image_id"]].append(result)
    return by_image


def output_paths(records: Sequence[Dict], output_dir: str) -> List[str]:
    """``output_dir/<image file name>`` per record; two images may not share a name, and no
    drawing may replace the image it is drawn from."""
    names = [os.path.basename(record["file_name"]) for record in records]
    clashes = sorted(name for name, count in Counter(names).items() if count > 1)
    if clashes:
        raise ValueError(f"several images are named {clashes[:5]}; their drawings would "
                         "overwrite each other")
    paths = [os.path.join(output_dir, name) for name in names]
    for record, path in zip(records, paths):
        if os.path.exists(path) and os.path.samefile(path, record["file_name"]):
            raise ValueError(f"--output {output_dir} holds the dataset's images: the drawings "
                             f"would replace them (e.g. {path}); choose another folder")
    return paths


def main(argv=None) -> List[str]:
    args = parse_args(argv)
    logger = setup_logging()
    check_inputs([Input(args.input, "results json (--input)"),
                  *dataset_inputs([args.dataset], args.input_dir)])
    results = load_results(args.input)
    metadata = get_metadata(args.dataset)
    records = get_dataset_dicts(args.dataset, input_dir=args.input_dir)
    by_image = group_by_image(results, [r["image_id"] for r in records],
                              metadata.thing_dataset_id_to_contiguous_id)
    records = records[:args.max_images] if args.max_images > 0 else records
    category_to_index = metadata.thing_dataset_id_to_contiguous_id
    paths = output_paths(records, args.output)
    os.makedirs(args.output, exist_ok=True)
    drawn = 0
    for record, path in zip(tqdm.tqdm(records, desc="Drawing", unit="image"), paths):
        predictions = select_predictions(
            by_image.get(record["image_id"], []), args.conf_threshold, args.show_unique_boxes,
            args.max_boxes, args.small_region_px,
        )
        image = read_image(record["file_name"], "BGR", background=DRAWING_BACKGROUND)
        image = draw_predictions(image, predictions, metadata.thing_classes, category_to_index)
        if not cv2.imwrite(path, image):
            raise OSError(f"could not write {path} (unsupported extension or unwritable folder)")
        drawn += len(predictions)
    logger.info("Drew %d predictions on %d images into %s", drawn, len(records), args.output)
    return paths


if __name__ == "__main__":
    sys.exit(run_tool(main, "visualize_json_results"))
