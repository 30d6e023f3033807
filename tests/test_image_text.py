"""Image-caption pretraining data: the three on-disk forms, skipping, splitting, transforms."""
import io
import json
import logging
import os
import random
import tarfile
from collections import Counter

import numpy as np
import open_clip
import pytest
import torch
from _image_text_utils import (
    caption,
    encode_jpeg,
    expected_mean,
    image_colors,
    item_key,
    make_image,
    write_jsonl_dataset,
    write_tsv_dataset,
    write_webdataset,
)
from PIL import Image
from torch.utils.data import DataLoader

from regionclip.config import ConfigError, get_cfg
from regionclip.data.image_text import (
    ImageTextDataset,
    ImageTextTransform,
    choose_captions,
    collate_image_text,
)
from regionclip.data.image_text_loader import build_image_text_dataset, build_image_text_loader
from regionclip.data.image_text_sources import (
    JsonlSource,
    WebDatasetSource,
    expand_braces,
    expand_shards,
)
from regionclip.data.image_text_tsv import TSVPairSource, lineidx_path

SIZE = (48, 64)  # (h, w) of generated images; a multiple of the JPEG block size


def _keep_size():
    """Resizes 48x64 images to themselves and never flips: records show the stored pixels."""
    return ImageTextTransform((SIZE[0],), max_size=0, flip_prob=0.0)


def _dataset(sources, **kwargs):
    kwargs = {"infinite": False, "rank": 0, "world_size": 1, **kwargs}
    return ImageTextDataset(sources if isinstance(sources, list) else [sources], _keep_size(),
                            **kwargs)


def _by_key(dataset):
    return {record["key"]: record for record in dataset}


def _check_record(record, i, captions):
    assert record["captions"] == captions
    assert torch.equal(record["tokens"], open_clip.tokenize(captions))
    assert record["tokens"].dtype == torch.long and record["tokens"].shape == (len(captions), 77)
    assert (record["height"], record["width"]) == SIZE
    image = record["image"]
    assert image.dtype == torch.float32 and image.shape == (3, *SIZE)
    mean = image.mean(dim=(1, 2)).numpy()
    np.testing.assert_allclose(mean, expected_mean(i, SIZE), atol=2.5 / 255)


# ---------------------------------------------------------------------------------------------
# The three sources
# ---------------------------------------------------------------------------------------------
def test_tsv_records(tmp_path):
    folder = write_tsv_dataset(tmp_path, num_images=3, captions_per_image=7, image_size=SIZE)
    records = _by_key(_dataset(TSVPairSource(folder)))
    assert sorted(records) == [item_key(i) for i in range(3)]
    for i in range(3):  # seven stored captions, the first five kept
        _check_record(records[item_key(i)], i, [caption(i, j) for j in range(5)])


def test_a_second_epoch_reads_the_same_tokens_whatever_the_first_did_with_them(tmp_path):
    # Tokenized captions are cached per process; a record's tokens must stay its own copy.
    folder = write_tsv_dataset(tmp_path, num_images=2, captions_per_image=3, image_size=SIZE)
    first = _by_key(_dataset(TSVPairSource(folder)))
    for record in first.values():
        record["tokens"].fill_(-1)
    again = _by_key(_dataset(TSVPairSource(folder)))
    for i in range(2):
        _check_record(again[item_key(i)], i, [caption(i, j) for j in range(3)])


def test_webdataset_records(tmp_path):
    folder = write_webdataset(tmp_path, num_images=5, image_size=SIZE, num_shards=2)
    source = WebDatasetSource(folder)
    assert [os.path.basename(s) for s in source.shards] == ["00000.tar", "00001.tar"]
    records = _by_key(_dataset(source))
    assert sorted(records) == [item_key(i) for i in range(5)]
    for i in range(5):  # the json repeats the .txt caption: kept once
        _check_record(records[item_key(i)], i, [caption(i)])


def test_webdataset_json_caption_and_member_grouping(tmp_path):
    path = tmp_path / "shard.tar"
    members = [
        ("a/x1.png", _png(make_image(1, SIZE))), ("a/x1.txt", b" first \n"),
        ("a/x1.json", json.dumps({"caption": "second"}).encode()),
        ("a/x1.extra.npy", b"ignored"), ("._hidden.txt", b"mac metadata"),
        ("x2.jpg", encode_jpeg(make_image(2, SIZE))), ("x2.json", b'{"caption": null}'),
    ]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    dataset = _dataset(WebDatasetSource(str(path)))
    records = _by_key(dataset)
    assert list(records) == ["a/x1"]
    _check_record(records["a/x1"], 1, ["first", "second"])
    assert dataset.skipped == {"image": 0, "caption": 1, "shard": 0}


def _png(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_jsonl_records(tmp_path):
    folder = write_jsonl_dataset(tmp_path / "a", num_images=3, captions_per_image=2,
                                 image_size=SIZE)
    records = _by_key(_dataset(JsonlSource(folder)))
    assert sorted(records) == [f"images/{item_key(i)}.jpg" for i in range(3)]
    for i in range(3):
        _check_record(records[f"images/{item_key(i)}.jpg"], i, [caption(i, 0), caption(i, 1)])
    single = write_jsonl_dataset(tmp_path / "b", num_images=1, captions_per_image=1,
                                 image_size=SIZE)
    record = next(iter(_dataset(JsonlSource(os.path.join(single, "captions.jsonl")))))
    _check_record(record, 0, [caption(0)])


def test_jsonl_bad_line_names_file_and_line(tmp_path):
    (tmp_path / "captions.jsonl").write_text('{"file_name": "a.jpg", "caption": "x"}\n'
                                             '{"caption": "no file name"}\n')
    with pytest.raises(ValueError, match=r"captions.jsonl line 2"):
        JsonlSource(str(tmp_path))
    (tmp_path / "captions.jsonl").write_text('{"file_name": "a.jpg", "caption": "x"}\n\n\n'
                                             '{"file_nam": "b.jpg", "caption": "y"}\n')
    with pytest.raises(ValueError, match=r"captions.jsonl line 4"):  # blank lines count
        JsonlSource(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Skipping and errors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["tsv", "webdataset", "jsonl"])
def test_corrupt_and_missing_images_are_skipped_and_counted(tmp_path, form, caplog):
    if form == "tsv":
        source = TSVPairSource(write_tsv_dataset(tmp_path, 5, 1, SIZE, corrupt=(1, 3)))
    elif form == "webdataset":
        source = WebDatasetSource(write_webdataset(tmp_path, 5, SIZE, corrupt=(1, 3)))
    else:
        source = JsonlSource(write_jsonl_dataset(tmp_path, 5, 1, SIZE, corrupt=(1,),
                                                 missing=(3,)))
    dataset = _dataset(source)
    keys = [record["key"] for record in dataset]
    assert len(keys) == 3 and not any(item_key(i) in k for k in keys for i in (1, 3))
    assert dataset.skipped == {"image": 2, "caption": 0, "shard": 0}
    assert "Skipped image-text item" in caplog.text


def test_unreadable_shard_is_skipped_and_counted(tmp_path):
    folder = write_webdataset(tmp_path, num_images=4, image_size=SIZE, num_shards=2)
    with open(os.path.join(folder, "00001.tar"), "r+b") as f:
        f.truncate(700)  # inside the first member's data
    dataset = _dataset(WebDatasetSource(folder))
    assert sorted(_by_key(dataset)) == [item_key(0), item_key(1)]
    assert dataset.skipped["shard"] == 1


def test_no_usable_item_is_a_clear_error(tmp_path):
    source = TSVPairSource(write_tsv_dataset(tmp_path, 2, 1, SIZE, corrupt=(0, 1)))
    with pytest.raises(RuntimeError, match="no usable image-text item"):
        list(_dataset(source, infinite=True))


# ---------------------------------------------------------------------------------------------
# TSV details
# ---------------------------------------------------------------------------------------------
def test_lineidx_is_generated_when_missing(tmp_path):
    folder = write_tsv_dataset(tmp_path / "gen", 4, 2, SIZE, lineidx=False)
    reference = write_tsv_dataset(tmp_path / "ref", 4, 2, SIZE, lineidx=True)
    source = TSVPairSource(folder)
    for kind in ("images", "text"):
        generated = lineidx_path(os.path.join(folder, f"train.{kind}.tsv"))
        expected = lineidx_path(os.path.join(reference, f"train.{kind}.tsv"))
        assert open(generated).read() == open(expected).read()
    assert sorted(os.listdir(folder)) == sorted(os.listdir(reference))  # no temporary files
    assert sorted(_by_key(_dataset(source))) == [item_key(i) for i in range(4)]


# ---------------------------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------------------------
def test_shard_specs(tmp_path):
    folder = write_webdataset(tmp_path, num_images=6, image_size=SIZE, num_shards=3)
    names = ["00000.tar", "00001.tar", "00002.tar"]
    assert expand_braces("x/{00000..00002}.tar") == [f"x/{n}" for n in names]
    assert expand_braces("{a,b}{1..2}") == ["a1", "a2", "b1", "b2"]
    expected = [os.path.join(folder, n) for n in names]
    assert expand_shards(folder) == expected
    assert expand_shards(os.path.join(folder, "{00000..00003}.tar")) == expected  # 3 is absent
    (tmp_path / "list.txt").write_text("00002.tar\n\n00000.tar\n")
    assert expand_shards(str(tmp_path / "list.txt")) == [expected[2], expected[0]]
    with pytest.raises(FileNotFoundError, match="no tar shards"):
        expand_shards(str(tmp_path / "missing_{0..3}.tar"))


# ---------------------------------------------------------------------------------------------
# Splitting across processes and workers
# ---------------------------------------------------------------------------------------------
def _keys_over_ranks(make_source, world_size=2, num_workers=2, shuffle=True):
    keys = []
    for rank in range(world_size):
        dataset = ImageTextDataset([make_source()], _keep_size(), infinite=False, seed=3,
                                   rank=rank, world_size=world_size, shuffle=shuffle)
        loader = DataLoader(dataset, batch_size=2, num_workers=num_workers,
                            collate_fn=collate_image_text)
        keys += [record["key"] for batch in loader for record in batch]
    return keys


@pytest.mark.parametrize("form,num_shards", [("tsv", 0), ("jsonl", 0), ("webdataset", 5),
                                             ("webdataset", 1)])
def test_two_ranks_two_workers_cover_every_item_once(tmp_path, form, num_shards):
    if form == "tsv":
        folder = write_tsv_dataset(tmp_path, 11, 1, SIZE)
        keys = _keys_over_ranks(lambda: TSVPairSource(folder))
    elif form == "jsonl":
        folder = write_jsonl_dataset(tmp_path, 11, 1, SIZE)
        keys = [os.path.basename(k)[:-4] for k in _keys_over_ranks(lambda: JsonlSource(folder))]
    else:  # 5 shards: split by shard; 1 shard: cut into interleaved parts
        folder = write_webdataset(tmp_path, 11, SIZE, num_shards=num_shards)
        keys = _keys_over_ranks(lambda: WebDatasetSource(folder))
    assert Counter(keys) == Counter(item_key(i) for i in range(11))


def test_mixed_sources_split_without_duplicates(tmp_path):
    tsv = write_tsv_dataset(tmp_path / "tsv", 5, 1, SIZE)
    wds = write_webdataset(tmp_path / "wds", 6, SIZE, num_shards=3)
    keys = []
    for rank in range(2):
        dataset = ImageTextDataset([TSVPairSource(tsv), WebDatasetSource(wds)], _keep_size(),
                                   infinite=False, rank=rank, world_size=2)
        keys += [r["key"] for r in dataset]
    assert Counter(keys) == Counter([item_key(i) for i in range(5)] +
                                    [item_key(i) for i in range(6)])


def test_infinite_epochs_reshuffle(tmp_path):
    folder = write_tsv_dataset(tmp_path, 6, 1, SIZE)
    stream = iter(_dataset(TSVPairSource(folder), infinite=True))
    epochs = [[next(stream)["key"] for _ in range(6)] for _ in range(3)]
    assert all(sorted(e) == [item_key(i) for i in range(6)] for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1


def test_worker_skip_counts_reach_the_main_process(tmp_path):
    folder = write_tsv_dataset(tmp_path, 8, 1, SIZE, corrupt=(0, 5, 6))
    dataset = _dataset(TSVPairSource(folder))
    loader = DataLoader(dataset, batch_size=1, num_workers=2, collate_fn=collate_image_text)
    assert len(list(loader)) == 5
    assert dataset.skipped == {"image": 3, "caption": 0, "shard": 0}


def test_fewer_items_than_processes(tmp_path):
    folder = write_tsv_dataset(tmp_path, 1, 1, SIZE)
    with pytest.raises(ValueError, match="fewer than the 2 processes"):
        list(_dataset(TSVPairSource(folder), rank=1, world_size=2))
    folder = write_tsv_dataset(tmp_path / "three", 3, 1, SIZE)
    loader = DataLoader(_dataset(TSVPairSource(folder)), batch_size=1, num_workers=4,
                        collate_fn=collate_image_text)
    with pytest.raises(ValueError, match="1 processes x 4 loader workers"):
        list(loader)


# ---------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("height,width,expected", [
    (480, 640, (800, 1066)),    # 800 * 640 / 480 = 1066.7 -> 1066
    (640, 480, (1066, 800)),
    (301, 1000, (401, 1333)),   # long side 2657 > 1333: short = int(1333 * 800 / 2657) = 401
    (1000, 300, (1333, 400)),   # long side 2666: short = int(1333 * 800 / 2666) = 400
    (800, 1200, (800, 1200)),
])
def test_resize_short_side_800_long_side_capped_at_1333(height, width, expected):
    transform = ImageTextTransform((800,), max_size=1333, interpolation=3, flip_prob=0.0)
    image = Image.fromarray(np.zeros((height, width, 3), dtype=np.uint8))
    assert tuple(transform(image, random.Random(0)).shape[1:]) == expected


def test_resize_is_pil_bicubic():
    array = np.random.default_rng(0).integers(0, 256, (30, 41, 3), dtype=np.uint8)
    image = Image.fromarray(array)
    out = ImageTextTransform((50,), max_size=0, flip_prob=0.0)(image, random.Random(0))
    reference = np.asarray(image.resize((68, 50), Image.BICUBIC))  # 50 * 41 / 30 = 68.3
    assert torch.equal(out, torch.from_numpy(reference.copy()).permute(2, 0, 1) / 255.0)
    bilinear = ImageTextTransform((50,), max_size=0, interpolation=2, flip_prob=0.0)
    assert not torch.equal(bilinear(image, random.Random(0)), out)


def test_flip():
    image = Image.fromarray(make_image(3, SIZE))
    kept = ImageTextTransform((SIZE[0],), 0, flip_prob=0.0)(image, random.Random(0))
    flipped = ImageTextTransform((SIZE[0],), 0, flip_prob=1.0)(image, random.Random(0))
    assert torch.equal(flipped, kept.flip(-1))
    left, right = image_colors(3)
    assert torch.equal(flipped[:, 0, 0] * 255, torch.tensor(right, dtype=torch.float32))
    half = ImageTextTransform((SIZE[0],), 0, flip_prob=0.5)
    rng = random.Random(1)
    flips = sum(torch.equal(half(image, rng), flipped) for _ in range(200))
    assert 70 < flips < 130


def test_transform_argument_errors():
    with pytest.raises(ValueError, match="max_size"):
        ImageTextTransform((800,), max_size=800)
    with pytest.raises(ValueError, match="interpolation"):
        ImageTextTransform((800,), interpolation=7)


# ---------------------------------------------------------------------------------------------
# Batching and caption choice
# ---------------------------------------------------------------------------------------------
def test_choose_captions_uses_each_images_own_count():
    tokens = [torch.full((1, 77), 7), torch.arange(5).view(5, 1).expand(5, 77)]
    generator = torch.Generator().manual_seed(0)
    picks = [choose_captions(tokens, generator) for _ in range(200)]
    assert all(p.shape == (2, 77) and p[0].eq(7).all() for p in picks)
    assert {int(p[1, 0]) for p in picks} == set(range(5))


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------
def _image_text_cfg(names, factories, paths):
    cfg = get_cfg()
    cfg.DATASETS.TRAIN, cfg.DATASETS.FACTORY_TRAIN = names, factories
    cfg.DATASETS.PATH_TRAIN = paths
    cfg.AUG.TRAIN.IMAGE_SIZE, cfg.AUG.TRAIN.MAX_SIZE = [32], 40
    cfg.SEED = 5
    return cfg


def test_build_from_config_joins_datasets(tmp_path):
    tsv = write_tsv_dataset(tmp_path / "tsv", 2, 1, SIZE)
    wds = write_webdataset(tmp_path / "wds", 3, SIZE)
    jsonl = write_jsonl_dataset(tmp_path / "jsonl", 4, 1, SIZE)
    cfg = _image_text_cfg(("cc+laion", "mine"),
                          ("CLIPImgTxtPairTSVDataset+WebDataset", "ImageCaptionJsonl"),
                          (f"{tsv}+{wds}", jsonl))
    dataset = build_image_text_dataset(cfg, infinite=False)
    assert [type(s).__name__ for s in dataset.sources] == ["TSVPairSource", "WebDatasetSource",
                                                           "JsonlSource"]
    records = list(dataset)
    assert len(records) == 9 and dataset.seed == 5
    assert {tuple(r["image"].shape) for r in records} == {(3, 30, 40)}  # 32x42.7 capped at 40
    cfg.SOLVER.IMS_PER_BATCH, cfg.DATALOADER.NUM_WORKERS = 4, 0
    batch = next(iter(build_image_text_loader(cfg, dataset)))
    assert isinstance(batch, list) and len(batch) == 4 and "tokens" in batch[0]


def test_loader_says_aspect_ratio_grouping_is_not_applied(tmp_path, caplog):
    jsonl = write_jsonl_dataset(tmp_path, 4, 1, SIZE)
    cfg = _image_text_cfg(("mine",), ("ImageCaptionJsonl",), (jsonl,))
    cfg.SOLVER.IMS_PER_BATCH, cfg.DATALOADER.NUM_WORKERS = 2, 0
    for grouping in (False, True):
        cfg.DATALOADER.ASPECT_RATIO_GROUPING = grouping
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="regionclip.data.image_text_loader"):
            build_image_text_loader(cfg)
        assert ("ASPECT_RATIO_GROUPING is not applied" in caplog.text) == grouping


def test_config_errors(tmp_path):
    tsv = write_tsv_dataset(tmp_path, 2, 1, SIZE)
    with pytest.raises(ConfigError, match="one DATASETS.FACTORY_TRAIN"):
        build_image_text_dataset(_image_text_cfg(("imgtxtpairs",), (), (tsv,)))
    with pytest.raises(ConfigError, match="unknown DATASETS.FACTORY_TRAIN 'Nope'"):
        build_image_text_dataset(_image_text_cfg(("imgtxtpairs",), ("Nope",), (tsv,)))
    with pytest.raises(ConfigError, match="2 '\\+' parts, expected 3"):
        build_image_text_dataset(_image_text_cfg(
            ("a+b",), ("CLIPImgTxtPairTSVDataset",), (f"{tsv}+{tsv}+{tsv}",)))
