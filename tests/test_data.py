"""Tests for regionclip.data: decoding, transforms, loaders, catalog, mapper, OVD splits."""

import json
import logging
import os

import numpy as np
import pytest
import torch
from _data_utils import make_coco_dataset, make_lvis_dataset
from _tool_utils import load_tool
from fvcore.transforms.transform import HFlipTransform, NoOpTransform
from PIL import Image

from regionclip.data import catalog, coco_ovd
from regionclip.data.coco import load_coco_json, load_image_folder, load_lvis_json
from regionclip.data.mapper import (
    ImageReadError,
    ImageSizeMismatchError,
    InferenceMapper,
    read_image,
    read_image_size,
)
from regionclip.data.transforms import (
    RandomHorizontalFlip,
    ResizeShortestEdge,
    ResizeTransform,
    apply_augmentations,
    shortest_edge_size,
    transform_boxes_xyxy,
)
from regionclip.structures import BoxMode

EXIF_ORIENTATION = 0x0112
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _save(tmp_path, name, image, **kwargs):
    path = str(tmp_path / name)
    image.save(path, **kwargs)
    return path


# ---------------------------------------------------------------- image_io


def test_read_image_rgb_and_bgr(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    path = _save(tmp_path, "a.png", Image.fromarray(array))
    np.testing.assert_array_equal(read_image(path), array)
    np.testing.assert_array_equal(read_image(path, "BGR"), array[:, :, ::-1])
    with pytest.raises(ValueError, match="format"):
        read_image(path, "YUV")


def test_read_image_grayscale_rgba_palette(tmp_path):
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    decoded = read_image(_save(tmp_path, "g.png", Image.fromarray(grey)))
    assert decoded.shape == (3, 4, 3)
    for channel in range(3):
        np.testing.assert_array_equal(decoded[:, :, channel], grey)
    rgba = np.random.default_rng(1).integers(0, 256, (3, 4, 4), dtype=np.uint8)
    decoded = read_image(_save(tmp_path, "rgba.png", Image.fromarray(rgba, "RGBA")))
    np.testing.assert_array_equal(decoded, rgba[:, :, :3])
    rgb = Image.fromarray(rgba[:, :, :3])
    palette = rgb.convert("P", palette=Image.ADAPTIVE, colors=8)
    decoded = read_image(_save(tmp_path, "p.png", palette))
    np.testing.assert_array_equal(decoded, np.asarray(palette.convert("RGB")))


def test_read_image_16bit_png_is_scaled_not_clipped(tmp_path):
    wide = np.array([[0, 257 * 100, 65535], [32896, 1000, 60000]], dtype=np.uint16)
    path = _save(tmp_path, "w.png", Image.fromarray(wide))
    decoded = read_image(path)
    expected = np.rint(wide / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(decoded[:, :, 0], expected)
    assert decoded[0, 2, 0] == 255 and decoded[1, 2, 0] == 233


def test_read_image_applies_exif_orientation(tmp_path):
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, :20] = (255, 0, 0)  # left half red
    array[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # display = stored image rotated 90 degrees clockwise
    path = _save(tmp_path, "r.jpg", Image.fromarray(array), exif=exif, quality=95)
    decoded = read_image(path)
    assert decoded.shape == (40, 20, 3)
    assert read_image_size(path) == (40, 20)
    assert decoded[5, 10, 0] > 200 and decoded[5, 10, 2] < 50  # the left half is now on top
    assert decoded[35, 10, 2] > 200 and decoded[35, 10, 0] < 50


def test_read_image_errors_name_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"not an image at all")
    with pytest.raises(ImageReadError, match="corrupt.jpg"):
        read_image(str(corrupt))
    with pytest.raises(ImageReadError, match="missing.png"):
        read_image(str(tmp_path / "missing.png"))
    full = _save(tmp_path, "full.png", Image.fromarray(np.full((30, 30, 3), 9, np.uint8)))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(open(full, "rb").read()[:60])
    with pytest.raises(ImageReadError, match="truncated.png"):
        read_image(str(truncated))


# ---------------------------------------------------------------- transforms


@pytest.mark.parametrize(
    "size, short, max_size, expected",
    [
        ((480, 640), 800, 1333, (800, 1067)),  # 640 * 800 / 480 = 1066.67
        ((640, 480), 800, 1333, (1067, 800)),
        ((100, 1000), 800, 1333, (133, 1333)),  # long side capped: 800 * 1333 / 8000 = 133.3
        ((427, 640), 800, 1333, (800, 1199)),  # 640 * 800 / 427 = 1199.06
        ((333, 500), 600, 1000, (600, 901)),  # 500 * 600 / 333 = 900.9
        ((50, 50), 64, 0, (64, 64)),
    ],
)
def test_shortest_edge_size(size, short, max_size, expected):
    assert shortest_edge_size(*size, short, max_size) == expected


def test_resize_uses_pil_bilinear_and_scales_boxes():
    image = np.random.default_rng(2).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    transform = ResizeShortestEdge(60, 1000).get_transform(30, 40)
    assert isinstance(transform, ResizeTransform)
    resized = transform.apply_image(image)
    expected = np.asarray(Image.fromarray(image).resize((80, 60), Image.BILINEAR))
    np.testing.assert_array_equal(resized, expected)
    boxes = transform_boxes_xyxy(transform, [[1, 2, 10, 20], [30, 25, 45, 35]], (60, 80))
    np.testing.assert_allclose(boxes, [[2, 4, 20, 40], [60, 50, 80, 60]])  # second one clipped
    floats = transform.apply_image(image.astype(np.float32))
    assert floats.shape == (60, 80, 3) and floats.dtype == np.float32


def test_resize_sampling_and_flip():
    rng = np.random.default_rng(0)
    choice = ResizeShortestEdge((10, 20), 1000, "choice")
    assert {choice.get_transform(5, 5, rng).new_h for _ in range(40)} == {10, 20}
    ranged = ResizeShortestEdge((10, 12), 1000, "range")
    assert {ranged.get_transform(5, 5, rng).new_h for _ in range(60)} == {10, 11, 12}
    assert isinstance(ResizeShortestEdge(0).get_transform(5, 5), NoOpTransform)
    with pytest.raises(ValueError, match="'range' needs two lengths"):
        ResizeShortestEdge((1, 2, 3), sample_style="range")
    image = np.arange(2 * 4 * 3, dtype=np.uint8).reshape(2, 4, 3)
    flipped, transforms = apply_augmentations([RandomHorizontalFlip(1.0)], image, rng)
    np.testing.assert_array_equal(flipped, image[:, ::-1])
    assert isinstance(transforms.transforms[0], HFlipTransform)
    np.testing.assert_allclose(transform_boxes_xyxy(transforms, [[0, 0, 1, 2]], (2, 4)),
                               [[3, 0, 4, 2]])
    assert isinstance(RandomHorizontalFlip(0.0).get_transform(2, 4, rng), NoOpTransform)


# ---------------------------------------------------------------- loaders


def _rewrite_json(path, edit):
    with open(path) as f:
        content = json.load(f)
    edit(content)
    with open(path, "w") as f:
        json.dump(content, f)


def test_load_coco_json_records(tmp_path):
    json_path, image_dir = make_coco_dataset(str(tmp_path), num_images=3)
    records = load_coco_json(json_path, image_dir)
    with open(json_path) as f:
        gt = json.load(f)
    assert [r["image_id"] for r in records] == [1, 2, 3]
    assert records[0]["file_name"] == os.path.join(image_dir, "000000.png")
    assert (records[0]["height"], records[0]["width"]) == (48, 64)
    id_map = {1: 0, 3: 1, 18: 2}
    for ann, obj in zip(gt["annotations"], [a for r in records for a in r["annotations"]]):
        assert obj["bbox"] == ann["bbox"] and obj["bbox_mode"] == BoxMode.XYWH_ABS
        assert obj["category_id"] == id_map[ann["category_id"]] and obj["iscrowd"] == 0
        assert obj["segmentation"] == ann["segmentation"]


def test_load_coco_json_bad_boxes(tmp_path, caplog):
    json_path, image_dir = make_coco_dataset(str(tmp_path), num_images=3)

    def edit(content):
        anns = content["annotations"]
        anns[0]["bbox"] = [50.0, 40.0, 30.0, 20.0]  # reaches outside the 64x48 image
        anns[1]["bbox"] = [5.0, 5.0, 0.0, 10.0]  # zero width
        anns[2]["segmentation"] = [[1, 2, 3, 4]]  # not a polygon
        content["annotations"] = [a for a in anns if a["image_id"] != 3]  # image 3: no boxes

    _rewrite_json(json_path, edit)
    with caplog.at_level(logging.INFO, logger="regionclip.data.coco"):
        records = load_coco_json(json_path, image_dir)
    assert records[0]["annotations"][0]["bbox"] == [50.0, 40.0, 14.0, 8.0]
    assert len(records[0]["annotations"]) == 1
    assert "segmentation" not in records[1]["annotations"][0]
    assert records[2]["annotations"] == []
    assert "1 annotations with an empty box" in caplog.text
    assert "1 annotation boxes reached outside the image" in caplog.text
    assert "1 of 3 images have no usable annotations (kept)" in caplog.text


def test_load_lvis_json(tmp_path):
    json_path, image_root = make_lvis_dataset(str(tmp_path), num_images=3)
    records = load_lvis_json(json_path, image_root)
    assert records[0]["file_name"] == os.path.join(image_root, "val2017", "000000000000.png")
    assert [a["category_id"] for r in records for a in r["annotations"]] == [0, 1, 1, 2, 2, 3]
    assert records[0]["neg_category_ids"] == [2, 3]
    base = load_lvis_json(json_path, image_root, base_only=True)
    # rare id 2 is dropped; ids 1, 3, 4 become 0, 1, 2
    assert [[a["category_id"] for a in r["annotations"]] for r in base] == [[0], [1], [1, 2]]
    assert base[0]["neg_category_ids"] == [1, 2]
    capped = load_lvis_json(json_path, image_root, max_annotations=1)
    assert [len(r["annotations"]) for r in capped] == [1, 1, 1]


def test_load_image_folder(tmp_path):
    Image.new("RGB", (30, 10)).save(tmp_path / "b.png")
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 8
    Image.new("RGB", (30, 10)).save(tmp_path / "a.jpg", exif=exif)
    (tmp_path / "notes.txt").write_text("not an image")
    records = load_image_folder(str(tmp_path))
    assert [os.path.basename(r["file_name"]) for r in records] == ["a.jpg", "b.png"]
    assert [(r["height"], r["width"], r["image_id"]) for r in records] == [(30, 10, 1),
                                                                           (10, 30, 2)]
    assert "annotations" not in records[0]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        load_image_folder(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_image_folder(str(tmp_path / "nowhere"))


# ---------------------------------------------------------------- catalog


@pytest.fixture
def dataset_root(tmp_path, monkeypatch):
    monkeypatch.setenv(catalog.DATASETS_ENV, str(tmp_path))
    return tmp_path


def test_catalog_unknown_and_missing(dataset_root):
    with pytest.raises(ValueError, match="coco_2017_val.*lvis_v1_val_custom_img"):
        catalog.get_dataset_dicts("coco_2018_val")
    with pytest.raises(FileNotFoundError, match="instances_val2017.json.*datasets/README.md"):
        catalog.get_dataset_dicts("coco_2017_val")
    with pytest.raises(FileNotFoundError, match="lvis_v1_val.json"):
        catalog.get_metadata("lvis_v1_val_custom_img")
    with pytest.raises(ValueError, match="coco_json:<json_file>:<image_dir>"):
        catalog.get_spec("coco_json:only_one_part")


def test_catalog_coco_2017_val(dataset_root):
    make_coco_dataset(str(dataset_root / "coco"), num_images=2,
                      json_name="annotations/instances_val2017.json", image_dirname="val2017")
    records = catalog.get_dataset_dicts("coco_2017_val")
    assert records[1]["file_name"] == str(dataset_root / "coco" / "val2017" / "000001.png")
    meta = catalog.get_metadata("coco_2017_val")
    assert meta.thing_classes == ("person", "car", "dog")
    assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 3: 1, 18: 2}
    assert meta.contiguous_id_to_dataset_id == {0: 1, 1: 3, 2: 18}
    assert meta.evaluator_type == "coco" and meta.evaluate
    assert not meta.novel_dataset_ids and meta.frequency_groups() == {}
    os.remove(dataset_root / "coco" / "val2017" / "000001.png")
    with pytest.raises(FileNotFoundError, match="1 of 2 image files.*000001.png"):
        catalog.get_dataset_dicts("coco_2017_val")


def test_catalog_lvis(dataset_root, tmp_path):
    for split in ("train", "val"):
        make_lvis_dataset(str(dataset_root / "coco"), json_name=f"../lvis/lvis_v1_{split}.json",
                          split_folder=f"{split}2017")
    val = catalog.get_metadata("lvis_v1_val")
    assert val.thing_classes == ("apple", "banjo", "candle", "dog")
    assert val.contiguous_id_to_dataset_id == {0: 1, 1: 2, 2: 3, 3: 4}
    assert val.frequency_groups() == {"r": [1], "c": [2], "f": [0, 3]}
    assert val.novel_dataset_ids == {2} and val.base_dataset_ids == {1, 3, 4}
    train = catalog.get_metadata("lvis_v1_train")
    assert train.thing_classes == ("apple", "candle", "dog")
    assert train.contiguous_id_to_dataset_id == {0: 1, 1: 3, 2: 4}
    assert train.frequency_groups() == {"r": [], "c": [1], "f": [0, 2]}
    records = catalog.get_dataset_dicts("lvis_v1_train")
    assert all(r["annotations"] for r in records) and len(records) == 3
    assert len(catalog.get_dataset_dicts("lvis_v1_val_fullysup")) == 3
    custom = tmp_path / "custom"
    custom.mkdir()
    Image.new("RGB", (8, 6)).save(custom / "x.jpg")
    records = catalog.get_dataset_dicts("lvis_v1_val_custom_img", input_dir=str(custom))
    assert [(r["height"], r["width"], r["image_id"]) for r in records] == [(6, 8, 1)]
    custom_meta = catalog.get_metadata("lvis_v1_val_custom_img")
    assert not custom_meta.evaluate and custom_meta.thing_classes == val.thing_classes


def test_catalog_user_coco_json(tmp_path):
    json_path, image_dir = make_coco_dataset(str(tmp_path / "mine"), num_images=2)
    name = f"coco_json:{json_path}:{image_dir}"
    assert len(catalog.get_dataset_dicts(name)) == 2
    assert catalog.get_metadata(name).thing_classes == ("person", "car", "dog")
    catalog.register_coco_json("my_test_set", json_path, image_dir)
    try:
        assert "my_test_set" in catalog.list_datasets()
        assert len(catalog.get_dataset_dicts("my_test_set")) == 2
        with pytest.raises(ValueError, match="already in use"):
            catalog.register_coco_json("my_test_set", json_path, image_dir)
    finally:
        catalog._REGISTERED.pop("my_test_set")


# ---------------------------------------------------------------- mapper


def test_mapper_resizes_image_and_boxes(tmp_path):
    json_path, image_dir = make_coco_dataset(str(tmp_path), num_images=1, boxes_per_image=3)
    record = load_coco_json(json_path, image_dir)[0]
    record["annotations"][1]["iscrowd"] = 1
    out = InferenceMapper(min_size=96, max_size=1000, keep_annotations=True)(record)
    original = read_image(record["file_name"])
    expected = np.asarray(Image.fromarray(original).resize((128, 96), Image.BILINEAR))
    assert out["image"].dtype == torch.float32 and out["image"].shape == (3, 96, 128)
    np.testing.assert_array_equal(out["image"].permute(1, 2, 0).numpy(), expected)
    assert (out["height"], out["width"], out["image_id"]) == (48, 64, 1)
    kept = [a for a in record["annotations"] if not a["iscrowd"]]
    xyxy = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in kept)]
    instances = out["instances"]
    assert instances.image_size == (96, 128)
    torch.testing.assert_close(instances.gt_boxes.tensor, torch.tensor(xyxy) * 2.0)
    assert instances.gt_classes.tolist() == [a["category_id"] for a in kept]
    bgr = InferenceMapper(96, 1000, image_format="BGR")(record)
    torch.testing.assert_close(bgr["image"], out["image"].flip(0))
    assert "instances" not in bgr


def test_mapper_rejects_size_mismatch(tmp_path):
    json_path, image_dir = make_coco_dataset(str(tmp_path), num_images=1)
    record = load_coco_json(json_path, image_dir)[0]
    record["height"] = 50
    with pytest.raises(ImageSizeMismatchError, match="000000.png"):
        InferenceMapper(32, 100)(record)


# ---------------------------------------------------------------- OVD splits


def _mini_instances():
    categories = [
        {"id": 1, "name": "person"}, {"id": 10, "name": "traffic light"},
        {"id": 18, "name": "dog"}, {"id": 47, "name": "cup"},
        {"id": 67, "name": "dining table"}, {"id": 90, "name": "toothbrush"},
    ]
    objects = {1: [1, 10], 2: [18], 3: [10, 67], 4: [90, 47]}
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "height": 20, "width": 20} for i in objects]
    annotations = [
        {"id": 10 * image_id + k, "image_id": image_id, "category_id": cat_id,
         "bbox": [1.0, 1.0, 5.0, 5.0], "area": 25.0, "iscrowd": 0}
        for image_id, cat_ids in objects.items() for k, cat_id in enumerate(cat_ids)
    ]
    return {"info": {"year": 2017}, "images": images, "annotations": annotations,
            "categories": categories}


def test_prepare_coco_ovd(tmp_path, monkeypatch):
    annotation_dir = tmp_path / "coco" / "annotations"
    annotation_dir.mkdir(parents=True)
    for image_set in ("train2017", "val2017"):
        with open(annotation_dir / f"instances_{image_set}.json", "w") as f:
            json.dump(_mini_instances(), f)
    load_tool("prepare_coco_ovd").main(["--coco-root", str(tmp_path / "coco")])
    expected = {"all": ([1, 18, 47, 90], [1, 2, 4]), "b": ([1, 90], [1, 4]),
                "t": ([18, 47], [2, 4])}
    for image_set in ("train2017", "val2017"):
        for split, (cat_ids, image_ids) in expected.items():
            with open(annotation_dir / f"ovd_ins_{image_set}_{split}.json") as f:
                content = json.load(f)
            assert [c["id"] for c in content["categories"]] == cat_ids
            assert [i["id"] for i in content["images"]] == image_ids
            assert {a["category_id"] for a in content["annotations"]} == set(cat_ids)
            assert content["info"] == {"year": 2017}
    monkeypatch.setenv(catalog.DATASETS_ENV, str(tmp_path))
    meta = catalog.get_metadata("coco_2017_ovd_all_test")
    assert meta.thing_classes == ("person", "dog", "cup", "toothbrush")
    assert meta.novel_dataset_ids == {18, 47} and meta.base_dataset_ids == {1, 90}


def test_ovd_class_lists():
    assert len(coco_ovd.NOVEL_CATEGORIES) == 17 and len(coco_ovd.BASE_CATEGORIES) == 48
    names = [name for _, name in coco_ovd.ALL_CATEGORIES]
    assert len(names) == 65 and names[:5] == ["person", "bicycle", "car", "motorcycle",
                                              "airplane"]
    assert names[-3:] == ["vase", "scissors", "toothbrush"]
    assert sorted(coco_ovd.NOVEL_IDS) == [5, 6, 17, 18, 21, 22, 28, 32, 36, 41, 47, 49, 61,
                                          63, 76, 81, 87]
