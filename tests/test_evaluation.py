"""Tests for regionclip.evaluation against pycocotools / lvis run directly on the written json."""

import json
import logging
import math
import os
from types import SimpleNamespace

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from _data_utils import make_coco_dataset, make_lvis_dataset
from lvis import LVIS, LVISEval
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from regionclip.data import catalog
from regionclip.evaluation import (
    COCOEvaluator,
    LVISEvaluator,
    build_evaluator,
    instances_to_coco_json,
    write_json_atomic,
)
from regionclip.evaluation.coco import COCO_METRICS, ovd_split_ap50
from regionclip.evaluation.lvis import LVIS_METRICS, lvis_numpy_compat
from regionclip.evaluation.results import finite_or_null
from regionclip.structures import Boxes, Instances

# COCO ids: 1 person and 3 car are OVD base classes, 17 cat and 18 dog are novel.
OVD_CATEGORIES = (
    {"id": 1, "name": "person"}, {"id": 3, "name": "car"},
    {"id": 17, "name": "cat"}, {"id": 18, "name": "dog"},
)


def _gt_predictions(json_path, label_shift=0, jitter=0.0, seed=0, with_masks=False):
    """(inputs, outputs) batches whose predictions are the ground truth, optionally altered.

    ``label_shift`` moves every contiguous label by that much (wrong classes); ``jitter``
    adds uniform noise (pixels) to the boxes. Scores are random so ranking matters.
    """
    with open(json_path) as f:
        gt = json.load(f)
    cat_ids = sorted(c["id"] for c in gt["categories"])
    rng = np.random.default_rng(seed)
    inputs, outputs = [], []
    for img in gt["images"]:
        anns = [a for a in gt["annotations"] if a["image_id"] == img["id"]]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
        boxes = boxes + torch.tensor(rng.uniform(-jitter, jitter, boxes.shape)).float()
        labels = [(cat_ids.index(a["category_id"]) + label_shift) % len(cat_ids) for a in anns]
        size = (img["height"], img["width"])
        instances = Instances(size, pred_boxes=Boxes(boxes),
                              scores=torch.tensor(rng.uniform(0.1, 1.0, len(anns))).float(),
                              pred_classes=torch.tensor(labels, dtype=torch.int64))
        if with_masks:
            instances.pred_masks = _box_masks(boxes, size)
        inputs.append({"image_id": img["id"]})
        outputs.append({"instances": instances})
    return inputs, outputs


def _box_masks(boxes, size):
    masks = torch.zeros((len(boxes), *size), dtype=torch.bool)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes.round().int().tolist()):
        mask[y0:y1, x0:x1] = True
    return masks


def _reference_coco(json_path, results_path, iou_type="bbox"):
    coco_gt = COCO(json_path)
    with open(results_path) as f:
        results = json.load(f)
    if iou_type == "segm":
        for result in results:
            result.pop("bbox")
    coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), iou_type)
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    return coco_eval


def _assert_matches_coco(metrics, coco_eval):
    for name, value in zip(COCO_METRICS, coco_eval.stats):
        expected = value * 100 if value >= 0 else math.nan
        np.testing.assert_allclose(metrics[name], expected, rtol=1e-12, err_msg=name)


@pytest.fixture
def coco_set(tmp_path):
    return make_coco_dataset(str(tmp_path / "data"), num_images=6, boxes_per_image=3,
                             categories=OVD_CATEGORIES, image_size=(120, 160))


def _run(evaluator, inputs, outputs, batch_size=2):
    evaluator.reset()
    for start in range(0, len(inputs), batch_size):
        evaluator.process(inputs[start:start + batch_size], outputs[start:start + batch_size])
    return evaluator.evaluate()


def test_coco_perfect_and_shuffled(coco_set, tmp_path):
    json_path, _ = coco_set
    evaluator = COCOEvaluator(json_path, str(tmp_path / "out"))
    perfect = _run(evaluator, *_gt_predictions(json_path))["bbox"]
    assert perfect["AP"] == pytest.approx(100.0) and perfect["AP50"] == pytest.approx(100.0)
    assert perfect["AP-dog"] == pytest.approx(100.0)
    shuffled = _run(evaluator, *_gt_predictions(json_path, label_shift=1))["bbox"]
    assert shuffled["AP"] < 1.0
    _assert_matches_coco(shuffled, _reference_coco(json_path, evaluator.results_path))


def test_coco_metrics_equal_pycocotools(coco_set, tmp_path):
    json_path, _ = coco_set
    evaluator = COCOEvaluator(json_path, str(tmp_path / "out"))
    inputs, outputs = _gt_predictions(json_path, jitter=6.0, seed=3)
    _, wrong = _gt_predictions(json_path, label_shift=2, jitter=3.0, seed=4)
    for out, extra in zip(outputs, wrong):  # add false positives to every image
        out["instances"] = Instances.cat([out["instances"], extra["instances"]])
    metrics = _run(evaluator, inputs, outputs)["bbox"]
    assert evaluator.results_path == str(tmp_path / "out" / "coco_instances_results.json")
    with open(evaluator.results_path) as f:
        written = json.load(f)
    assert {r["category_id"] for r in written} == {1, 3, 17, 18}
    coco_eval = _reference_coco(json_path, evaluator.results_path)
    _assert_matches_coco(metrics, coco_eval)
    assert 0.0 < metrics["AP"] < 100.0
    precision = coco_eval.eval["precision"][:, :, 2, 0, -1]
    assert metrics["AP-cat"] == pytest.approx(precision[precision > -1].mean() * 100)


def test_coco_ovd_split_ap50(coco_set, tmp_path):
    json_path, _ = coco_set
    evaluator = COCOEvaluator(json_path, str(tmp_path / "out"), novel_dataset_ids={17, 18},
                              base_dataset_ids={1, 3})
    inputs, outputs = _gt_predictions(json_path, jitter=8.0, seed=5)
    for out in outputs:  # every base-class box becomes a "person" prediction
        instances = out["instances"]
        instances.pred_classes = torch.where(instances.pred_classes == 1, 0,
                                             instances.pred_classes)
    metrics = _run(evaluator, inputs, outputs)["bbox"]
    coco_eval = _reference_coco(json_path, evaluator.results_path)
    # COCOeval's precision array [iou, recall, class, area, maxdets]: IoU 0.5, area all, 100.
    at50 = coco_eval.eval["precision"][0, :, :, 0, 2]
    expected = {"novel": at50[:, [2, 3]], "base": at50[:, [0, 1]], "all": at50}
    for group, values in expected.items():
        hand = values[values > -1].mean() * 100
        assert metrics[f"AP50_{group}"] == pytest.approx(hand, rel=1e-12)
    assert metrics["AP50_all"] == pytest.approx(metrics["AP50"])
    assert metrics["AP50_novel"] > metrics["AP50_base"]


def test_ovd_all_covers_novel_and_base_only():
    """A class in neither split (COCO's 15 classes outside OV-COCO's 65) is not in "all"."""
    params = SimpleNamespace(iouThrs=np.array([0.5, 0.75]), areaRngLbl=["all", "small"],
                             maxDets=[1, 100], catIds=[1, 3, 17, 99])
    precision = -np.ones((2, 2, 4, 2, 2))  # [iou, recall, class, area, maxdets]
    precision[0, :, :, 0, 1] = [[0.2, 0.4, 0.8, 0.0], [0.2, -1, 0.6, 0.0]]  # -1: no such recall
    metrics = ovd_split_ap50(SimpleNamespace(params=params, eval={"precision": precision}),
                             novel_ids={17}, base_ids={1, 3})
    assert metrics["AP50_novel"] == pytest.approx(70.0)  # (0.8 + 0.6) / 2
    assert metrics["AP50_base"] == pytest.approx(80.0 / 3)  # (0.2 + 0.4 + 0.2) / 3
    assert metrics["AP50_all"] == pytest.approx(44.0)  # the five entries of 1, 3 and 17


def test_coco_gathered_predictions_equal_single_process(coco_set):
    json_path, _ = coco_set
    inputs, outputs = _gt_predictions(json_path, jitter=5.0, seed=7)
    single = COCOEvaluator(json_path)
    expected = _run(single, inputs, outputs)
    first, second = COCOEvaluator(json_path), COCOEvaluator(json_path)
    first.process(inputs[:3], outputs[:3])
    second.process(inputs[3:], outputs[3:])
    gathered = first.evaluate(first.predictions + second.predictions)
    assert gathered == expected


def test_coco_empty_predictions(coco_set, tmp_path, caplog):
    json_path, _ = coco_set
    evaluator = COCOEvaluator(json_path, str(tmp_path / "out"))
    empty = Instances((120, 160), pred_boxes=Boxes(torch.zeros(0, 4)), scores=torch.zeros(0),
                      pred_classes=torch.zeros(0, dtype=torch.int64))
    with caplog.at_level(logging.WARNING):
        metrics = _run(evaluator, [{"image_id": 1}], [{"instances": empty}])
    assert all(math.isnan(v) for v in metrics["bbox"].values())
    assert "No predictions" in caplog.text
    with open(evaluator.results_path) as f:
        assert json.load(f) == []


def test_coco_segm_equals_pycocotools(coco_set, tmp_path):
    json_path, _ = coco_set
    evaluator = COCOEvaluator(json_path, str(tmp_path / "out"))
    metrics = _run(evaluator, *_gt_predictions(json_path, jitter=4.0, with_masks=True))
    assert set(metrics) == {"bbox", "segm"}
    _assert_matches_coco(metrics["segm"], _reference_coco(json_path, evaluator.results_path,
                                                          "segm"))
    _assert_matches_coco(metrics["bbox"], _reference_coco(json_path, evaluator.results_path))


def test_instances_to_coco_json():
    masks = torch.zeros((2, 6, 8), dtype=torch.bool)
    masks[0, 1:3, 2:5] = True
    instances = Instances((6, 8), pred_boxes=Boxes(torch.tensor([[1.0, 2.0, 4.0, 6.0],
                                                                 [0.5, 0.0, 8.0, 1.5]])),
                          scores=torch.tensor([0.9, 0.25]),
                          pred_classes=torch.tensor([1, 0]), pred_masks=masks)
    results = instances_to_coco_json(instances, 42, {0: 7, 1: 9})
    assert [r["category_id"] for r in results] == [9, 7]
    assert results[0]["bbox"] == [1.0, 2.0, 3.0, 4.0] and results[1]["bbox"] == [0.5, 0, 7.5, 1.5]
    assert results[1]["score"] == pytest.approx(0.25) and results[0]["image_id"] == 42
    assert isinstance(results[0]["segmentation"]["counts"], str)
    rle = dict(results[0]["segmentation"], counts=results[0]["segmentation"]["counts"].encode())
    np.testing.assert_array_equal(mask_util.decode(rle), masks[0].numpy())
    json.dumps(results)
    assert instances_to_coco_json(instances[:0], 42) == []
    assert instances_to_coco_json(instances, 1)[0]["category_id"] == 1


def test_write_json_atomic_leaves_no_partial_file(tmp_path):
    path = tmp_path / "sub" / "results.json"
    write_json_atomic([{"a": 1}], str(path))
    assert json.loads(path.read_text()) == [{"a": 1}]
    with pytest.raises(TypeError):
        write_json_atomic([{"a": 1}, {"b": object()}], str(path))
    assert json.loads(path.read_text()) == [{"a": 1}]
    assert os.listdir(path.parent) == ["results.json"]
    fresh = tmp_path / "fresh.json"
    with pytest.raises(TypeError):
        write_json_atomic({"x": {1, 2}}, str(fresh))
    assert not fresh.exists() and sorted(os.listdir(tmp_path)) == ["sub"]


def test_finite_or_null_turns_every_non_finite_float_into_null():
    metrics = {"bbox": {"AP": 1.5, "APs": math.nan, "curve": [math.inf, 2.0, -math.inf]},
               "n": 3, "name": "nan"}
    text = json.dumps(finite_or_null(metrics), allow_nan=False)
    assert json.loads(text) == {"bbox": {"AP": 1.5, "APs": None, "curve": [None, 2.0, None]},
                                "n": 3, "name": "nan"}
    assert math.isnan(metrics["bbox"]["APs"])  # the caller's dict is not changed


# ---------------------------------------------------------------- LVIS


@pytest.fixture
def lvis_set(tmp_path):
    return make_lvis_dataset(str(tmp_path / "lvis"), num_images=5, boxes_per_image=3,
                             image_size=(120, 160))


def _reference_lvis(json_path, results_path, iou_type="bbox"):
    lvis_eval = LVISEval(LVIS(json_path), results_path, iou_type)
    with lvis_numpy_compat():  # lvis 0.5.3 uses np.float (removed in NumPy 1.24)
        lvis_eval.run()
    return lvis_eval.get_results()


def test_lvis_metrics_equal_lvis_api(lvis_set, tmp_path):
    json_path, _ = lvis_set
    evaluator = LVISEvaluator(json_path, str(tmp_path / "out"))
    perfect = _run(evaluator, *_gt_predictions(json_path))["bbox"]
    assert perfect["AP"] == pytest.approx(100.0) and perfect["APr"] == pytest.approx(100.0)
    inputs, outputs = _gt_predictions(json_path, jitter=6.0, seed=2)
    _, shifted = _gt_predictions(json_path, label_shift=1, seed=3)
    for out, extra in zip(outputs, shifted):
        out["instances"] = Instances.cat([out["instances"], extra["instances"]])
    metrics = _run(evaluator, inputs, outputs)["bbox"]
    assert evaluator.results_path.endswith("lvis_instances_results.json")
    reference = _reference_lvis(json_path, evaluator.results_path)
    for name in LVIS_METRICS:
        expected = reference[name] * 100 if reference[name] >= 0 else math.nan
        np.testing.assert_allclose(metrics[name], expected, rtol=1e-12, err_msg=name)
    assert metrics["AP"] < perfect["AP"]


def test_lvis_segm_and_empty(lvis_set, tmp_path):
    json_path, _ = lvis_set
    evaluator = LVISEvaluator(json_path, str(tmp_path / "out"))
    metrics = _run(evaluator, *_gt_predictions(json_path, jitter=3.0, with_masks=True))
    reference = _reference_lvis(json_path, evaluator.results_path, "segm")
    assert metrics["segm"]["AP"] == pytest.approx(reference["AP"] * 100, rel=1e-12)
    evaluator.reset()
    assert all(math.isnan(v) for v in evaluator.evaluate()["bbox"].values())


def test_lvis_without_evaluation_writes_json_only(tmp_path):
    evaluator = LVISEvaluator(str(tmp_path / "absent.json"), str(tmp_path / "out"),
                              contiguous_to_dataset_id={0: 1, 1: 2}, run_evaluation=False)
    instances = Instances((10, 10), pred_boxes=Boxes(torch.tensor([[0.0, 0.0, 5.0, 5.0]])),
                          scores=torch.tensor([0.5]), pred_classes=torch.tensor([1]))
    assert _run(evaluator, [{"image_id": 0}], [{"instances": instances}]) == {}
    with open(evaluator.results_path) as f:
        assert [r["category_id"] for r in json.load(f)] == [2]
    with pytest.raises(ValueError, match="contiguous_to_dataset_id"):
        LVISEvaluator(str(tmp_path / "absent.json"), run_evaluation=False)


def test_build_evaluator_from_catalog(tmp_path, monkeypatch, coco_set):
    monkeypatch.setenv(catalog.DATASETS_ENV, str(tmp_path))
    json_path, image_dir = coco_set
    evaluator = build_evaluator(f"coco_json:{json_path}:{image_dir}", str(tmp_path / "out"))
    assert isinstance(evaluator, COCOEvaluator) and not evaluator.novel_dataset_ids
    make_lvis_dataset(str(tmp_path / "coco"), json_name="../lvis/lvis_v1_val.json")
    custom = build_evaluator("lvis_v1_val_custom_img", str(tmp_path / "out"))
    assert isinstance(custom, LVISEvaluator) and not custom.run_evaluation
    assert custom.contiguous_to_dataset_id == {0: 1, 1: 2, 2: 3, 3: 4}
    ovd_json = tmp_path / "coco" / "annotations" / "ovd_ins_val2017_all.json"
    ovd_json.parent.mkdir(parents=True)
    ovd_json.write_text(open(json_path).read())
    ovd = build_evaluator("coco_2017_ovd_all_test", str(tmp_path / "out"))
    assert ovd.novel_dataset_ids == {17, 18} and ovd.base_dataset_ids == {1, 3}


@pytest.mark.parametrize("batch_size", [2, 4])
def test_batched_inference_loader_equals_one_image_per_batch(coco_set, batch_size):
    # TEST.IMS_PER_BATCH: batches in dataset order; the evaluation sees every image once.
    from _engine_utils import GroundTruthDetector

    from regionclip.data.loader import build_test_loader
    from regionclip.data.mapper import InferenceMapper
    from regionclip.evaluation.inference import inference_on_dataset

    json_path, image_dir = coco_set
    records = catalog.get_dataset_dicts(f"coco_json:{json_path}:{image_dir}")
    mapper = InferenceMapper(min_size=0, keep_annotations=True)
    sizes = []

    class Recording(GroundTruthDetector):
        def forward(self, inputs):
            sizes.append(len(inputs))
            return super().forward(inputs)

    one = inference_on_dataset(GroundTruthDetector(), build_test_loader(records, mapper),
                               COCOEvaluator(json_path))
    batched = inference_on_dataset(Recording(), build_test_loader(
        records, mapper, batch_size=batch_size), COCOEvaluator(json_path))
    assert batched == one and 0 < one["bbox"]["AP"] < 100
    assert sizes == [batch_size] * (6 // batch_size) + [6 % batch_size] * (6 % batch_size > 0)
    with pytest.raises(ValueError, match="TEST.IMS_PER_BATCH"):
        build_test_loader(records, mapper, batch_size=0)
