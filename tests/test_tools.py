"""End-to-end tests of the command-line tools on generated checkpoints, vocabularies and data.

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
import open_clip
import pytest
import torch
import torch.nn.functional as F
from _checkpoint_utils import pretrained_shapes
from _clip_utils import openclip_reference, text_state_dict
from _data_utils import make_coco_dataset, make_lvis_dataset
from _e2e_utils import (
    TINY_CONFIG,
    TINY_RPN_FPN,
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
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from regionclip.config import load_config
from regionclip.data import coco_ovd
from regionclip.data.catalog import get_metadata
from regionclip.data.coco import load_image_folder
from regionclip.data.mapper import ImageReadError, build_inference_mapper, read_image
from regionclip.engine.weights import load_weights
from regionclip.evaluation.lvis import lvis_numpy_compat
from regionclip.modeling.build import build_model
from regionclip.structures import Boxes, Instances
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
    names = ("train_net", "visualize_json_results", "extract_region_features",
             "extract_concept_features")
    return {name: load_tool(name) for name in names}


def _nan_equal(a, b, tol=1e-6):
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
    for result in results:
        candidates = np.array(gt_boxes[result["image_id"]], dtype=np.float64)
        error = np.abs(candidates - np.array(result["bbox"])).max(axis=1).min()
        assert error < atol, (result, candidates)


def _tiny_coco(root, num_images=3, **kwargs):
    """A COCO-format dataset (the 3 default classes) usable as ``coco_json:<json>:<dir>``."""
    json_path, image_dir = make_coco_dataset(root, num_images=num_images, **kwargs)
    return json_path, image_dir, f"coco_json:{json_path}:{image_dir}"


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
    _, image_dir, dataset = _tiny_coco(tmp_path / "data")
    os.remove(os.path.join(image_dir, "000001.png"))
    with pytest.raises(FileNotFoundError, match="000001.png"):
        run_train_net(_tiny_gt_argv(tmp_path, dataset))
    assert not _results_path(tmp_path).exists()


def test_corrupt_image_is_an_error_naming_the_file(tmp_path, tools):
    _, image_dir, dataset = _tiny_coco(tmp_path / "data")
    with open(os.path.join(image_dir, "000002.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ImageReadError, match="000002.png"):
        run_train_net(_tiny_gt_argv(tmp_path, dataset))
    assert not _results_path(tmp_path).exists()


def test_greyscale_rgba_16bit_and_exif_rotated_images_work(tmp_path, tools):
    """Every image mode decodes; detections are in the coordinates of the upright image."""
    json_path, image_dir, dataset = _tiny_coco(tmp_path / "data", num_images=4,
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
    _, _, dataset = _tiny_coco(tmp_path / "data")
    emb = tmp_path / "bad_emb.pth"
    torch.save(torch.randn(rows, width), emb)
    with pytest.raises(ValueError, match=message):
        run_train_net(_tiny_gt_argv(tmp_path, dataset, emb_path=emb))
    assert not _results_path(tmp_path).exists()


def test_degenerate_gt_boxes_are_dropped_or_clipped_with_a_warning(tmp_path, tools, capsys):
    json_path, _, dataset = _tiny_coco(tmp_path / "data", num_images=2, image_size=(48, 64))
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
    json_path, _, dataset = _tiny_coco(tmp_path / "data", num_images=3)
    content = _read_json(json_path)
    content["annotations"] = [a for a in content["annotations"] if a["image_id"] != 2]
    write_json(json_path, content)

    run_train_net(_tiny_gt_argv(tmp_path, dataset))
    assert "1 of 3 images have no usable annotations" in capsys.readouterr().out
    results = _read_json(_results_path(tmp_path))
    assert {r["image_id"] for r in results} == {1, 3}


# ------------------------------------------------------------------------------------------
# visualize_json_results on other datasets, and its errors
# ------------------------------------------------------------------------------------------
def test_visualize_draws_every_image_upright_with_its_predictions(tmp_path, tools):
    json_path, image_dir, dataset = _tiny_coco(tmp_path / "data", num_images=3,
                                               image_size=(48, 64))
    content = _read_json(json_path)
    rotated = content["images"][2]
    upright = np.asarray(Image.open(os.path.join(image_dir, rotated["file_name"])))
    rotated["file_name"] = "rotated.jpg"
    save_exif_rotated_jpeg(os.path.join(image_dir, "rotated.jpg"), upright)
    write_json(json_path, content)
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                "score": 0.9} for a in content["annotations"] if a["image_id"] != 1]
    write_json(tmp_path / "results.json", results)

    tools["visualize_json_results"].main(["--input", str(tmp_path / "results.json"),
                                          "--output", str(tmp_path / "drawn"),
                                          "--dataset", dataset])
    assert sorted(os.listdir(tmp_path / "drawn")) == ["000000.png", "000001.png", "rotated.jpg"]
    meta = get_metadata(dataset)
    for img in content["images"][:2]:
        source = read_image(os.path.join(image_dir, img["file_name"]), "BGR")
        mine = [r for r in results if r["image_id"] == img["id"]]
        expected = draw_predictions(source, mine, meta.thing_classes,
                                    meta.thing_dataset_id_to_contiguous_id)
        drawn = read_image(tmp_path / "drawn" / img["file_name"], "BGR")
        np.testing.assert_array_equal(drawn, expected)
        assert np.array_equal(drawn, source) == (not mine)
    assert read_image(tmp_path / "drawn/rotated.jpg").shape == (48, 64, 3)  # upright


def test_visualize_max_images_draws_only_the_first_images(tmp_path, tools):
    json_path, _, dataset = _tiny_coco(tmp_path / "data", num_images=3, image_size=(48, 64))
    content = _read_json(json_path)
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                "score": 0.9} for a in content["annotations"]]
    write_json(tmp_path / "results.json", results)
    tools["visualize_json_results"].main(["--input", str(tmp_path / "results.json"),
                                          "--output", str(tmp_path / "drawn"),
                                          "--dataset", dataset, "--max-images", "2"])
    assert sorted(os.listdir(tmp_path / "drawn")) == sorted(
        img["file_name"] for img in content["images"][:2])


def test_visualize_draws_transparent_images_over_white(tmp_path, tools):
    _, image_dir, dataset = _tiny_coco(tmp_path / "data", num_images=1, image_size=(48, 64))
    rgba = np.zeros((48, 64, 4), dtype=np.uint8)
    rgba[..., 2] = 200
    rgba[:, 32:, 3] = 255  # the left half is transparent (and stores blue there)
    Image.fromarray(rgba, "RGBA").save(os.path.join(image_dir, "000000.png"))
    write_json(tmp_path / "results.json", [])
    tools["visualize_json_results"].main(["--input", str(tmp_path / "results.json"),
                                          "--output", str(tmp_path / "drawn"),
                                          "--dataset", dataset])
    drawn = read_image(tmp_path / "drawn/000000.png", "RGB")
    assert (drawn[:, :32] == 255).all() and (drawn[:, 32:] == (0, 0, 200)).all()


@pytest.mark.parametrize("content, error, message", [
    (None, FileNotFoundError, r"results json \(--input\) not found"),
    ("[{", ValueError, "not valid json"),
    ({"image_id": 1}, ValueError, "list of COCO result dicts"),
    ([{"image_id": 1, "category_id": 1}], ValueError, "entry 0"),
    ([{"image_id": 1, "category_id": 2, "bbox": [0, 0, 5, 5], "score": 1.0}], ValueError,
     "category ids of the results are not classes"),
    ([{"image_id": 9, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 1.0}], ValueError,
     "image ids of the results are not images"),
])
def test_visualize_rejects_bad_results(tmp_path, tools, content, error, message):
    _, _, dataset = _tiny_coco(tmp_path / "data", num_images=1)
    results = tmp_path / "results.json"
    if isinstance(content, str):
        results.write_text(content)
    elif content is not None:
        write_json(results, content)
    argv = ["--input", str(results), "--output", str(tmp_path / "drawn"), "--dataset", dataset]
    with pytest.raises(error, match=message):
        tools["visualize_json_results"].main(argv)
    assert not (tmp_path / "drawn").exists()


def test_visualize_reports_missing_dataset_images(tmp_path, tools):
    json_path, image_dir, dataset = _tiny_coco(tmp_path / "data", num_images=2)
    write_json(tmp_path / "results.json", [])
    os.remove(os.path.join(image_dir, "000001.png"))
    with pytest.raises(FileNotFoundError, match="000001.png"):
        tools["visualize_json_results"].main(["--input", str(tmp_path / "results.json"),
                                              "--output", str(tmp_path / "drawn"),
                                              "--dataset", dataset])


# ------------------------------------------------------------------------------------------
# (e) extract_region_features
# ------------------------------------------------------------------------------------------
def _region_feature_argv(tmp_path, with_vocabulary):
    weights = tiny_checkpoint(tmp_path / "tiny_rpn.pth", rpn=True)
    vocabulary = []
    if with_vocabulary:
        vocabulary = ["MODEL.CLIP.TEXT_EMB_PATH",
                      save_embedding_file(tmp_path / "emb.pth", 3, TINY_DIM, seed=3)]
    output = tmp_path / ("feats_vocab" if with_vocabulary else "feats")
    return ["--config-file", str(TINY_CONFIG), "MODEL.WEIGHTS", weights, *vocabulary,
            "MODEL.CLIP.CROP_REGION_TYPE", "RPN", "MODEL.CLIP.MULTIPLY_RPN_SCORE", "True",
            "MODEL.CLIP.NO_BOX_DELTA", "True",
            "MODEL.CLIP.OFFLINE_RPN_CONFIG", str(TINY_RPN_FPN),
            "INPUT_DIR", str(tmp_path / "images"), "OUTPUT_DIR", str(output)]


@pytest.fixture
def region_images(tmp_path):
    folder = tmp_path / "images"
    os.makedirs(folder)
    Image.fromarray(rectangles_image(48, 64, seed=1)).save(folder / "b.png")
    Image.fromarray(rectangles_image(60, 40, seed=2)).save(folder / "a.jpg", quality=95)
    return folder


def _embed_at_original_boxes(model, cfg, record, boxes):
    """Region embeddings recomputed for boxes given in original-image pixels."""
    inputs = build_inference_mapper(cfg)(record)
    height, width = inputs["image"].shape[-2:]
    scale = torch.tensor([width / record["width"], height / record["height"]] * 2)
    return model.embed_regions([inputs], [boxes * scale])


@torch.no_grad()
def test_region_features_are_aligned_in_both_modes(tmp_path, tools, region_images):
    extract = tools["extract_region_features"].main
    argv = _region_feature_argv(tmp_path, with_vocabulary=False)
    extract(argv)
    extract(_region_feature_argv(tmp_path, with_vocabulary=True))
    cfg = load_config(argv[1], argv[2:])
    model = build_model(cfg)
    load_weights(cfg, model)
    model.eval()
    vocabulary = torch.load(tmp_path / "emb.pth")
    for record in load_image_folder(str(region_images)):
        stem = os.path.splitext(os.path.basename(record["file_name"]))[0]
        plain = torch.load(tmp_path / "feats" / f"{stem}.pth")
        assert sorted(plain) == ["boxes", "feats"] and len(plain["boxes"]) > 0
        torch.testing.assert_close(
            plain["feats"], _embed_at_original_boxes(model, cfg, record, plain["boxes"]),
            rtol=1e-4, atol=1e-4)

        detected = torch.load(tmp_path / "feats_vocab" / f"{stem}.pth")
        assert sorted(detected) == ["boxes", "classes", "feats", "probs"]
        assert len(detected["boxes"]) > 0 and detected["probs"].shape[1] == 3 + 1
        # each detection is an unregressed proposal; its row must carry that proposal's feats
        match = torch.cdist(detected["boxes"], plain["boxes"]).argmin(dim=1)
        torch.testing.assert_close(detected["boxes"], plain["boxes"][match])
        torch.testing.assert_close(detected["feats"], plain["feats"][match])
        # probs: softmax over cosine / 0.01 with a zero background logit, from feats alone
        logits = F.normalize(detected["feats"], dim=1) @ F.normalize(vocabulary, dim=1).T
        logits = torch.cat([logits, torch.zeros(len(logits), 1)], dim=1) / 0.01
        torch.testing.assert_close(detected["probs"], logits.softmax(dim=1))
        torch.testing.assert_close(detected["probs"].sum(dim=1), torch.ones(len(logits)))


@torch.no_grad()
def test_region_features_stay_aligned_when_empty_boxes_are_dropped(tmp_path, tools):
    """An empty proposal is dropped by postprocess together with its feature row (the
    original kept the row, misaligning every following one)."""
    module = tools["extract_region_features"]
    cfg = load_config(str(TINY_CONFIG), ["MODEL.CLIP.CROP_REGION_TYPE", "RPN",
                                         "MODEL.CLIP.OFFLINE_RPN_CONFIG", str(TINY_RPN_FPN)])
    model = build_model(cfg).eval()
    image = torch.rand(3, 64, 96) * 255
    boxes = torch.tensor([[4.0, 4.0, 40.0, 30.0], [20.0, 10.0, 20.0, 50.0],  # the second is empty
                          [50.0, 5.0, 90.0, 60.0]])
    proposals = [Instances((64, 96), proposal_boxes=Boxes(boxes), objectness_logits=torch.ones(3))]
    model.get_proposals = lambda batched_inputs: proposals
    output = module.extract(model, {"image": image, "height": 32, "width": 48}, False)
    expected = model.embed_regions([{"image": image}], [boxes[[0, 2]]])
    torch.testing.assert_close(output["boxes"], boxes[[0, 2]] / 2)
    torch.testing.assert_close(output["feats"], expected)


def test_region_features_reject_ground_truth_regions(tmp_path, tools, region_images):
    argv = _region_feature_argv(tmp_path, with_vocabulary=False)
    argv[argv.index("RPN")] = "GT"
    with pytest.raises(ValueError, match="CROP_REGION_TYPE RPN"):
        tools["extract_region_features"].main(argv)


def test_region_features_refuse_images_sharing_a_name(tmp_path, tools, region_images):
    Image.fromarray(rectangles_image(30, 30)).save(region_images / "a.png")
    with pytest.raises(ValueError, match=r"share the name\(s\) \['a'\]"):
        tools["extract_region_features"].main(_region_feature_argv(tmp_path, False))


# ------------------------------------------------------------------------------------------
# (f) extract_concept_features
# ------------------------------------------------------------------------------------------
@torch.no_grad()
def _reference_concept_embeddings(reference_model, names):
    """Mean of the unnormalised open_clip text embeddings over RegionCLIP's 81 prompts: a bare
    "<name>." and OpenAI's 80 ImageNet templates."""
    prompts = [p for name in names
               for p in [f"{name}."] + [template(name) for template in OPENAI_IMAGENET_TEMPLATES]]
    embeddings = reference_model.encode_text(open_clip.tokenize(prompts))
    return embeddings.view(len(names), 81, -1).mean(dim=1)


def test_concept_features_equal_open_clip_template_mean(tmp_path, tools):
    reference = openclip_reference("tiny")
    weights = save_checkpoint_file(
        tmp_path / "tiny_text.pth",
        {f"lang_encoder.{k}": v for k, v in text_state_dict(reference).items()})
    concepts = tmp_path / "concepts"
    os.makedirs(concepts)
    names = ["dog", "traffic light", "teddy bear"]
    (concepts / "concepts.txt").write_text("\n".join(names) + "\n")
    argv = ["--config-file", str(TINY_CONFIG), "MODEL.WEIGHTS", weights,
            "INPUT_DIR", str(concepts), "OUTPUT_DIR", str(tmp_path / "out"),
            "MODEL.CLIP.GET_CONCEPT_EMB", "True"]
    tools["extract_concept_features"].main(argv)
    embeddings = torch.load(tmp_path / "out/concept_embeds.pth")
    assert embeddings.dtype == torch.float32 and embeddings.shape == (3, TINY_DIM)
    torch.testing.assert_close(embeddings, _reference_concept_embeddings(reference, names),
                               rtol=1e-4, atol=1e-5)

    json_path, _, _ = _tiny_coco(tmp_path / "data", num_images=1)
    output = tools["extract_concept_features"].main(
        ["--names", json_path, "--output", str(tmp_path / "coco.pth")] + argv)
    coco_names = ["person", "car", "dog"]  # the json's categories in id order
    torch.testing.assert_close(torch.load(output),
                               _reference_concept_embeddings(reference, coco_names),
                               rtol=1e-4, atol=1e-5)
