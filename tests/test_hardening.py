"""Hardening against bad input (issue 12): no silent wrong result, one-line errors.

Every case runs through a real entry point (``tools/train_net.py``, the ``regionclip`` command,
the Python API) on tiny files made here. The output-folder cases are in
``test_hardening_runs.py``.
"""
import json
import logging
import math

import pytest
from _data_utils import make_coco_dataset, make_lvis_dataset
from _e2e_utils import TINY_CONFIG, save_embedding_file, tiny_checkpoint
from _tool_utils import run_train_net

from regionclip.evaluation import LVISEvaluator

TINY_DIM = 32


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_json(path, content):
    with open(path, "w") as f:
        json.dump(content, f)


@pytest.fixture
def coco(tmp_path):
    """(json path, content, dataset name) of a 3-image COCO dataset; edit, write, evaluate."""
    json_path, image_dir = make_coco_dataset(tmp_path / "data", num_images=3)
    return json_path, read_json(json_path), f"coco_json:{json_path}:{image_dir}"


def eval_only(tmp_path, dataset):
    """``train_net --eval-only`` of the tiny detector on GT boxes; returns its results."""
    weights = tiny_checkpoint(tmp_path / "tiny.pth")
    emb = save_embedding_file(tmp_path / "emb.pth", 3, TINY_DIM)
    return run_train_net([
        "--eval-only", "--config-file", TINY_CONFIG, "MODEL.WEIGHTS", weights,
        "MODEL.CLIP.TEXT_EMB_PATH", emb, "DATASETS.TEST", f'("{dataset}",)',
        "OUTPUT_DIR", tmp_path / "out"])


def results_file(tmp_path):
    return tmp_path / "out" / "inference" / "coco_instances_results.json"


# ---------------------------------------------------------------------------------------------
# 2. COCO json: repeated ids, unknown categories, broken entries
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("section, message", [
    ("images", r"duplicate image ids \[2\]"),
    ("annotations", r"duplicate annotation ids \[2\]"),
    ("categories", r"duplicate category ids \[3\]"),
])
def test_repeated_ids_are_an_error_naming_them(tmp_path, coco, section, message):
    json_path, content, dataset = coco
    content[section][-1]["id"] = content[section][1]["id"]
    write_json(json_path, content)
    with pytest.raises(ValueError, match=rf"annotations\.json: {message}"):
        eval_only(tmp_path, dataset)
    assert not results_file(tmp_path).exists()


@pytest.mark.parametrize("damage, message", [
    (lambda c: c["images"][1].pop("height"), r"1 of the images have no 'height' \(entries \[1\]"),
    (lambda c: c["annotations"][0].update(bbox=[1, 2, 3]), r"'bbox' of 1 annotation.* \[1\]"),
    (lambda c: c.pop("categories"), "has no 'categories' list"),
])
def test_broken_entries_are_an_error_naming_file_and_key(tmp_path, coco, damage, message):
    json_path, content, dataset = coco
    damage(content)
    write_json(json_path, content)
    with pytest.raises(ValueError, match=rf"annotations\.json.*{message}"):
        eval_only(tmp_path, dataset)


def test_a_json_that_is_not_json_is_an_error_naming_it(tmp_path, coco):
    json_path, _, dataset = coco
    with open(json_path, "w") as f:
        f.write('{"images": [')
    with pytest.raises(ValueError, match=r"annotations\.json is not valid json"):
        eval_only(tmp_path, dataset)


def test_unknown_category_and_image_ids_and_nan_boxes_are_dropped_with_warnings(
        tmp_path, coco, capsys):
    json_path, content, dataset = coco
    template = content["annotations"][0]
    content["annotations"] += [
        {**template, "id": 100, "category_id": 99},
        {**template, "id": 101, "category_id": 98},
        {**template, "id": 102, "image_id": 77},
        {**template, "id": 103, "bbox": [math.nan, 2.0, 5.0, 5.0]},
    ]
    write_json(json_path, content)
    eval_only(tmp_path, dataset)
    log = capsys.readouterr().out
    assert "WARNING] 2 annotations have a category id that is not in 'categories'" in log
    assert "WARNING] 1 annotations have an image id that is not in 'images'" in log
    assert "WARNING] 1 annotations with a NaN or infinite box were dropped" in log
    for result in read_json(results_file(tmp_path)):
        assert all(math.isfinite(v) for v in result["bbox"])


# ---------------------------------------------------------------------------------------------
# 3. nothing to evaluate
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("annotations", [[], None])
def test_a_json_without_annotations_reports_no_ap(tmp_path, coco, capsys, annotations):
    json_path, content, dataset = coco
    if annotations is None:
        del content["annotations"]
    else:
        content["annotations"] = annotations
    write_json(json_path, content)
    results = eval_only(tmp_path, dataset)
    assert results == {dataset: {}}
    log = capsys.readouterr().out
    assert f"WARNING] {json_path} has no annotations: there is nothing to evaluate" in log
    assert "nan" not in log.lower()
    assert results_file(tmp_path).exists()  # the detections are still written


def test_lvis_evaluator_reports_no_ap_without_annotations(tmp_path, caplog):
    json_path, _ = make_lvis_dataset(tmp_path / "lvis", num_images=2)
    content = read_json(json_path)
    content["annotations"] = []
    write_json(json_path, content)
    evaluator = LVISEvaluator(json_path, str(tmp_path / "out"))
    with caplog.at_level(logging.WARNING):
        assert evaluator.evaluate([]) == {}
    assert "has no annotations" in caplog.text


def test_lvis_evaluator_rejects_repeated_image_ids(tmp_path):
    json_path, _ = make_lvis_dataset(tmp_path / "lvis", num_images=2)
    content = read_json(json_path)
    content["images"][1]["id"] = content["images"][0]["id"]
    write_json(json_path, content)
    with pytest.raises(ValueError, match=r"duplicate image ids \[1\]"):
        LVISEvaluator(json_path)

