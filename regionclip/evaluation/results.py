"""Predictions -> COCO-format result dicts, and crash-safe json writing."""

import json
import math
import os

import numpy as np
import pycocotools.mask as mask_util

from ..atomic import atomic_open


def instances_to_coco_json(instances, image_id, contiguous_to_dataset_id=None):
    """COCO result dicts for one image's predictions.

    Args:
        instances: ``Instances`` with ``pred_boxes`` (XYXY pixels of the original image),
            ``scores``, ``pred_classes`` (contiguous) and optionally ``pred_masks`` [N, H, W].
        image_id: the dataset's image id.
        contiguous_to_dataset_id: dict contiguous index -> dataset category id; None keeps
            the contiguous index.
    Returns:
        list of ``{"image_id", "category_id", "bbox" (XYWH), "score", "segmentation"?}``.
    """
    if len(instances) == 0:
        return []
    boxes = instances.pred_boxes.tensor.detach().cpu().double().numpy()
    boxes[:, 2:] -= boxes[:, :2]
    scores = instances.scores.detach().cpu().tolist()
    classes = instances.pred_classes.detach().cpu().tolist()
    if contiguous_to_dataset_id is not None:
        classes = [contiguous_to_dataset_id[c] for c in classes]
    results = [
        {"image_id": image_id, "category_id": int(c), "bbox": box, "score": float(s)}
        for c, box, s in zip(classes, boxes.tolist(), scores)
    ]
    if instances.has("pred_masks"):
        for result, rle in zip(results, _encode_masks(instances.pred_masks)):
            result["segmentation"] = rle
    return results


def _encode_masks(masks):
    """Binary masks [N, H, W] -> compressed RLE dicts with str counts (json-serialisable)."""
    rles = []
    for mask in masks.detach().cpu().numpy():
        rle = mask_util.encode(np.asfortranarray(mask[:, :, None], dtype=np.uint8))[0]
        rle["counts"] = rle["counts"].decode("utf-8")
        rles.append(rle)
    return rles


def finite_or_null(obj):
    """``obj`` with every NaN or infinite float as None: those are not json, and a metric is NaN
    by design where it has nothing to measure (e.g. the AP of an area range without objects)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {key: finite_or_null(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(value) for value in obj]
    return obj


def write_json_atomic(obj, path):
    """Write ``obj`` as json to ``path`` so that ``path`` is either complete or untouched.

    The data goes to a temporary file in the same folder, which then replaces ``path``; if
    serialisation or writing fails the temporary file is removed and ``path`` is unchanged.
    """
    with atomic_open(path, "w") as f:
        json.dump(obj, f)


class ResultsEvaluator:
    """Collects per-image predictions as COCO result dicts and writes them to a json file.

    Subclasses add ``evaluate``. Predictions are kept per image so that a multi-process run
    can gather ``self.predictions`` from every rank and pass the union to ``evaluate``.
    """

    results_file_name = "results.json"

    def __init__(self, output_dir="", contiguous_to_dataset_id=None):
        """``output_dir``: folder of the results json (usually ``OUTPUT_DIR/inference``);
        empty means do not write. ``contiguous_to_dataset_id``: model class index -> category
        id of the json."""
        self.output_dir = output_dir
        self.contiguous_to_dataset_id = contiguous_to_dataset_id
        self._predictions = []

    @property
    def results_path(self):
        return os.path.join(self.output_dir, self.results_file_name) if self.output_dir else ""

    @property
    def predictions(self):
        """List of ``{"image_id", "results": [COCO result dicts]}``, one per processed image."""
        return self._predictions

    def reset(self):
        self._predictions = []

    def process(self, inputs, outputs):
        """Record one batch: ``inputs`` are mapper dicts, ``outputs`` model dicts with
        ``"instances"`` at the original image size."""
        for inp, out in zip(inputs, outputs):
            results = []
            if "instances" in out:
                results = instances_to_coco_json(
                    out["instances"], inp["image_id"], self.contiguous_to_dataset_id
                )
            self._predictions.append({"image_id": inp["image_id"], "results": results})

    def _flatten_and_write(self, predictions):
        """All result dicts of ``predictions`` (default: this process's), written to json."""
        predictions = self._predictions if predictions is None else predictions
        results = [result for prediction in predictions for result in prediction["results"]]
        if self.results_path:
            write_json_atomic(results, self.results_path)
        return results
