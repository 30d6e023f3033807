"""Detic's data: image-label jsons, its dataset names, and mixed box / image-labelled training
(draw shares, per-dataset batches and sizes, exact restart)."""
import json
import os
from collections import Counter
from itertools import islice

import numpy as np
import pytest
from _data_utils import DEFAULT_COCO_CATEGORIES, make_coco_dataset
from _detic_utils import TINY_DETIC, image_label_json, tiny_detic_data, write_json
from _tool_utils import load_tool

from regionclip.config import load_config
from regionclip.data.catalog import get_dataset_dicts, get_metadata
from regionclip.data.loader import build_train_loader, check_same_classes
from regionclip.data.multi_dataset import MultiDatasetSampler


def test_shares_follow_the_ratio_whatever_the_dataset_sizes():
    ids = [0] * 10 + [1] * 1000
    sampler = MultiDatasetSampler(ids, [1, 4], seed=3)
    draws = [ids[i] for i, _ in islice(sampler.items(), 20000)]
    share = Counter(draws)[0] / len(draws)
    assert abs(share - 0.2) < 0.015  # 20000 draws: standard deviation 0.003
    small = Counter(i for i, _ in islice(sampler.items(), 20000) if i < 10)
    assert len(small) == 10 and min(small.values()) > 250  # uniform inside a dataset


def test_the_stream_restarts_anywhere_and_is_sharded():
    ids = [0] * 7 + [1] * 5
    whole = list(islice(MultiDatasetSampler(ids, [1, 1], seed=1).items(), 50))
    assert list(islice(MultiDatasetSampler(ids, [1, 1], seed=1).items(31), 19)) == whole[31:]
    shards = [list(islice(MultiDatasetSampler(ids, [1, 1], seed=1, rank=r, world_size=2)
                          .items(), 25)) for r in (0, 1)]
    assert sorted(shards[0] + shards[1], key=lambda item: item[1]) == whole
    with pytest.raises(ValueError, match="one non-empty dataset per entry"):
        MultiDatasetSampler([0, 0], [1, 1])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_detic_data(tmp_path_factory.mktemp("detic_data"))


def test_image_label_json_reads_contiguous_labels_and_captions(data, tmp_path):
    detection, labels, images = data
    records = get_dataset_dicts(f"image_labels:{labels}:{images}")
    boxes = get_dataset_dicts(f"coco_json:{detection}:{images}")
    ids = get_metadata(f"coco_json:{detection}:{images}").thing_dataset_ids  # 1, 3, 18
    for record, box_record in zip(records, boxes):
        assert record["annotations"] == [] and len(record["captions"]) == 2
        assert sorted(record["pos_category_ids"]) == sorted(
            {a["category_id"] for a in box_record["annotations"]})
    assert ids == (1, 3, 18) and get_metadata(f"image_labels:{labels}:{images}").thing_classes \
        == ("person", "car", "dog")
    bad = write_json(tmp_path / "bad.json", {"images": [
        {"id": 1, "file_name": "x.png", "height": 2, "width": 2, "pos_category_ids": [7]}],
        "categories": [{"id": 1, "name": "a"}], "annotations": []})
    with pytest.raises(ValueError, match=r"pos_category_ids \[7\]"):
        get_dataset_dicts(f"image_labels:{bad}:{tmp_path}", check_files=False)
    no_height = write_json(tmp_path / "no_height.json", {"images": [
        {"id": 1, "file_name": "x.png", "width": 2}], "categories": [{"id": 1, "name": "a"}]})
    with pytest.raises(ValueError, match=r"no_height.json lacks the key 'height'"):
        get_dataset_dicts(f"image_labels:{no_height}:{tmp_path}", check_files=False)


def test_detics_dataset_names_resolve_under_the_dataset_root(data, tmp_path, monkeypatch):
    detection, _, images = data
    root = tmp_path / "datasets"
    val = root / "coco/zero-shot/instances_val2017_all_2_oriorder.json"
    with open(detection) as f:
        content = f.read()
    val.parent.mkdir(parents=True)
    val.write_text(content)
    (root / "coco").joinpath("val2017").symlink_to(images)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    meta = get_metadata("coco_generalized_zeroshot_val")
    assert meta.novel_dataset_ids == {18} and meta.base_dataset_ids == {1, 3}
    assert len(get_dataset_dicts("coco_generalized_zeroshot_val")) == 6


def _mixed_cfg(data, *extra):
    detection, labels, images = data
    return load_config(TINY_DETIC, [
        "DATASETS.TRAIN", f"('coco_json:{detection}:{images}', 'image_labels:{labels}:{images}')",
        "DATALOADER.SAMPLER_TRAIN", "MultiDatasetSampler", "DATALOADER.DATASET_RATIO", "[1, 4]",
        "DATALOADER.USE_DIFF_BS_SIZE", "True", "DATALOADER.DATASET_BS", "[1, 4]",
        "DATALOADER.MULTI_DATASET_GROUPING", "True", "DATALOADER.FILTER_EMPTY_ANNOTATIONS", "True",
        "DATALOADER.DATASET_ANN", "['box', 'image']", "INPUT.CUSTOM_AUG", "ResizeShortestEdge",
        "INPUT.MIN_SIZE_TRAIN_SAMPLING", "range",
        "DATALOADER.DATASET_MIN_SIZES", "[[80, 96], [40, 48]]", "DATALOADER.DATASET_MAX_SIZES",
        "[200, 100]", "WITH_IMAGE_LABELS", "True", *extra])


def test_mixed_batches_have_one_dataset_its_batch_size_sizes_and_labels(data):
    loader = build_train_loader(_mixed_cfg(data))
    kinds = Counter()
    for batch in islice(loader.iter_from(0), 40):
        (ann,) = {x["ann_type"] for x in batch}
        kinds[ann] += 1
        assert len(batch) == {"box": 1, "image": 4}[ann]
        low, high = {"box": (80, 96), "image": (40, 48)}[ann]
        for x in batch:
            assert low <= min(x["image"].shape[-2:]) <= high
            if ann == "image":
                assert x["pos_category_ids"] and len(x["captions"]) == 2
                assert len(x["instances"]) == 0
            else:
                assert len(x["instances"]) > 0 and x["pos_category_ids"] == []
    # ratio 1:4 with batches of 1 and 4 images: as many box as image-labelled batches
    assert 0.3 < kinds["box"] / sum(kinds.values()) < 0.7


def test_mixed_loader_restarts_at_any_iteration(data):
    def summary(batches):
        return [[(x["image_id"], x["ann_type"], float(x["image"].sum())) for x in b]
                for b in batches]

    loader = build_train_loader(_mixed_cfg(data, "SEED", "5"))
    whole = summary(islice(loader.iter_from(0), 12))
    restarted = build_train_loader(_mixed_cfg(data, "SEED", "5"))
    assert summary(islice(restarted.iter_from(7), 5)) == whole[7:]


def test_mixed_settings_are_checked(data):
    with pytest.raises(ValueError, match="DATALOADER.DATASET_BS has 3 entries for 2"):
        build_train_loader(_mixed_cfg(data, "DATALOADER.DATASET_BS", "[1, 2, 3]"))
    with pytest.raises(ValueError, match="USE_RFS"):
        build_train_loader(_mixed_cfg(data, "DATALOADER.USE_RFS", "[True, False]"))
    with pytest.raises(ValueError, match="mixed batches"):
        build_train_loader(_mixed_cfg(data, "DATALOADER.MULTI_DATASET_GROUPING", "False"))


def test_label_json_helper_matches_the_detection_boxes(data, tmp_path):
    detection, _, _ = data
    path = image_label_json(tmp_path / "l.json", detection, captions_per_image=1)
    records = get_dataset_dicts(f"image_labels:{path}:{tmp_path}", check_files=False)
    assert all(len(r["captions"]) == 1 for r in records)
    assert np.mean([len(r["pos_category_ids"]) for r in records]) > 1


def test_prepare_detic_coco_writes_detics_files(tmp_path, monkeypatch):
    """Base boxes for training, 65 classes for testing, all 80-style categories everywhere,
    class counts with 0 for novel classes, image labels from captions."""
    cats = [{"id": 1, "name": "person"}, {"id": 10, "name": "traffic light"},
            {"id": 18, "name": "dog"}]
    images = [{"id": i, "file_name": f"{i}.png", "height": 4, "width": 4} for i in (1, 2, 3)]
    boxes = [{"id": k + 1, "image_id": i, "category_id": c, "bbox": [0, 0, 2, 2], "area": 4,
              "iscrowd": 0} for k, (i, c) in enumerate([(1, 1), (1, 18), (2, 10), (3, 18)])]
    instances = {"images": images, "annotations": boxes, "categories": cats}
    captions = {"images": images, "annotations": [
        {"id": 1, "image_id": 1, "caption": "A person walks a Dog."},
        {"id": 2, "image_id": 1, "caption": "dog and man"},
        {"id": 3, "image_id": 2, "caption": "a red traffic light"},
        {"id": 4, "image_id": 3, "caption": "doggy style hotdogs"}]}
    coco = tmp_path / "coco"
    for name, content in (("instances_train2017", instances), ("instances_val2017", instances),
                          ("captions_train2017", captions)):
        write_json(coco / "annotations" / f"{name}.json", content)
    load_tool("prepare_detic_coco").main(["--coco-root", str(coco)])
    read = lambda p: json.loads((coco / p).read_text())  # noqa: E731
    train = read("zero-shot/instances_train2017_seen_2_oriorder.json")
    assert train["categories"] == cats and [a["category_id"] for a in train["annotations"]] == [1]
    val = read("zero-shot/instances_val2017_all_2_oriorder.json")
    assert sorted(a["category_id"] for a in val["annotations"]) == [1, 18, 18]
    counts = read("zero-shot/instances_train2017_seen_2_oriorder_cat_info.json")
    assert [c["image_count"] for c in counts] == [1, 0, 0]
    tags = read("annotations/captions_train2017_tags_allcaps.json")
    assert [(i["id"], i["pos_category_ids"]) for i in tags["images"]] == [(1, [1, 18]),
                                                                           (2, [10])]
    assert tags["images"][0]["captions"] == ["A person walks a Dog.", "dog and man"]
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    records = get_dataset_dicts("coco_caption_train_tags", check_files=False)
    assert [r["pos_category_ids"] for r in records] == [[0, 2], [1]]


def test_prepare_detic_coco_checks_every_input_before_writing(tmp_path):
    coco = tmp_path / "coco"
    instances = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "person"}]}
    for name in ("instances_train2017", "instances_val2017"):
        write_json(coco / "annotations" / f"{name}.json", instances)
    with pytest.raises(SystemExit, match="captions_train2017.json not found"):
        load_tool("prepare_detic_coco").main(["--coco-root", str(coco)])
    assert sorted(os.listdir(coco)) == ["annotations"]  # nothing written


def test_datasets_trained_together_must_list_the_same_classes(tmp_path):
    """Class ids are positions in each json's category list: a box json listing only the base
    classes beside an image-label json listing all would train the wrong classes."""
    person, car, dog = DEFAULT_COCO_CATEGORIES
    def name(folder, categories):
        return "coco_json:%s:%s" % make_coco_dataset(tmp_path / folder, 1, categories)
    every, again = name("every", [person, car, dog]), name("again", [person, car, dog])
    base_only = name("base", [person, dog])
    renamed = name("renamed", [person, {**car, "name": "bus"}, dog])
    check_same_classes([every, again])
    with pytest.raises(ValueError, match="DATASETS.TRAIN is empty"):
        check_same_classes([])
    with pytest.raises(ValueError, match=r"base.* lists 2 classes and .*every.* 3, first "
                                         r"different at position 1"):
        check_same_classes([every, base_only])
    with pytest.raises(ValueError, match="lists 3 classes and .* 3, first different at position 1"):
        check_same_classes([every, again, renamed])
