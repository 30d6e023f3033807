"""End-to-end tests of the README's zero-shot commands on generated checkpoints, vocabularies and
data, and of train_net's evaluation on bad and unusual input (the visualisation and feature tools
on their own: test_visualize_tool.py, test_feature_tools.py).

The README's two zero-shot flows run as subprocesses with the README's command lines, in a
temporary folder laid out like the repository (``./configs``, ``./tools``, ``./pretrained_ckpt``,
``./datasets``, ``./output``). Everything else calls the tools' ``main`` in-process with the same
argument lists and the tiny CLIP variant, which keeps the file fast.
"""
import contextlib
import io
import json
import math
import os

import numpy as np
import pytest
import torch
from _checkpoint_utils import pretrained_shapes
from _data_utils import coco_json_dataset, make_coco_dataset, make_lvis_dataset
from _e2e_utils import (
    TINY_CONFIG,
    link_repo_dirs,
    lvis_categories,
    ovd_categories_novel_first,
    rectangles_image,
    run_tool,
    sane_state_dict,
    save_checkpoint_file,
    save_embedding_file,
    save_exif_rotated_jpeg,
    save_image,
    tiny_checkpoint,
    write_json,
)
from _tool_utils import load_tool, run_train_net
from lvis import LVIS, LVISEval, LVISResults
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from regionclip.data import coco_ovd
from regionclip.data.catalog import get_metadata
from regionclip.data.mapper import ImageReadError, read_image
from regionclip.evaluation.lvis import lvis_numpy_compat
from regionclip.visualization import draw_predictions, select_predictions

TINY_DIM = 32
RN50X4_WEIGHTS = "./pretrained_ckpt/regionclip/regionclip_pretrained-cc_rn50x4.pth"
RN50X4_LVIS_EMB = "./pretrained_ckpt/concept_emb/lvis_1203_cls_emb_rn50x4.pth"
RN50_WEIGHTS = "./pretrained_ckpt/regionclip/regionclip_pretrained-cc_rn50.pth"
RN50_COCO_EMB = "./pretrained_ckpt/concept_emb/coco_65_cls_emb.pth"
LVIS_RPN_CONFIG = "./configs/LVISv1-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"
CUSTOM_IMG_CONFIG = "./configs/LVISv1-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_custom_img.yaml"
README_CUSTOM_DETECT = [
    "./tools/train_net.py", "--eval-only", "--num-gpus", "1",
    "--config-file", CUSTOM_IMG_CONFIG,
    "MODEL.WEIGHTS", RN50X4_WEIGHTS,
    "MODEL.CLIP.TEXT_EMB_PATH", RN50X4_LVIS_EMB,
    "MODEL.CLIP.OFFLINE_RPN_CONFIG", LVIS_RPN_CONFIG,
    "MODEL.CLIP.TEXT_EMB_DIM", "640",
    "MODEL.RESNETS.DEPTH", "200",
    "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", "18",
]
README_VISUALIZE = [
    "--input", "./output/inference/lvis_instances_results.json",
    "--output", "./output/regions",
    "--dataset", "lvis_v1_val_custom_img",
    "--conf-threshold", "0.05",
    "--show-unique-boxes",
    "--max-boxes", "25",
    "--small-region-px", "8100",
]
README_COCO_EVAL = [
    "./tools/train_net.py", "--eval-only", "--num-gpus", "1",
    "--config-file", "./configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_ovd_zsinf.yaml",
    "MODEL.WEIGHTS", RN50_WEIGHTS,
    "MODEL.CLIP.TEXT_EMB_PATH", RN50_COCO_EMB,
    "MODEL.CLIP.CROP_REGION_TYPE", "GT",
    "MODEL.CLIP.MULTIPLY_RPN_SCORE", "False",
]
# Appended to the README command lines (which stay as they are): what a CPU user would add. The
# flow, the architecture and the checks do not depend on these sizes; the run time does (1000
# RN50x4 regions at 800 px took 200 s on two cores).
CPU_SIZED_IMAGES = ["INPUT.MIN_SIZE_TEST", "400", "INPUT.MAX_SIZE_TEST", "667"]
CPU_SIZED = ["MODEL.CLIP.OFFLINE_RPN_POST_NMS_TOPK_TEST", "100", *CPU_SIZED_IMAGES]
COCO_METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
LVIS_METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")


# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tools():
    names = ("train_net", "visualize_json_results")
    return {name: load_tool(name) for name in names}


def _nan_equal(a, b, tol=1e-6):
    """Equal within ``tol``, or both NaN (metrics.json writes NaN as null)."""
    a, b = (math.nan if value is None else value for value in (a, b))
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol


def _assert_metrics_equal(ours, reference, names):
    for name in names:
        assert _nan_equal(ours[name], reference[name]), (name, ours[name], reference[name])


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _gt_boxes_by_image(json_path):
    """image id -> list of GT xywh boxes (of every annotation)."""
    boxes = {}
    for ann in _read_json(json_path)["annotations"]:
        boxes.setdefault(ann["image_id"], []).append(ann["bbox"])
    return boxes


def _assert_boxes_are_gt(results, gt_boxes, atol=1e-3):
    """With ground-truth boxes as regions, every detection box is one of its image's boxes."""
    assert results, "no detection to check"
    for result in results:
        candidates = np.array(gt_boxes[result["image_id"]], dtype=np.float64)
        error = np.abs(candidates - np.array(result["bbox"])).max(axis=1).min()
        assert error < atol, (result, candidates)


def _tiny_gt_argv(tmp_path, dataset, num_classes=3, emb_path=None, extra=()):
    """train_net arguments: tiny model, GT boxes, one dataset."""
    weights = tiny_checkpoint(tmp_path / "tiny.pth")
    emb_path = emb_path or save_embedding_file(tmp_path / "emb.pth", num_classes, TINY_DIM)
    return ["--eval-only", "--config-file", str(TINY_CONFIG), "MODEL.WEIGHTS", weights,
            "MODEL.CLIP.TEXT_EMB_PATH", str(emb_path),
            "MODEL.ROI_HEADS.NUM_CLASSES", str(num_classes),
            "DATASETS.TEST", f'("{dataset}",)', "OUTPUT_DIR", str(tmp_path / "out"), *extra]


# ------------------------------------------------------------------------------------------
# (a) README: zero-shot detection on custom images with RN50x4, then visualisation
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_readme_custom_images_rn50x4_then_visualize(tmp_path, tools, monkeypatch):
    link_repo_dirs(tmp_path)
    save_checkpoint_file(tmp_path / RN50X4_WEIGHTS,
                         sane_state_dict(pretrained_shapes("RN50x4", rpn=True)))
    save_embedding_file(tmp_path / RN50X4_LVIS_EMB, 1203, 640)
    write_json(tmp_path / "datasets/lvis/lvis_v1_val.json",
               {"images": [], "annotations": [], "categories": lvis_categories()})
    image_path = tmp_path / "datasets/custom_images/street.png"
    os.makedirs(image_path.parent)
    Image.fromarray(rectangles_image(240, 320)).save(image_path)

    log = run_tool(README_CUSTOM_DETECT + CPU_SIZED, tmp_path, tmp_path / "datasets").stdout

    # the pretrained file has no box predictor: said at INFO, with why; nothing else is missing
    for part in ("cls_bg_score (1 tensors): the background", "bbox_pred (2 tensors): box deltas"):
        assert f"Missing by design (kept their initialisation): roi_heads.box_predictor.{part}" \
            in log
    warnings = [line for line in log.splitlines() if " WARNING] " in line]
    assert "tensors missing" not in log
    assert all("no GPU is available" in line for line in warnings), warnings
    results = _read_json(tmp_path / README_VISUALIZE[1])
    assert results, "the random model should still report detections"
    assert len(results) <= 300  # TEST.DETECTIONS_PER_IMAGE of the LVIS configs
    for r in results:
        x, y, w, h = r["bbox"]
        assert r["image_id"] == 1 and 1 <= r["category_id"] <= 1203  # ids from 1, as detect's
        assert 0 <= x and 0 <= y and x + w <= 320 + 1e-3 and y + h <= 240 + 1e-3
        assert math.isfinite(r["score"]) and r["score"] > 0.02  # SCORE_THRESH_TEST

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "datasets"))
    tools["visualize_json_results"].main(README_VISUALIZE)
    drawn = read_image(tmp_path / "output/regions/street.png", "BGR")
    meta = get_metadata("lvis_v1_val_custom_img")
    selected = select_predictions(results, 0.05, True, 25, 8100)
    assert selected, "some large boxes pass the README's filters"
    expected = draw_predictions(read_image(image_path, "BGR"), selected, meta.thing_classes,
                                meta.thing_dataset_id_to_contiguous_id)
    np.testing.assert_array_equal(drawn, expected)


# ------------------------------------------------------------------------------------------
# (b) README: COCO zero-shot evaluation with ground-truth boxes, RN50
# ------------------------------------------------------------------------------------------
def _reference_coco_metrics(gt_json, results_json):
    """pycocotools run directly, plus the OVD AP50 split computed from its precision array."""
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO(gt_json)
        evaluator = COCOeval(gt, gt.loadRes(results_json), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    metrics = {name: value * 100 if value >= 0 else math.nan
               for name, value in zip(COCO_METRIC_NAMES, evaluator.stats)}
    precision = evaluator.eval["precision"][0, :, :, 0, 2]  # IoU 0.5, area all, 100 dets
    cat_ids = evaluator.params.catIds
    groups = {"novel": coco_ovd.NOVEL_IDS, "base": coco_ovd.BASE_IDS, "all": coco_ovd.ALL_IDS}
    for group, ids in groups.items():
        values = precision[:, [k for k, c in enumerate(cat_ids) if c in ids]]
        values = values[values > -1]
        metrics[f"AP50_{group}"] = values.mean() * 100 if values.size else math.nan
    return metrics


@pytest.mark.slow
def test_readme_coco_zero_shot_gt_boxes_rn50(tmp_path):
    link_repo_dirs(tmp_path)
    save_checkpoint_file(tmp_path / RN50_WEIGHTS,
                         sane_state_dict(pretrained_shapes("RN50", rpn=True), seed=1))
    save_embedding_file(tmp_path / RN50_COCO_EMB, 65, 1024)
    gt_json, _ = make_coco_dataset(  # image 1: a novel and a base class, image 2: base, novel
        tmp_path / "datasets/coco", num_images=2, categories=ovd_categories_novel_first(),
        json_name="annotations/ovd_ins_val2017_all.json", image_dirname="val2017")

    run_tool(README_COCO_EVAL + CPU_SIZED_IMAGES, tmp_path, tmp_path / "datasets")

    results_json = tmp_path / "output/inference/coco_instances_results.json"
    results = _read_json(results_json)
    _assert_boxes_are_gt(results, _gt_boxes_by_image(gt_json))
    metrics = _read_json(tmp_path / "output/inference/metrics.json")
    ours = metrics["coco_2017_ovd_all_test"]["bbox"]
    names = COCO_METRIC_NAMES + ("AP50_novel", "AP50_base", "AP50_all")
    _assert_metrics_equal(ours, _reference_coco_metrics(gt_json, str(results_json)), names)
    assert not math.isnan(ours["AP50_novel"]) and not math.isnan(ours["AP50_base"])


# ------------------------------------------------------------------------------------------
# (c) the same flow in LVIS format (tiny model)
# ------------------------------------------------------------------------------------------
def test_lvis_gt_boxes_metrics_equal_lvis_api(tmp_path, tools, monkeypatch):
    root = tmp_path / "datasets"
    gt_json, _ = make_lvis_dataset(root / "coco", num_images=3,
                                   json_name="../lvis/lvis_v1_val.json")
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    argv = _tiny_gt_argv(tmp_path, "lvis_v1_val", num_classes=4,
                         extra=["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0001"])
    ours = run_train_net(argv)["lvis_v1_val"]["bbox"]

    results_json = tmp_path / "out/inference/lvis_instances_results.json"
    results = _read_json(results_json)
    assert results
    _assert_boxes_are_gt(results, _gt_boxes_by_image(gt_json))
    gt = LVIS(gt_json)
    evaluator = LVISEval(gt, LVISResults(gt, str(results_json), max_dets=300), "bbox")
    with lvis_numpy_compat():
        evaluator.run()
    reference = {k: v * 100 if v >= 0 else math.nan for k, v in evaluator.get_results().items()}
    _assert_metrics_equal(ours, reference, LVIS_METRIC_NAMES)


# ------------------------------------------------------------------------------------------
# (d) bad and unusual input
# ------------------------------------------------------------------------------------------
def _results_path(tmp_path):
    return tmp_path / "out/inference/coco_instances_results.json"


def test_missing_image_file_is_an_error_before_inference(tmp_path, tools):
    _, image_dir, dataset = coco_json_dataset(tmp_path / "data")
    os.remove(os.path.join(image_dir, "000001.png"))
    with pytest.raises(FileNotFoundError, match="000001.png"):
        run_train_net(_tiny_gt_argv(tmp_path, dataset))
    assert not _results_path(tmp_path).exists()


def test_corrupt_image_is_an_error_naming_the_file(tmp_path, tools):
    _, image_dir, dataset = coco_json_dataset(tmp_path / "data")
    with open(os.path.join(image_dir, "000002.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ImageReadError, match="000002.png"):
        run_train_net(_tiny_gt_argv(tmp_path, dataset))
    assert not _results_path(tmp_path).exists()


def test_greyscale_rgba_16bit_and_exif_rotated_images_work(tmp_path, tools):
    """Every image mode decodes; detections are in the coordinates of the upright image."""
    json_path, image_dir, dataset = coco_json_dataset(tmp_path / "data", num_images=4,
                                                      image_size=(48, 64))
    content = _read_json(json_path)
    for img, mode in zip(content["images"], ("L", "RGBA", "I;16")):
        path = os.path.join(image_dir, img["file_name"])
        save_image(path, np.asarray(Image.open(path).convert("RGB")), mode)
    rotated = content["images"][3]
    upright = np.asarray(Image.open(os.path.join(image_dir, rotated["file_name"])))
    rotated["file_name"] = "rotated.jpg"
    save_exif_rotated_jpeg(os.path.join(image_dir, "rotated.jpg"), upright)
    assert Image.open(os.path.join(image_dir, "rotated.jpg")).size == (48, 64)  # stored w, h
    write_json(json_path, content)

    run_train_net(_tiny_gt_argv(tmp_path, dataset))
    results = _read_json(_results_path(tmp_path))
    assert {r["image_id"] for r in results} == {1, 2, 3, 4}
    _assert_boxes_are_gt(results, _gt_boxes_by_image(json_path))


@pytest.mark.parametrize("rows, width, message", [
    (0, TINY_DIM, "0 class embeddings"),
    (3, 16, "16-dim embeddings, expected 32"),
])
def test_bad_vocabulary_file_is_a_clear_error(tmp_path, tools, rows, width, message):
    _, _, dataset = coco_json_dataset(tmp_path / "data")
    emb = tmp_path / "bad_emb.pth"
    torch.save(torch.randn(rows, width), emb)
    with pytest.raises(ValueError, match=message):
        run_train_net(_tiny_gt_argv(tmp_path, dataset, emb_path=emb))
    assert not _results_path(tmp_path).exists()


def test_degenerate_gt_boxes_are_dropped_or_clipped_with_a_warning(tmp_path, tools, capsys):
    json_path, _, dataset = coco_json_dataset(tmp_path / "data", num_images=2, image_size=(48, 64))
    content = _read_json(json_path)
    extra = [[10, 10, 0, 12], [70, 5, 10, 10], [50, 30, 30, 30]]  # zero width, outside, partly
    for k, box in enumerate(extra):
        content["annotations"].append({"id": 100 + k, "image_id": 1, "category_id": 1,
                                       "bbox": box, "area": 1.0, "iscrowd": 0})
    write_json(json_path, content)

    run_train_net(_tiny_gt_argv(tmp_path, dataset))
    log = capsys.readouterr().out
    assert "2 annotations with an empty box" in log and "were clipped" in log
    results = _read_json(_results_path(tmp_path))
    boxes = {tuple(np.round(r["bbox"], 3)) for r in results if r["image_id"] == 1}
    assert (50.0, 30.0, 14.0, 18.0) in boxes  # the clipped box, as the loader clipped it
    for x, y, w, h in boxes:
        assert w > 0 and h > 0 and x + w <= 64 + 1e-3 and y + h <= 48 + 1e-3


def test_images_without_annotations_get_no_detections(tmp_path, tools, capsys):
    json_path, _, dataset = coco_json_dataset(tmp_path / "data", num_images=3)
    content = _read_json(json_path)
    content["annotations"] = [a for a in content["annotations"] if a["image_id"] != 2]
    write_json(json_path, content)

    run_train_net(_tiny_gt_argv(tmp_path, dataset))
    assert "1 of 3 images have no usable annotations" in capsys.readouterr().out
    results = _read_json(_results_path(tmp_path))
    assert {r["image_id"] for r in results} == {1, 3}
