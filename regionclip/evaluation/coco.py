"""COCO evaluation with pycocotools, plus the novel/base/all AP50 of the OVD split."""

import contextlib
import copy
import io
import logging
import math

import numpy as np
from pycocotools.cocoeval import COCOeval

from regionclip.data.coco import load_coco_api
from regionclip.evaluation.results import ResultsEvaluator

logger = logging.getLogger(__name__)

# Order of COCOeval.stats for boxes and masks.
COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
OVD_IOU = 0.5
OVD_MAX_DETS = 100


class COCOEvaluator(ResultsEvaluator):
    """Evaluate detections against a COCO-format json (AP numbers in percent).

    Args:
        json_file: ground-truth json.
        output_dir: folder for ``coco_instances_results.json`` ("" = do not write).
        contiguous_to_dataset_id: model class index -> json category id; default: the json's
            category ids in increasing order (the loader's contiguous order).
        novel_dataset_ids, base_dataset_ids: category ids of the OVD split; when both are
            given, ``AP50_novel``, ``AP50_base`` and ``AP50_all`` are added to the metrics.
        per_class: add ``AP-<class name>`` entries.
    """

    results_file_name = "coco_instances_results.json"

    def __init__(self, json_file, output_dir="", contiguous_to_dataset_id=None,
                 novel_dataset_ids=(), base_dataset_ids=(), per_class=True):
        self.json_file = json_file
        self.coco_gt = load_coco_api(json_file)
        if contiguous_to_dataset_id is None:
            contiguous_to_dataset_id = dict(enumerate(sorted(self.coco_gt.getCatIds())))
        super().__init__(output_dir, contiguous_to_dataset_id)
        self.novel_dataset_ids = frozenset(novel_dataset_ids)
        self.base_dataset_ids = frozenset(base_dataset_ids)
        self.per_class = per_class

    def evaluate(self, predictions=None):
        """Write the results json and return ``{"bbox": metrics, "segm": metrics?}``, or ``{}``
        when the json has no annotations to evaluate against.

        ``predictions`` defaults to what ``process`` collected in this process.
        """
        results = self._flatten_and_write(predictions)
        if not self.coco_gt.anns:
            warn_nothing_to_evaluate(self.json_file, self.results_path)
            return {}
        if not results:
            logger.warning("No predictions to evaluate; COCO metrics are NaN")
            return {"bbox": {name: math.nan for name in COCO_METRICS}}
        tasks = ("bbox", "segm") if "segmentation" in results[0] else ("bbox",)
        return {task: self._evaluate_task(results, task) for task in tasks}

    def _evaluate_task(self, results, iou_type):
        coco_eval = run_coco_eval(self.coco_gt, results, iou_type)
        metrics = {
            name: float(value * 100) if value >= 0 else math.nan
            for name, value in zip(COCO_METRICS, coco_eval.stats)
        }
        if self.per_class:
            metrics.update(per_class_ap(coco_eval, self.coco_gt))
        if self.novel_dataset_ids and self.base_dataset_ids:
            metrics.update(ovd_split_ap50(coco_eval, self.novel_dataset_ids, self.base_dataset_ids))
        logger.info("COCO %s: %s", iou_type, _format(metrics))
        return metrics


def warn_nothing_to_evaluate(json_file, results_path):
    logger.warning("%s has no annotations: there is nothing to evaluate the detections against "
                   "and no AP is reported%s", json_file,
                   f"; the detections are in {results_path}" if results_path else "")


def run_coco_eval(coco_gt, results, iou_type):
    """Run COCOeval (evaluate, accumulate, summarize) on result dicts; inputs not modified."""
    results = copy.deepcopy(results)
    if iou_type == "segm":
        # With a "bbox" present, pycocotools takes the box area as the instance area, which
        # would put masks into the wrong small/medium/large bins.
        for result in results:
            result.pop("bbox", None)
    coco_dt = _quiet(coco_gt.loadRes, results)
    coco_eval = COCOeval(coco_gt, coco_dt, iou_type)
    _quiet(coco_eval.evaluate)
    _quiet(coco_eval.accumulate)
    _quiet(coco_eval.summarize, level=logging.INFO)
    return coco_eval


def per_class_ap(coco_eval, coco_gt):
    """``{"AP-<name>": AP in percent}`` over IoU .50:.95, area all, 100 detections."""
    precision = coco_eval.eval["precision"]
    metrics = {}
    for index, cat_id in enumerate(coco_eval.params.catIds):
        values = precision[:, :, index, 0, -1]
        values = values[values > -1]
        name = coco_gt.cats[cat_id]["name"]
        metrics[f"AP-{name}"] = float(values.mean() * 100) if values.size else math.nan
    return metrics


def ovd_split_ap50(coco_eval, novel_ids, base_ids):
    """AP50 (percent) over the novel, base and all (novel + base) category ids.

    As in RegionCLIP: the precision array at IoU 0.5, area "all", 100 detections, averaged
    over its entries > -1 (classes without ground truth hold -1) for each group.
    """
    params = coco_eval.params
    iou_index = int(np.argmin(np.abs(params.iouThrs - OVD_IOU)))
    area_index = params.areaRngLbl.index("all")
    dets_index = params.maxDets.index(OVD_MAX_DETS)
    precision = coco_eval.eval["precision"][iou_index, :, :, area_index, dets_index]
    groups = {"novel": novel_ids, "base": base_ids, "all": novel_ids | base_ids}
    metrics = {}
    for group, ids in groups.items():
        columns = [k for k, cat_id in enumerate(params.catIds) if cat_id in ids]
        values = precision[:, columns]
        values = values[values > -1]
        metrics[f"AP50_{group}"] = float(values.mean() * 100) if values.size else math.nan
    return metrics


def _quiet(function, *args, level=logging.DEBUG):
    """Call a pycocotools function, sending what it prints to the log instead of stdout."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        result = function(*args)
    logger.log(level, "%s", buffer.getvalue().rstrip())
    return result


def _format(metrics):
    return ", ".join(f"{k}={v:.2f}" for k, v in metrics.items() if not k.startswith("AP-"))
