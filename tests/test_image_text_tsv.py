"""The TSV form of the pretraining data (the original's): image / text TSV pairs, their
.lineidx row offsets, the folder scan and the text field."""
import json
import os
import random

import pytest
from _image_text_utils import item_key, write_tsv_dataset

from regionclip.data.image_text_tsv import (
    TSVPairSource,
    find_tsv_pairs,
    lineidx_path,
    parse_text_field,
)

SIZE = (48, 64)  # (h, w) of generated images


def test_tsv_key_mismatch_names_file_and_line(tmp_path):
    folder = write_tsv_dataset(tmp_path, 3, 1, SIZE)
    text_tsv = os.path.join(folder, "train.text.tsv")
    lines = open(text_tsv).read().splitlines(keepends=True)
    lines[1] = lines[1].replace(item_key(1), "zzzzzz")  # same length: the .lineidx still fits
    open(text_tsv, "w").writelines(lines)
    source = TSVPairSource(folder)
    with pytest.raises(ValueError, match=r"line 2: .*train\.images\.tsv has '000001', "
                                         r".*train\.text\.tsv has 'zzzzzz'"):
        source.read(1, random.Random(0))


def test_tsv_row_count_mismatch(tmp_path):
    folder = write_tsv_dataset(tmp_path, 3, 1, SIZE, lineidx=False)
    text_tsv = os.path.join(folder, "train.text.tsv")
    lines = open(text_tsv).readlines()
    open(text_tsv, "w").writelines(lines[:2])
    with pytest.raises(ValueError, match="has 3 rows but .*train.text.tsv has 2"):
        TSVPairSource(folder)


def test_stale_lineidx_is_reported(tmp_path):
    folder = write_tsv_dataset(tmp_path, 2, 1, SIZE)
    with open(lineidx_path(os.path.join(folder, "train.text.tsv")), "a") as f:
        f.write("999999\n")
    with pytest.raises(ValueError, match="delete it"):
        TSVPairSource(folder)


def test_lineidx_of_a_rewritten_tsv_is_refused(tmp_path):
    folder = write_tsv_dataset(tmp_path, 3, 1, SIZE)
    text = os.path.join(folder, "train.text.tsv")
    rows = open(text).read().splitlines()
    with open(text, "w") as f:  # same keys, other caption lengths: the old index is wrong
        f.writelines(f"{row.split(chr(9))[0]}\t{json.dumps({'captions': ['x' * 9 * (i + 1)]})}\n"
                     for i, row in enumerate(rows))
    with pytest.raises(ValueError, match="train.text.lineidx does not belong.*delete it"):
        TSVPairSource(folder)
    os.remove(lineidx_path(text))
    source = TSVPairSource(folder)
    assert [source.read(i, random.Random(0)).captions for i in range(3)] == \
        [["x" * 9], ["x" * 18], ["x" * 27]]


def test_tsv_folder_scan(tmp_path):
    for name in ("b.img.tsv", "b.caption.tsv", "a.images.tsv", "a.text.tsv", "c.image.tsv",
                 "c.text.tsv", "notes.tsv", "a.images.lineidx"):
        (tmp_path / name).write_text("")
    pairs = [(os.path.basename(i), os.path.basename(t)) for i, t in find_tsv_pairs(tmp_path)]
    assert pairs == [("a.images.tsv", "a.text.tsv"), ("b.img.tsv", "b.caption.tsv"),
                     ("c.image.tsv", "c.text.tsv")]
    assert len(find_tsv_pairs(tmp_path, max_files=2)) == 2
    assert len(find_tsv_pairs(str(tmp_path / "b.img.tsv"))) == 1
    (tmp_path / "d.images.tsv").write_text("")
    with pytest.raises(FileNotFoundError, match="d.text.tsv"):
        find_tsv_pairs(tmp_path)
    with pytest.raises(ValueError, match="no image TSV"):
        find_tsv_pairs(tmp_path / "b.caption.tsv")


def test_parse_text_field():
    rng = random.Random(0)
    captions = [f"c{i}" for i in range(7)]
    assert parse_text_field(json.dumps({"captions": captions}), rng) == captions[:5]
    assert parse_text_field(json.dumps({"captions": "one"}), rng) == ["one"]
    assert parse_text_field("a raw caption", rng) == ["a raw caption"]
    assert parse_text_field("42", rng) == ["42"]
    assert parse_text_field(json.dumps({"other": 1}), rng) == []
    seen = set()
    for _ in range(20):
        (prompt,) = parse_text_field(json.dumps({"tags": "red car street"}), rng)
        words = [w for w in ("red", "car", "street") if w in prompt]
        assert len(words) == 3
        seen.add(tuple(sorted(words, key=prompt.index)))
    assert len(seen) > 1  # tag order is shuffled
    both = {tuple(parse_text_field(json.dumps({"captions": ["x"], "tags": "y"}), rng))
            for _ in range(20)}
    assert ("x",) in both and len(both) > 1  # one of the present keys, at random
