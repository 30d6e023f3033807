"""What the ``regionclip`` command does (``cli.py`` parses its arguments): detect named classes
in images, or embed given regions.

Every input is checked before the model is loaded (all missing files named at once, with where
to get them), and so is that the outputs can be written; the results json is written only once
every image has been processed, atomically, so a failed run leaves no partial file. A
read-only text-embedding cache only costs a warning.
"""
import json
import logging
import os
import sys
import tempfile
from typing import List, Optional, Sequence

import cv2
import torch

from .api import Detector
from .atomic import atomic_open
from .data.coco import check_class_names, class_names_from_file
from .data.mapper import IMAGE_EXTENSIONS, read_image, read_image_size
from .engine.defaults import USER_ERROR_STATUS, is_user_error, user_error_line
from .engine.preflight import ANY, Input, check_inputs
from .evaluation.results import instances_to_coco_json, write_json_atomic
from .model_zoo import config_path
from .progress import progress_bar
from .visualization import DRAWING_BACKGROUND, draw_predictions, select_predictions

logger = logging.getLogger("regionclip")
VIS_MAX_BOXES = 25  # as the original's visualize scripts


def argument_inputs(args) -> List[Input]:
    """The files and folders the arguments name, for :func:`check_inputs`."""
    inputs = [Input(args.weights, "checkpoint (--weights)"),
              Input(args.rpn_weights, "RPN checkpoint (--rpn-weights)"),
              Input(_config_file(args.config), "config (--config)"),
              Input(_config_file(args.rpn_config), "RPN config (--rpn-config)"),
              Input(args.text_weights, "text-tower checkpoint (--text-weights)")]
    if args.command == "embed":
        return inputs + [Input(args.image, "image"),
                         Input(args.boxes_json, "boxes json (--boxes-json)")]
    return inputs + [Input(path, "image or image folder", ANY) for path in args.images] + [
        Input(args.vocabulary, "class-name file (--vocabulary)"),
        Input(args.embeddings, "class embeddings (--embeddings)")]


def _config_file(name: Optional[str]) -> str:
    """``name`` as the loader finds it (also under configs/), or as given when it is missing."""
    try:
        return config_path(name) if name else ""
    except FileNotFoundError:
        return name


def parse_classes(text: str) -> List[str]:
    return check_class_names([name.strip() for name in text.split(",")] if text.strip() else [])


def expand_images(paths: Sequence[str]) -> List[str]:
    """Files as given, folders as their image files (sorted); each checked to be readable."""
    images = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {path}")
            images += [os.path.join(path, n) for n in found]
        elif os.path.isfile(path):
            images.append(path)
        else:
            raise FileNotFoundError(f"image not found: {path}")
    for path in images:
        read_image_size(path)  # a file that is not an image fails here, before the model loads
    return images


def parse_boxes(text: str) -> List[List[float]]:
    boxes = []
    for index, part in enumerate(p for p in text.split(";") if p.strip()):
        try:
            values = [float(v) for v in part.split(",")]
        except ValueError:
            values = []
        if len(values) != 4:
            raise ValueError(f"--boxes: box {index} {part.strip()!r} is not x0,y0,x1,y1")
        boxes.append(values)
    if not boxes:
        raise ValueError("--boxes: no boxes given")
    return boxes


def read_boxes_json(path: str) -> list:
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid json: {err}") from err
    boxes = data.get("boxes") if isinstance(data, dict) else data
    if not isinstance(boxes, list):
        raise ValueError(f"{path} must hold a list of [x0, y0, x1, y1] boxes")
    return boxes


def check_writable(path: str, folder: str, option: str) -> None:
    """OSError naming ``option`` and ``path`` unless files can be created in ``folder`` (made
    if missing): checked before the work, so that nothing is lost at its end."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise OSError(f"{option} {path}: cannot write into {folder} "
                      f"({err.strerror or err}); choose a writable location") from err


def check_out(path: str) -> None:
    if os.path.isdir(path):
        raise IsADirectoryError(f"--out {path} is a folder; give a file path inside it")
    check_writable(path, os.path.dirname(os.path.abspath(path)), "--out")


def load_detector(args) -> Detector:
    return Detector.from_pretrained(
        args.weights, args.rpn_weights, args.variant, args.device, config=args.config,
        rpn_config=args.rpn_config, text_weights=args.text_weights,
        score_threshold=getattr(args, "score_threshold", None), precision=args.precision,
        progress=not args.quiet)


def coco_document(paths: Sequence[str], names: Sequence[str], results) -> dict:
    """COCO-style json: images (id -> file), categories (id = vocabulary position + 1) and
    annotations with scores (boxes xywh in original pixels)."""
    to_category = {k: k + 1 for k in range(len(names))}
    annotations = []
    for image_id, result in enumerate(results, start=1):
        for ann in instances_to_coco_json(result.to_instances(), image_id, to_category):
            w, h = ann["bbox"][2:]
            annotations.append({"id": len(annotations) + 1, **ann, "area": w * h, "iscrowd": 0})
    return {
        "images": [{"id": i, "file_name": p, "height": r.image_size[0], "width": r.image_size[1]}
                   for i, (p, r) in enumerate(zip(paths, results), start=1)],
        "categories": [{"id": k + 1, "name": n} for k, n in enumerate(names)],
        "annotations": annotations,
    }


def draw_all(document: dict, folder: str, threshold: float, progress: bool = True) -> None:
    os.makedirs(folder, exist_ok=True)
    names = [c["name"] for c in document["categories"]]
    per_image = {image["id"]: [] for image in document["images"]}
    for ann in document["annotations"]:
        per_image[ann["image_id"]].append(ann)
    used = set()
    with progress_bar(len(document["images"]), "Drawing", "image", progress) as bar:
        for image in document["images"]:
            name = os.path.basename(image["file_name"])
            name = name if name not in used else f"{image['id']}_{name}"
            used.add(name)
            shown = select_predictions(per_image[image["id"]], threshold, unique_boxes=True,
                                       max_boxes=VIS_MAX_BOXES)
            canvas = draw_predictions(read_image(image["file_name"], "BGR", DRAWING_BACKGROUND),
                                      shown, names, {k + 1: k for k in range(len(names))})
            if not cv2.imwrite(os.path.join(folder, name), canvas):
                raise OSError(f"could not write {os.path.join(folder, name)}")
            bar.update()


def run_detect(args) -> None:
    check_inputs(argument_inputs(args))
    names = parse_classes(args.classes) if args.classes is not None else \
        class_names_from_file(args.vocabulary)
    paths = expand_images(args.images)
    check_out(args.out)
    if args.vis:
        check_writable(args.vis, args.vis, "--vis")
    detector = load_detector(args)
    detector.set_vocabulary(names, embeddings=args.embeddings, progress=not args.quiet)
    logger.info("Detecting %d classes in %d images", len(names), len(paths))
    results = detector(paths, batch_size=args.batch_size, progress=not args.quiet)
    document = coco_document(paths, names, results)
    write_json_atomic(document, args.out)
    logger.info("Wrote %d detections in %d images to %s", len(document["annotations"]),
                len(paths), args.out)
    if not document["annotations"]:
        logger.warning("No region scored above the score threshold. Where the model fuses RPN "
                       "objectness (MODEL.CLIP.MULTIPLY_RPN_SCORE), a region whose objectness "
                       "logit is negative is dropped: check the RPN weights, or lower "
                       "--score-threshold")
    if args.vis:
        draw_all(document, args.vis, args.vis_threshold, progress=not args.quiet)
        logger.info("Drew the detections into %s", args.vis)


def run_embed(args) -> None:
    check_inputs(argument_inputs(args))
    boxes = parse_boxes(args.boxes) if args.boxes is not None else read_boxes_json(args.boxes_json)
    read_image_size(args.image)
    check_out(args.out)
    embeddings = load_detector(args).embed_regions(args.image, boxes)
    with atomic_open(args.out, "wb") as f:
        torch.save({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                    "embeddings": embeddings, "image": args.image}, f)
    logger.info("Wrote %d region embeddings to %s", len(embeddings), args.out)


def run(args) -> int:
    """Run the parsed command; bad input is printed as one line and returns status 1."""
    try:
        run_detect(args) if args.command == "detect" else run_embed(args)
    except Exception as err:
        if not is_user_error(err):  # a bug, or REGIONCLIP_DEBUG=1: the traceback
            raise
        print(user_error_line(f"regionclip {args.command}", err), file=sys.stderr)
        return USER_ERROR_STATUS
    return 0
