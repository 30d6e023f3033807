"""Training data: samplers (sharding, restart, repeat factors), batching, the training mapper
(resize + flip of images, boxes and masks) and the training loader built from a config."""
import json
import logging
import math
import os
from itertools import islice

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from _data_utils import make_coco_dataset
from _engine_utils import toy_mapper, toy_records
from fvcore.transforms.transform import HFlipTransform, TransformList
from PIL import Image

from regionclip.config import get_cfg
from regionclip.data.loader import (
    TrainingLoader,
    _log_capped,
    available_cpus,
    build_test_loader,
    build_train_loader,
    build_training_sampler,
    cap_workers,
    per_process_batch,
    training_records,
)
from regionclip.data.mapper import TrainingMapper, polygons_to_mask, training_instances
from regionclip.data.samplers import (
    RepeatFactorTrainingSampler,
    TrainingSampler,
    aspect_ratio_groups,
    batched_items,
    repeat_factors_from_category_frequency,
)
from regionclip.data.transforms import ResizeTransform
from regionclip.structures import BoxMode


def _take(iterator, n):
    return list(islice(iterator, n))


@pytest.mark.parametrize("size", [10, 7])
def test_training_sampler_shards_without_duplicates(size):
    ranks = [TrainingSampler(size, seed=3, rank=r, world_size=2) for r in range(2)]
    streams = [_take(sampler.items(), size) for sampler in ranks]
    single = _take(TrainingSampler(size, seed=3, rank=0, world_size=1).items(), 2 * size)
    merged = sorted((item for stream in streams for item in stream), key=lambda item: item[1])
    # the two shards interleave into exactly the one-process stream: positions 0..2*size-1
    assert [position for _, position in merged] == list(range(2 * size))
    assert merged == single
    first_epoch = [index for index, position in merged if position < size]
    assert sorted(first_epoch) == list(range(size))  # every image once, on one process


def test_training_sampler_epochs_are_new_permutations():
    sampler = TrainingSampler(20, seed=0, rank=0, world_size=1)
    indices = list(islice(iter(sampler), 60))
    epochs = [indices[k:k + 20] for k in (0, 20, 40)]
    assert all(sorted(epoch) == list(range(20)) for epoch in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert list(islice(iter(TrainingSampler(5, shuffle=False, world_size=1)), 7)) == \
        [0, 1, 2, 3, 4, 0, 1]


@pytest.mark.parametrize("make", [
    lambda rank: TrainingSampler(9, seed=5, rank=rank, world_size=2),
    lambda rank: RepeatFactorTrainingSampler([1.0, 2.5, 1.2, 3.0, 1.0], seed=5, rank=rank,
                                             world_size=2),
])
@pytest.mark.parametrize("start", [0, 4, 13, 40])
def test_samplers_restart_at_any_position(make, start):
    for rank in range(2):
        sampler = make(rank)
        assert _take(sampler.items(start), 12) == _take(sampler.items(), start + 12)[start:]


def test_repeat_factors_match_hand_computation():
    def record(*cats):
        return {"annotations": [{"category_id": c} for c in cats]}

    # category 0 is in all 10 images, category 1 in one, category 2 in two
    records = [record(0, 1, 1), record(0, 2), record(0, 2)] + [record(0)] * 7 + [record()]
    factors = repeat_factors_from_category_frequency(records, repeat_thresh=0.5)
    f1, f2 = math.sqrt(0.5 / (1 / 11)), math.sqrt(0.5 / (2 / 11))
    f0 = max(1.0, math.sqrt(0.5 / (10 / 11)))
    assert factors == pytest.approx([f1, f2, f2] + [f0] * 7 + [1.0])


def test_repeat_factor_sampler_stochastic_rounding():
    sampler = RepeatFactorTrainingSampler([1.0, 2.25, 1.5], seed=1, rank=0, world_size=1)
    counts = np.array([np.bincount(sampler.epoch_indices(e), minlength=3) for e in range(400)])
    assert (counts[:, 0] == 1).all()
    assert set(counts[:, 1]) == {2, 3} and set(counts[:, 2]) == {1, 2}
    assert counts.mean(axis=0) == pytest.approx([1.0, 2.25, 1.5], abs=0.08)


def test_build_repeat_factor_sampler_from_config():
    cfg = get_cfg()
    cfg.DATALOADER.SAMPLER_TRAIN, cfg.DATALOADER.REPEAT_THRESHOLD = \
        "RepeatFactorTrainingSampler", 0.5
    records = [{"annotations": [{"category_id": 0}]}] * 3 + [{"annotations": [{"category_id": 1}]}]
    sampler = build_training_sampler(cfg, records, seed=0)
    assert isinstance(sampler, RepeatFactorTrainingSampler)
    assert sampler.int_part.tolist() == [1, 1, 1, 1]
    assert sampler.frac_part[3] == pytest.approx(math.sqrt(2) - 1)
    cfg.DATALOADER.SAMPLER_TRAIN = "Random"
    with pytest.raises(ValueError, match="RepeatFactorTrainingSampler"):
        build_training_sampler(cfg, records, seed=0)


def test_aspect_ratio_grouping_batches_one_orientation():
    records = [{"width": 4, "height": 3}, {"width": 3, "height": 4}] * 6
    groups = aspect_ratio_groups(records)
    assert groups[:2] == [0, 1]
    items = TrainingSampler(len(records), seed=0, rank=0, world_size=1).items()
    batches = _take(batched_items(items, 3, groups), 10)
    for batch in batches:
        assert len(batch) == 3 and len({groups[index] for index, _ in batch}) == 1
    positions = [position for batch in batches for _, position in batch]
    assert len(set(positions)) == len(positions)


@pytest.mark.parametrize("grouping,workers", [(False, 0), (True, 0), (True, 2)])
def test_loader_restarts_at_an_iteration(grouping, workers):
    records = toy_records(10)
    for index in (1, 4, 5, 8):
        records[index]["width"] = 2  # portrait images
    groups = aspect_ratio_groups(records) if grouping else None

    def loader(seed=11):
        sampler = TrainingSampler(10, seed=seed, rank=0, world_size=1)
        return TrainingLoader(records, toy_mapper, sampler, 3, groups, workers)

    def flat(batches):
        return [item["x"] for batch in batches for item in batch]

    reference = flat(_take(loader().iter_from(0), 9))
    restarted = flat(_take(loader().iter_from(5), 4))
    torch.testing.assert_close(restarted, reference[15:])
    other_seed = flat(_take(loader(seed=12).iter_from(0), 9))
    assert not all(torch.equal(a, b) for a, b in zip(other_seed, reference))


# ---------------------------------------------------------------------------------------------
# Mapper
# ---------------------------------------------------------------------------------------------
IMAGE_SIZE = (30, 40)  # h, w
BOX = [4.0, 6.0, 10.0, 8.0]  # XYWH: x 4..14, y 6..14


def _rle(box):
    x, y, w, h = (int(v) for v in box)
    mask = np.zeros(IMAGE_SIZE, dtype=np.uint8, order="F")
    mask[y:y + h, x:x + w] = 1
    rle = mask_util.encode(mask)
    rle["counts"] = rle["counts"].decode()
    return rle, mask


def _record(tmp_path):
    image = np.zeros((*IMAGE_SIZE, 3), dtype=np.uint8)
    x, y, w, h = (int(v) for v in BOX)
    image[y:y + h, x:x + w] = (255, 0, 0)
    path = str(tmp_path / "image.png")
    Image.fromarray(image).save(path)
    rle, _ = _rle([20, 2, 6, 20])
    x0, y0, x1, y1 = BOX[0], BOX[1], BOX[0] + BOX[2], BOX[1] + BOX[3]
    annotations = [
        {"bbox": BOX, "bbox_mode": BoxMode.XYWH_ABS, "category_id": 2, "iscrowd": 0,
         "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]},
        {"bbox": [20, 2, 6, 20], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0,
         "iscrowd": 0, "segmentation": rle},
        {"bbox": [0, 0, 5, 5], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 1, "iscrowd": 1},
    ]
    return {"file_name": path, "height": IMAGE_SIZE[0], "width": IMAGE_SIZE[1], "image_id": 7,
            "annotations": annotations}


def _mask_box(mask):
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_mapper_resizes_and_flips_image_boxes_and_masks(tmp_path):
    record = _record(tmp_path)
    mapper = TrainingMapper(min_sizes=(60,), max_size=1000, flip="horizontal", use_masks=True)
    outputs = [mapper(record, np.random.default_rng(seed)) for seed in range(8)]
    plain = next(o for o in outputs if o["image"][0, 20, 17] == 255)
    flipped = next(o for o in outputs if o["image"][0, 20, 17] != 255)
    assert plain["image"].shape == flipped["image"].shape == (3, 60, 80)
    torch.testing.assert_close(flipped["image"], plain["image"].flip(-1))
    for out in (plain, flipped):
        assert out["instances"].gt_classes.tolist() == [2, 0]  # the crowd region is dropped
        assert (out["height"], out["width"], out["image_id"]) == (30, 40, 7)
    boxes = plain["instances"].gt_boxes.tensor
    torch.testing.assert_close(boxes, torch.tensor([[8.0, 12, 28, 28], [40, 4, 52, 44]]))
    expected_flipped = torch.stack([80 - boxes[:, 2], boxes[:, 1], 80 - boxes[:, 0],
                                    boxes[:, 3]], dim=1)
    torch.testing.assert_close(flipped["instances"].gt_boxes.tensor, expected_flipped)
    masks, flipped_masks = plain["instances"].gt_masks, flipped["instances"].gt_masks
    assert masks.dtype == torch.bool and masks.shape == (2, 60, 80)
    for mask, flipped_mask, box, flipped_box in zip(masks, flipped_masks, boxes,
                                                    expected_flipped):
        assert _mask_box(mask.numpy()) == pytest.approx(box.tolist(), abs=1)
        assert _mask_box(flipped_mask.numpy()) == pytest.approx(flipped_box.tolist(), abs=1)
    # the RLE mask is resized (nearest) and flipped exactly as the image is
    _, rle_mask = _rle([20, 2, 6, 20])
    resized = np.kron(rle_mask, np.ones((2, 2), dtype=np.uint8)).astype(bool)
    assert np.array_equal(masks[1].numpy(), resized)
    assert np.array_equal(flipped_masks[1].numpy(), resized[:, ::-1])


def test_mapper_is_a_function_of_its_generator(tmp_path):
    record = _record(tmp_path)
    mapper = TrainingMapper(min_sizes=(30, 45, 60), max_size=1000)
    sizes = set()
    for seed in range(6):
        first = mapper(record, np.random.default_rng(seed))
        again = mapper(record, np.random.default_rng(seed))
        torch.testing.assert_close(first["image"], again["image"])
        sizes.add(tuple(first["image"].shape[1:]))
        assert not first["instances"].has("gt_masks")
    assert sizes <= {(30, 40), (45, 60), (60, 80)} and len(sizes) > 1


def test_mapper_rejects_vertical_flip():
    with pytest.raises(ValueError, match="INPUT.RANDOM_FLIP"):
        TrainingMapper(flip="vertical")


def test_instances_drop_empty_boxes_and_fill_missing_masks():
    annotations = [
        {"bbox": [2, 2, 0, 5], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0},
        {"bbox": [1, 2, 6, 4], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 1},
    ]
    transforms = TransformList([ResizeTransform(10, 10, 20, 20, "bilinear"),
                                HFlipTransform(20)])
    instances = training_instances(annotations, transforms, (10, 10), (20, 20), use_masks=True)
    assert instances.gt_classes.tolist() == [1]
    assert instances.gt_boxes.tensor.tolist() == [[6.0, 4.0, 18.0, 12.0]]
    assert _mask_box(instances.gt_masks[0].numpy()) == pytest.approx([6, 4, 18, 12], abs=1)


def test_polygons_to_mask_union():
    mask = polygons_to_mask([[0, 0, 4, 0, 4, 4, 0, 4], [6, 6, 8, 6, 8, 8, 6, 8]], 10, 10)
    assert mask.shape == (10, 10) and mask.dtype == bool
    assert mask[1, 1] and mask[7, 7] and not mask[5, 5]


# ---------------------------------------------------------------------------------------------
# Loader from a config
# ---------------------------------------------------------------------------------------------
def _dataset_with_empty_images(tmp_path):
    json_path, image_dir = make_coco_dataset(tmp_path, num_images=6, image_size=(32, 48))
    with open(json_path) as f:
        content = json.load(f)
    content["annotations"] = [a for a in content["annotations"] if a["image_id"] != 1]
    for ann in content["annotations"]:
        ann["iscrowd"] = int(ann["image_id"] == 2)
    with open(json_path, "w") as f:
        json.dump(content, f)
    return f"coco_json:{json_path}:{image_dir}"


def test_training_records_filter_empty_images(tmp_path):
    name = _dataset_with_empty_images(tmp_path)
    assert [r["image_id"] for r in training_records([name])] == [3, 4, 5, 6]
    assert len(training_records([name], filter_empty=False)) == 6
    with pytest.raises(ValueError, match="DATASETS.TRAIN"):
        training_records([])


def test_build_train_loader_from_config(tmp_path):
    cfg = get_cfg()
    cfg.DATASETS.TRAIN = (_dataset_with_empty_images(tmp_path),)
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (16, 24), 100
    cfg.INPUT.FORMAT = "RGB"
    cfg.SEED = 4
    loader = build_train_loader(cfg)
    assert loader.batch_size == 2 and loader.sampler.seed == 4
    batches = _take(iter(loader), 4)
    for batch in batches:
        assert len(batch) == 2
        for item in batch:
            assert item["image"].shape[1] in (16, 24) and item["image"].dtype == torch.float32
            assert len(item["instances"]) == 2
            assert item["image_id"] in (3, 4, 5, 6)
    with pytest.raises(ValueError, match="not divisible"):
        per_process_batch(3, 2)


def test_workers_are_capped_by_the_cores_this_process_may_use(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    _log_capped.cache_clear()
    assert available_cpus() == 2
    with caplog.at_level(logging.INFO, logger="regionclip"):
        assert cap_workers(4) == 2
        assert (cap_workers(2), cap_workers(1), cap_workers(0)) == (2, 1, 0)
    assert caplog.text.count("DATALOADER.NUM_WORKERS 4 capped to 2") == 1
    assert build_test_loader([{}] * 3, dict, num_workers=8).num_workers == 2
    cfg = get_cfg()
    cfg.DATASETS.TRAIN = (_dataset_with_empty_images(tmp_path),)
    cfg.SOLVER.IMS_PER_BATCH, cfg.DATALOADER.NUM_WORKERS = 2, 6
    assert build_train_loader(cfg).num_workers == 2
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # no affinity on macOS, Windows
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    assert available_cpus() == 3 and cap_workers(4) == 3
