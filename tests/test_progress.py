"""Progress on every wait (issue 13): loading, encoding class names, detection; API and CLI.

Bars go to stderr with a count and an ETA; ``progress=False`` and ``--quiet`` keep it silent.
"""
import logging
import re

import pytest
from _api_utils import CLASSES, TINY_CONFIG, TINY_RPN_CONFIG, save_pretrained, scene, tiny_detector
from PIL import Image

from regionclip.cli import main

NAME = "regionclip_pretrained-cc_rn50.pth"


def bar_done(stderr: str, desc: str, total: int) -> bool:
    """Whether ``stderr`` holds a finished bar ``desc: 100%|...| total/total [elapsed<eta``."""
    pattern = rf"{re.escape(desc)}: 100%\|[^|]*\| {total}/{total} \[\d\d:\d\d<\d\d:\d\d"
    return re.search(pattern, stderr) is not None


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_pretrained(tmp_path_factory.mktemp("progress") / NAME)


def test_loading_shows_its_steps_unless_turned_off(weights, tmp_path, capsys):
    tiny_detector(weights, tmp_path / "cache")
    stderr = capsys.readouterr().err
    assert bar_done(stderr, f"Loading {NAME}", 3), stderr
    for step in ("reading the checkpoint", "building the tiny detector", "loading its weights"):
        assert step in stderr
    tiny_detector(weights, tmp_path / "cache", progress=False)
    assert capsys.readouterr().err == ""


def test_vocabulary_encoding_counts_names_and_says_what_was_cached(
        weights, tmp_path, capsys, caplog):
    detector = tiny_detector(weights, tmp_path / "cache", progress=False)
    caplog.set_level(logging.INFO, logger="regionclip")
    detector.set_vocabulary(CLASSES)
    assert bar_done(capsys.readouterr().err, "Encoding class names", 3)
    assert "0 of 3 names cached" in caplog.text

    detector.set_vocabulary(CLASSES + ["bus"])
    assert bar_done(capsys.readouterr().err, "Encoding class names (3 cached)", 1)
    assert "3 of 4 names cached" in caplog.text

    detector.set_vocabulary(CLASSES)  # all cached: nothing to wait for, no bar
    assert capsys.readouterr().err == ""
    detector.embed_text(["truck"], progress=False)
    assert capsys.readouterr().err == ""


def test_detection_bar_by_default_for_lists_and_on_the_cpu(weights, tmp_path, capsys):
    detector = tiny_detector(weights, tmp_path / "cache", progress=False)
    detector.set_vocabulary(CLASSES, progress=False)
    capsys.readouterr()
    results = detector([scene(), scene((50, 70), 3), scene()], batch_size=2)
    assert len(results) == 3
    assert bar_done(capsys.readouterr().err, "Detecting", 3)

    detector(scene())  # one image on a CPU: a bar while it runs, erased when done
    assert "Detecting" in capsys.readouterr().err
    detector([scene(), scene()], progress=False)
    detector(scene(), progress=False)
    assert capsys.readouterr().err == ""


def _detect_argv(weights, tmp_path, *extra):
    images = tmp_path / "images"
    images.mkdir()
    for index in range(2):
        Image.fromarray(scene(seed=index)).save(images / f"{index}.png")
    return ["detect", str(images), "--classes", ",".join(CLASSES), "--weights", weights,
            "--out", str(tmp_path / "out.json"), "--vis", str(tmp_path / "drawn"),
            "--variant", "tiny", "--config", TINY_CONFIG, "--rpn-config", TINY_RPN_CONFIG,
            "--device", "cpu", *extra]


def test_detect_command_shows_every_wait_and_quiet_shows_none(weights, tmp_path, capsys,
                                                               monkeypatch):
    monkeypatch.setenv("REGIONCLIP_CACHE", str(tmp_path / "cache"))
    assert main(_detect_argv(weights, tmp_path)) == 0
    stderr = capsys.readouterr().err
    for desc, total in ((f"Loading {NAME}", 3), ("Encoding class names", 3),
                        ("Detecting", 2), ("Drawing", 2)):
        assert bar_done(stderr, desc, total), (desc, stderr)
    assert "[INFO] Loading" in stderr and "on cpu: CLIP tiny" in stderr

    quiet = tmp_path / "quiet"
    quiet.mkdir()
    monkeypatch.setenv("REGIONCLIP_CACHE", str(tmp_path / "quiet-cache"))
    assert main(_detect_argv(weights, quiet, "--quiet")) == 0
    captured = capsys.readouterr()
    assert captured.out == ""  # warnings only (the tiny file's missing box deltas), no bars
    assert all(line.startswith("[WARNING]") for line in captured.err.splitlines()), captured.err
