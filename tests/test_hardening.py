"""Hardening against bad input (issue 12): no silent wrong result, one-line errors.

Every case runs through a real entry point (``tools/train_net.py``, the ``regionclip`` command,
the Python API) on tiny files made here. The output-folder cases are in
``test_hardening_runs.py``.
"""
import json
import logging
import math
import os
import re

import pytest
import torch
from _api_utils import CLASSES, TINY_RPN_CONFIG, save_pretrained, tiny_detector
from _api_utils import TINY_CONFIG as TINY_API_CONFIG
from _data_utils import make_coco_dataset, make_lvis_dataset
from _e2e_utils import TINY_CONFIG, save_embedding_file, tiny_checkpoint
from _image_text_utils import write_tsv_dataset
from _tool_utils import run_train_net
from PIL import Image

from regionclip.cli import main as regionclip_main
from regionclip.data.image_text_tsv import TSVPairSource, lineidx_path
from regionclip.evaluation import LVISEvaluator

TINY_DIM = 32
BAD_ROWS = "rows [1, 2]"  # of the embedding files below


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """A private text-embedding cache; the ``regionclip`` command's logging setup undone."""
    monkeypatch.setenv("REGIONCLIP_CACHE", str(tmp_path / "cache"))
    log = logging.getLogger("regionclip")
    saved = (list(log.handlers), log.level, log.propagate)
    yield
    log.handlers[:], log.level, log.propagate = saved


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return save_pretrained(tmp_path_factory.mktemp("api") / "regionclip_pretrained-cc_rn50.pth")


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


def eval_only(tmp_path, dataset, emb=None):
    """``train_net --eval-only`` of the tiny detector on GT boxes; returns its results."""
    weights = tiny_checkpoint(tmp_path / "tiny.pth")
    emb = emb or save_embedding_file(tmp_path / "emb.pth", 3, TINY_DIM)
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
    results = read_json(results_file(tmp_path))
    assert results and all(math.isfinite(v) for r in results for v in r["bbox"])


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


# ---------------------------------------------------------------------------------------------
# Beyond the list: files written beside the user's data
# ---------------------------------------------------------------------------------------------
def test_generated_lineidx_is_an_ordinary_file(tmp_path):
    """The row index written beside a TSV had mkstemp's private mode (0600), unreadable to
    the other users of a shared dataset folder."""
    folder = write_tsv_dataset(tmp_path, 2, 1, (32, 32), lineidx=False)
    umask = os.umask(0o022)
    try:
        TSVPairSource(folder)
    finally:
        os.umask(umask)
    for kind in ("images", "text"):
        mode = os.stat(lineidx_path(os.path.join(folder, f"train.{kind}.tsv"))).st_mode
        assert mode & 0o777 == 0o644


# ---------------------------------------------------------------------------------------------
# 1. non-finite or damaged class embeddings, damaged text-cache entries
# ---------------------------------------------------------------------------------------------
def non_finite_embeddings(path):
    """A [3, 32] embedding file whose rows 1 (a NaN) and 2 (an infinity) are unusable."""
    emb = torch.randn(3, TINY_DIM)
    emb[1, 5], emb[2, 0] = math.nan, math.inf
    torch.save(emb, path)
    return emb


def damaged_file(path, how):
    if how == "garbage":
        path.write_bytes(b"this is not a torch file")
    else:  # a zip archive cut short, as by a full disk
        torch.save(torch.randn(3, TINY_DIM), path)
        path.write_bytes(path.read_bytes()[:200])


def test_api_rejects_non_finite_embeddings_naming_rows_and_file(pretrained, tmp_path):
    detector = tiny_detector(pretrained, tmp_path / "cache")
    path = tmp_path / "nan_emb.pth"
    emb = non_finite_embeddings(path)
    with pytest.raises(ValueError, match=re.escape(BAD_ROWS)):
        detector.set_vocabulary(CLASSES, embeddings=emb)
    with pytest.raises(ValueError, match=re.escape(BAD_ROWS)) as error:
        detector.set_vocabulary(CLASSES, embeddings=str(path))
    assert str(path) in str(error.value)
    assert detector.vocabulary is None


def test_api_refuses_a_batch_size_below_one(pretrained, tmp_path):
    detector = tiny_detector(pretrained, tmp_path / "cache")
    detector.set_vocabulary(CLASSES)
    image = torch.randint(0, 256, (48, 64, 3), dtype=torch.uint8).numpy()
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        detector([image], batch_size=0)


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_api_names_a_damaged_embedding_file(pretrained, tmp_path, how):
    detector = tiny_detector(pretrained, tmp_path / "cache")
    path = tmp_path / "emb.pth"
    damaged_file(path, how)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        detector.set_vocabulary(CLASSES, embeddings=str(path))


@pytest.mark.parametrize("how", ["non-finite", "garbage"])
def test_detect_command_refuses_bad_embeddings_in_one_line(pretrained, tmp_path, capsys, how):
    image, path, out = tmp_path / "scene.png", tmp_path / "emb.pth", tmp_path / "out.json"
    Image.new("RGB", (80, 60), (90, 40, 200)).save(image)
    non_finite_embeddings(path) if how == "non-finite" else damaged_file(path, how)
    argv = ["detect", str(image), "--classes", ",".join(CLASSES), "--embeddings", str(path),
            "--weights", pretrained, "--out", str(out), "--variant", "tiny", "--config",
            TINY_API_CONFIG, "--rpn-config", TINY_RPN_CONFIG, "--device", "cpu", "--quiet"]
    assert regionclip_main(argv) == 1
    log = capsys.readouterr().err  # the loading report's warnings, then the error
    errors = [line for line in log.splitlines() if line.startswith("regionclip detect: error")]
    assert len(errors) == 1 and str(path) in errors[0] and "Traceback" not in log, log
    assert how == "garbage" or BAD_ROWS in errors[0]
    assert not out.exists()


def test_train_net_refuses_non_finite_text_embeddings(tmp_path, coco):
    _, _, dataset = coco
    path = tmp_path / "nan_emb.pth"
    non_finite_embeddings(path)
    with pytest.raises(ValueError, match=re.escape(BAD_ROWS)) as error:
        eval_only(tmp_path, dataset, emb=path)
    assert str(path) in str(error.value)
    assert not results_file(tmp_path).exists()


def test_damaged_text_cache_entries_are_rebuilt_with_a_warning(pretrained, tmp_path, caplog):
    cache = tmp_path / "cache"
    clean = tiny_detector(pretrained, cache).embed_text(CLASSES)
    entries = sorted((cache / "text").glob("*/*.pth"))
    assert len(entries) == len(CLASSES)
    torch.save(torch.full((1, TINY_DIM), math.nan), entries[0])
    entries[1].write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="regionclip"):
        again = tiny_detector(pretrained, cache).embed_text(CLASSES)
    torch.testing.assert_close(again, clean)
    assert str(entries[0]) in caplog.text and str(entries[1]) in caplog.text
    torch.testing.assert_close(tiny_detector(pretrained, cache).embed_text(CLASSES), clean)
