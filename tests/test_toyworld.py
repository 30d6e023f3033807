"""The toy world: deterministic, self-consistent, and read by the ordinary loaders."""
import json
import os
import random
import re

import cv2
import numpy as np
import pytest

from regionclip.data.catalog import get_dataset_dicts, get_metadata
from regionclip.data.image_text_sources import JsonlSource
from regionclip.evaluation import build_evaluator
from regionclip.toyworld import BASE_NAMES, CATEGORY_NAMES, NOVEL_NAMES, WorldSizes, draw_scene
from regionclip.toyworld.categories import category_id
from regionclip.toyworld.scene import MIN_PIXELS, SceneSpec
from regionclip.toyworld.writer import SPLITS, WEB_SCENE, scene_rng, write_world

SIZES = WorldSizes(train=12, val=6, test=8, pretrain=40, web=30)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(str(tmp_path_factory.mktemp("toy") / "world"), seed=3, sizes=SIZES,
                       show_progress=False)


def _dataset(world, split):
    return f"coco_json:{world}/detection/{split}.json:{world}/detection/{split}"


def _json(world, split):
    with open(os.path.join(world, "detection", f"{split}.json")) as f:
        return json.load(f)


def _files(root):
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, root)] = f.read()
    return found


def _words(text):
    return set(re.findall(r"[a-z]+", text.lower()))


def test_same_seed_same_files_other_seed_other_images(world, tmp_path):
    again = write_world(str(tmp_path / "again"), seed=3, sizes=SIZES, show_progress=False)
    other = write_world(str(tmp_path / "other"), seed=4, sizes=SIZES, show_progress=False)
    first, second, third = _files(world), _files(again), _files(other)
    assert first.keys() == second.keys()
    assert all(first[name] == second[name] for name in first)
    image = "detection/test/000001.jpg"
    assert first[image] != third[image]


def test_existing_folder_is_not_overwritten(world):
    before = _files(world)
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_world(world, seed=9, sizes=SIZES, show_progress=False)
    assert _files(world) == before


def test_splits_load_through_the_catalog_with_the_open_vocabulary_split(world):
    test_meta = get_metadata(_dataset(world, "test"))
    assert test_meta.thing_classes == CATEGORY_NAMES
    assert test_meta.novel_dataset_ids == {category_id(n) for n in NOVEL_NAMES}
    assert test_meta.base_dataset_ids == {category_id(n) for n in BASE_NAMES}
    assert get_metadata(_dataset(world, "train")).thing_classes == BASE_NAMES
    for split in SPLITS:
        records = get_dataset_dicts(_dataset(world, split))
        assert records and all(os.path.isfile(r["file_name"]) for r in records)


def test_train_has_base_boxes_only_and_val_test_have_all(world):
    novel_ids = {category_id(n) for n in NOVEL_NAMES}
    train = _json(world, "train")
    assert {c["name"] for c in train["categories"]} == set(BASE_NAMES)
    assert not any(a["category_id"] in novel_ids for a in train["annotations"])
    assert all(any(a["image_id"] == img["id"] for a in train["annotations"])
               for img in train["images"])
    for split in ("val", "test"):
        data = _json(world, split)
        assert len(data["images"]) == getattr(SIZES, split)
        assert {c["name"] for c in data["categories"]} == set(CATEGORY_NAMES)
    # Training images still show novel objects, unannotated (as in OV-COCO).
    drawn = [o.category for i in range(SIZES.train) for o in
             draw_scene(scene_rng(3, "train", i)).objects]
    assert set(drawn) & set(NOVEL_NAMES)


def test_annotations_are_the_drawn_objects(world):
    data = _json(world, "test")
    for image in data["images"]:
        scene = draw_scene(scene_rng(3, "test", image["id"] - 1))
        anns = [a for a in data["annotations"] if a["image_id"] == image["id"]]
        assert [a["bbox"] for a in anns] == [list(o.bbox) for o in scene.objects]
        assert [a["category_id"] for a in anns] == [category_id(o.category)
                                                    for o in scene.objects]
        assert (image["height"], image["width"]) == scene.image.shape[:2]


def test_object_masks_lie_in_their_tight_boxes():
    for index in range(20):
        scene = draw_scene(np.random.default_rng(index), SceneSpec())
        assert 1 <= len(scene.objects) <= 6
        for obj in scene.objects:
            x, y, w, h = obj.bbox
            inside = np.zeros_like(obj.mask)
            inside[y:y + h, x:x + w] = True
            assert obj.area >= MIN_PIXELS and not (obj.mask & ~inside).any()
            box = obj.mask[y:y + h, x:x + w]
            assert box[0].any() and box[-1].any() and box[:, 0].any() and box[:, -1].any()
        masks = [obj.mask for obj in scene.objects]
        for i in range(len(masks)):
            for j in range(i):
                assert not (masks[i] & masks[j]).any()  # visible parts never overlap


def test_captions_load_through_jsonl_source_and_are_weak_supervision(world):
    source = JsonlSource(os.path.join(world, "pretrain"))
    assert len(source) == SIZES.pretrain
    rng = random.Random(0)
    samples = [source.read(i, rng) for i in range(len(source))]
    assert all(os.path.isfile(s.image) and len(s.captions) == 3 for s in samples)
    words = [_words(c) for s in samples for c in s.captions]
    assert any(w & set(NOVEL_NAMES) for w in words)
    assert any(w & set(BASE_NAMES) for w in words)
    # Not a label list: some caption leaves out an object kind the image shows.
    shown = [{o.category for o in draw_scene(scene_rng(3, "pretrain", i)).objects}
             for i in range(SIZES.pretrain)]
    assert any(not kinds <= caption for kinds, s in zip(shown, samples)
               for caption in map(_words, s.captions))


def test_detics_files_load_through_the_catalog_with_one_class_list(world):
    """Detic's training data: the train split's base boxes under all categories, and the
    pretraining images labelled with the classes their captions name (novel ones included)."""
    boxes = f"coco_json:{world}/detection/train_all_categories.json:{world}/detection/train"
    labels = f"image_labels:{world}/pretrain/image_labels.json:{world}/pretrain"
    assert get_metadata(boxes).thing_classes == get_metadata(labels).thing_classes == \
        CATEGORY_NAMES
    train = get_dataset_dicts(_dataset(world, "train"))
    every = get_dataset_dicts(boxes)
    assert [r["file_name"] for r in every] == [r["file_name"] for r in train]
    assert {CATEGORY_NAMES[a["category_id"]] for r in every for a in r["annotations"]} <= \
        set(BASE_NAMES)
    source = JsonlSource(os.path.join(world, "pretrain"))
    captions = {os.path.basename(s.image): s.captions
                for s in (source.read(i, random.Random(0)) for i in range(len(source)))}
    records = get_dataset_dicts(labels)
    assert 0 < len(records) <= SIZES.pretrain
    for record in records:  # Detic's rule: a name between spaces (or at either end)
        text = captions[os.path.basename(record["file_name"])]
        tokens = " ".join(text).lower().split()
        assert {CATEGORY_NAMES[c] for c in record["pos_category_ids"]} == \
            {n for n in CATEGORY_NAMES if n in tokens}
    assert any(CATEGORY_NAMES[c] in NOVEL_NAMES for r in records for c in r["pos_category_ids"])


def test_web_corpus_is_object_centric_pairs_of_its_own(world):
    """The teacher's corpus: 1-2 large objects per image, captioned, not a pretrain copy."""
    source = JsonlSource(os.path.join(world, "web"))
    assert len(source) == SIZES.web
    scenes = [draw_scene(scene_rng(3, "web", i), WEB_SCENE) for i in range(SIZES.web)]
    assert all(1 <= len(s.objects) <= 2 for s in scenes)
    assert all(o.size >= WEB_SCENE.min_scale for s in scenes for o in s.objects)
    first = cv2.imread(source.read(0, random.Random(0)).image)[:, :, ::-1]
    assert first.shape == scenes[0].image.shape  # the files are these scenes
    texts = [c for i in range(len(source)) for c in source.read(i, random.Random(0)).captions]
    assert all(any(name in text for name in CATEGORY_NAMES) for text in texts)
    pretrain = JsonlSource(os.path.join(world, "pretrain")).read(0, random.Random(0))
    assert source.read(0, random.Random(0)).captions != pretrain.captions


def test_evaluator_reports_novel_base_all_ap50(world, tmp_path):
    """Ground-truth boxes as detections score 100 AP50 in every group."""
    dataset = _dataset(world, "test")
    evaluator = build_evaluator(dataset, str(tmp_path))
    to_contiguous = get_metadata(dataset).thing_dataset_id_to_contiguous_id
    data = _json(world, "test")
    predictions = [{"image_id": img["id"], "results": [
        {"image_id": img["id"], "category_id": a["category_id"], "bbox": a["bbox"],
         "score": 1.0} for a in data["annotations"] if a["image_id"] == img["id"]]}
        for img in data["images"]]
    assert to_contiguous[category_id("circle")] == 0
    metrics = evaluator.evaluate(predictions)["bbox"]
    assert metrics["AP50_novel"] == pytest.approx(100.0)
    assert metrics["AP50_base"] == pytest.approx(100.0)
    assert metrics["AP50_all"] == pytest.approx(100.0)


@pytest.mark.parametrize("splits", [(None, None), ("seen", None), ("seen", "novel")])
def test_catalog_needs_a_valid_split_on_every_category_for_novel_base(tmp_path, splits):
    categories = [{"id": i + 1, "name": f"c{i}"} for i in range(2)]
    for category, split in zip(categories, splits):
        if split:
            category["split"] = split
    path = tmp_path / "plain.json"
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": categories}))
    meta = get_metadata(f"coco_json:{path}:{tmp_path}")
    assert meta.novel_dataset_ids == frozenset() and meta.base_dataset_ids == frozenset()
