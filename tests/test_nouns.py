"""Concept-pool nouns: mention counting, vocabularies, caption reading, the tool."""
import json
import os
import sys
import types
from collections import Counter

import pytest
from _image_text_utils import caption, write_jsonl_dataset, write_tsv_dataset, write_webdataset
from _tool_utils import load_tool

from regionclip.data.coco_ovd import ALL_CATEGORIES
from regionclip.data.nouns import (
    build_concept_nouns,
    coco_class_names,
    count_mentions,
    default_vocabulary,
    detect_caption_format,
    iter_caption_texts,
    load_noun_parser,
    plural_forms,
    select_nouns,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCABULARY = ["dog", "person", "bus", "hot dog", "knife", "cherry", "teddy bear", "bear",
              "traffic light", "glass", "glasses", "cat", "tomato", "fireman"]


@pytest.mark.parametrize("text,expected", [
    ("Two DOGS chase a dog.", {"dog"}),                 # case, plural, once per caption
    ("people at the bus stop", {"person", "bus"}),
    ("three buses and some tomatoes", {"bus", "tomato"}),
    ("knives and cherries", {"knife", "cherry"}),
    ("two firemen", {"fireman"}),
    ("a hot dog stand", {"hot dog"}),                   # longest phrase wins, no extra "dog"
    ("hot dogs", {"hot dog"}),
    ("Teddy bears next to a bear", {"teddy bear", "bear"}),
    ("traffic-lights at night", {"traffic light"}),     # punctuation splits words
    ("reading glasses and a glass", {"glasses", "glass"}),  # exact name beats a plural
    ("the dog's bowl", {"dog"}),
    ("a catalog of doghouses", set()),                  # whole words only
    ("", set()),
])
def test_mentions(text, expected):
    counts = count_mentions([text], VOCABULARY)
    assert set(counts) == expected and all(n == 1 for n in counts.values())


def test_counts_are_captions_mentioning_and_sorted():
    captions = ["a dog", "dogs and a cat", "a cat", "a bus", "two cats", "a cat and a cat"]
    counts = count_mentions(captions, VOCABULARY)
    assert counts == Counter({"cat": 4, "dog": 2, "bus": 1})
    assert select_nouns(counts, 2) == [("cat", 4), ("dog", 2)]
    assert select_nouns(Counter({"b": 2, "a": 2, "c": 3}), 1) == [("c", 3), ("a", 2), ("b", 2)]


def test_plural_forms():
    assert "boxes" in plural_forms("box") and "wolves" in plural_forms("wolf")
    assert "wives" in plural_forms("wife") and "toys" in plural_forms("toy")
    assert "ladies" in plural_forms("lady") and "mice" in plural_forms("mouse")


def test_default_vocabulary(tmp_path):
    names = coco_class_names()
    assert len(names) == len(set(names)) == 80
    assert names[0] == "person" and names[-1] == "toothbrush" and names[9] == "traffic light"
    assert {name for _, name in ALL_CATEGORIES} <= set(names)
    assert list(default_vocabulary()) == names
    lvis = {"categories": [
        {"id": 2, "name": "bow_(weapon)", "synset": "bow.n.04", "frequency": "r"},
        {"id": 1, "name": "person", "synset": "person.n.01", "frequency": "f"},
        {"id": 3, "name": "bolo_tie", "synset": "bolo_tie.n.01", "frequency": "r"},
    ]}
    path = tmp_path / "lvis.json"
    path.write_text(json.dumps(lvis))
    vocabulary = default_vocabulary(str(path))
    assert list(vocabulary) == names + ["bow weapon", "bolo tie"]
    assert (vocabulary["bow weapon"], vocabulary["bolo tie"]) == ("bow", "bolo tie")
    # a caption names the LVIS class without its qualifier, as Detic's tags
    counts = count_mentions(["two bows and a bolo tie", "a bow weapon", "a person"], vocabulary)
    assert counts == {"bow weapon": 2, "bolo tie": 1, "person": 1}


def test_parser_proposes_extra_nouns():
    captions = ["a dog on grass", "grass and dogs", "a tree", "grass 42"]

    def parser(text):  # a fake noun parser: every word
        return text.split()

    nouns = build_concept_nouns(captions, VOCABULARY, 2, parser=parser)
    # "dog"/"dogs" are vocabulary; "42" and "a" are no nouns; "tree", "on", "and" too rare.
    assert nouns == [("grass", 3), ("dog", 2)]


def test_load_noun_parser(monkeypatch):
    monkeypatch.setitem(sys.modules, "spacy", None)
    monkeypatch.setitem(sys.modules, "nltk", None)
    assert load_noun_parser("auto") is None and load_noun_parser("none") is None

    class Token:
        def __init__(self, word):
            self.lemma_ = word.rstrip("s")
            self.pos_ = "NOUN" if word not in ("a", "two") else "DET"

    fake = types.ModuleType("spacy")
    fake.load = lambda name, disable=(): (lambda text: [Token(w) for w in text.split()])
    monkeypatch.setitem(sys.modules, "spacy", fake)
    assert load_noun_parser("auto")("two kites") == ["kite"]
    with pytest.raises(ValueError, match="noun parser"):
        load_noun_parser("stanza")


def test_iter_caption_texts(tmp_path):
    tsv = write_tsv_dataset(tmp_path / "tsv", 2, 2)
    with open(os.path.join(tsv, "train.text.tsv"), "a") as f:
        f.write('x\t{"tags": "kite beach"}\nraw\ta raw caption\n')
    wds = write_webdataset(tmp_path / "wds", 3)
    jsonl = write_jsonl_dataset(tmp_path / "jsonl", 2, 6)
    txt = tmp_path / "captions.txt"
    txt.write_text("first\n\n second \n")
    assert detect_caption_format(tsv) == "tsv" and detect_caption_format(wds) == "webdataset"
    assert detect_caption_format(jsonl) == "jsonl" and detect_caption_format(str(txt)) == "txt"
    tsv_captions = [caption(i, j) for i in range(2) for j in range(2)]
    assert list(iter_caption_texts(tsv)) == tsv_captions + ["kite beach", "a raw caption"]
    assert list(iter_caption_texts(os.path.join(tsv, "train.text.tsv"))) == \
        tsv_captions + ["kite beach", "a raw caption"]
    assert list(iter_caption_texts(wds)) == [caption(i) for i in range(3)]
    assert list(iter_caption_texts(jsonl)) == [caption(i, j) for i in range(2) for j in range(6)]
    assert list(iter_caption_texts(str(txt))) == ["first", "second"]


def test_tool(tmp_path):
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(["two dogs", "a dog and a cat", "a Cat", "a bus", "cats"]))
    vocabulary = tmp_path / "vocabulary.txt"
    vocabulary.write_text("cat\ndog\nbus\nzebra\n")
    output = tmp_path / "out" / "nouns.txt"
    tool = load_tool("build_concept_nouns")
    tool.main(["--captions", str(captions), "--vocabulary", str(vocabulary), "--min-count", "2",
               "--parser", "none", "--output", str(output)])
    assert output.read_text() == "cat\ndog\n"
    jsonl = write_jsonl_dataset(tmp_path / "jsonl", 8, 1)  # cat, dog, car, person, ... x1
    tool.main(["--captions", jsonl, "--min-count", "1", "--parser", "none",
               "--output", str(output)])
    assert output.read_text().split("\n")[:3] == ["bus", "car", "cat"]  # ties by name
    with pytest.raises(SystemExit, match="no name is mentioned 9 times"):
        tool.main(["--captions", jsonl, "--min-count", "9", "--parser", "none",
                   "--output", str(output)])
