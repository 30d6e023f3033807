"""LVIS evaluation with the official lvis API (federated AP, APr/APc/APf)."""

import contextlib
import copy
import logging
import math

import numpy as np

from regionclip.data.coco import check_coco_dataset
from regionclip.evaluation.coco import warn_nothing_to_evaluate
from regionclip.evaluation.results import ResultsEvaluator

logger = logging.getLogger(__name__)

LVIS_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
# The official LVIS protocol ranks up to 300 detections per image.
LVIS_MAX_DETS = 300
# The lvis package is imported where it is used: its import loads matplotlib.pyplot (about
# 0.8 s), which every command would otherwise pay at start-up.


class LVISEvaluator(ResultsEvaluator):
    """Evaluate detections against an LVIS json (AP numbers in percent).

    Args:
        json_file: ground-truth json (not read when ``run_evaluation`` is False).
        output_dir: folder for ``lvis_instances_results.json`` ("" = do not write).
        contiguous_to_dataset_id: model class index -> LVIS category id; default: the json's
            ids in increasing order (``k + 1`` for LVIS v1); required without evaluation.
        run_evaluation: False for image sets without ground truth (custom image folders,
            test-dev): only the results json is written.
        max_dets_per_image: detections kept per image before evaluation.
    """

    results_file_name = "lvis_instances_results.json"

    def __init__(self, json_file, output_dir="", contiguous_to_dataset_id=None,
                 run_evaluation=True, max_dets_per_image=LVIS_MAX_DETS):
        self.json_file = json_file
        self.lvis_gt = _load_lvis(json_file) if run_evaluation else None
        if contiguous_to_dataset_id is None:
            if self.lvis_gt is None:
                raise ValueError("contiguous_to_dataset_id is required when run_evaluation=False")
            contiguous_to_dataset_id = dict(enumerate(sorted(self.lvis_gt.get_cat_ids())))
        super().__init__(output_dir, contiguous_to_dataset_id)
        self.run_evaluation = run_evaluation
        self.max_dets_per_image = max_dets_per_image

    def evaluate(self, predictions=None):
        """Write the results json and return ``{"bbox": metrics, "segm": metrics?}``
        (empty when evaluation is switched off)."""
        results = self._flatten_and_write(predictions)
        if not self.run_evaluation:
            logger.info("Evaluation is off for this dataset; wrote %s", self.results_path)
            return {}
        if not self.lvis_gt.anns:
            warn_nothing_to_evaluate(self.json_file, self.results_path)
            return {}
        if not results:
            logger.warning("No predictions to evaluate; LVIS metrics are NaN")
            return {"bbox": {name: math.nan for name in LVIS_METRICS}}
        tasks = ("bbox", "segm") if "segmentation" in results[0] else ("bbox",)
        return {task: self._evaluate_task(results, task) for task in tasks}

    def _evaluate_task(self, results, iou_type):
        lvis_eval = run_lvis_eval(self.lvis_gt, results, iou_type, self.max_dets_per_image)
        values = lvis_eval.get_results()
        metrics = {
            name: float(values[name] * 100) if values[name] >= 0 else math.nan
            for name in LVIS_METRICS
        }
        logger.info("LVIS %s: %s", iou_type, ", ".join(f"{k}={v:.2f}" for k, v in metrics.items()))
        return metrics


def _load_lvis(json_file):
    """The lvis API's index of ``json_file``, checked as the training data is (the index keeps
    the last of repeated ids, which would score one image's boxes against another's)."""
    from lvis import LVIS

    lvis_gt = LVIS(json_file)
    check_coco_dataset(lvis_gt.dataset, json_file, image_key="coco_url")
    return lvis_gt


def run_lvis_eval(lvis_gt, results, iou_type, max_dets_per_image=LVIS_MAX_DETS):
    """Run LVISEval on result dicts (copied: the lvis API adds fields to them)."""
    from lvis import LVISEval, LVISResults

    results = copy.deepcopy(results)
    if iou_type == "segm":
        # Without the box, the lvis API uses the mask area for the small/medium/large bins.
        for result in results:
            result.pop("bbox", None)
    lvis_dt = LVISResults(lvis_gt, results, max_dets=max_dets_per_image)
    lvis_eval = LVISEval(lvis_gt, lvis_dt, iou_type)
    with lvis_numpy_compat():
        lvis_eval.run()
    return lvis_eval


class _NumpyWithFloatAlias:
    """numpy as seen by lvis.eval, plus the ``np.float`` alias that NumPy 1.24 removed."""

    float = float

    def __getattr__(self, name):
        return getattr(np, name)


@contextlib.contextmanager
def lvis_numpy_compat():
    """Let ``LVISEval`` run on NumPy >= 1.24.

    lvis 0.5.3, the latest release, calls ``np.float`` in ``accumulate``. Only the ``np`` name
    inside ``lvis.eval`` is swapped, and only while the block runs; numpy itself is untouched.
    """
    import lvis.eval

    original = lvis.eval.np
    lvis.eval.np = _NumpyWithFloatAlias()
    try:
        yield
    finally:
        lvis.eval.np = original

