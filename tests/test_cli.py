"""The ``regionclip`` command line (regionclip.cli), run in-process and once as a program."""
import json
import logging
import os
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from _api_utils import (
    CLASSES,
    REPO,
    TINY,
    TINY_CONFIG,
    TINY_RPN_CONFIG,
    save_pretrained,
    scene,
    tiny_detector,
    write_mixed_images,
)
from PIL import Image
from pycocotools.coco import COCO

from regionclip.cli import main
from regionclip.data.catalog import get_dataset_dicts
from regionclip.modeling.text_encoder import save_embeddings

MODEL_ARGS = ["--variant", "tiny", "--config", TINY_CONFIG, "--rpn-config", TINY_RPN_CONFIG,
              "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_pretrained(tmp_path_factory.mktemp("cli") / "regionclip_pretrained-cc_rn50.pth")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """A private embedding cache; the CLI's logging setup is undone afterwards."""
    monkeypatch.setenv("REGIONCLIP_CACHE", str(tmp_path / "cache"))
    log = logging.getLogger("regionclip")
    saved = (list(log.handlers), log.level, log.propagate)
    yield
    log.handlers[:], log.level, log.propagate = saved


def detect_args(weights, images, out, *extra, classes=",".join(CLASSES)):
    vocabulary = ["--classes", classes] if classes is not None else []
    return ["detect", *images, *vocabulary, "--weights", weights, "--out", str(out),
            "--score-threshold", "0", *MODEL_ARGS, *extra]


def test_detect_says_why_when_no_region_passes_the_threshold(weights, tmp_path, capsys):
    write_mixed_images(tmp_path / "images")
    out = tmp_path / "results.json"
    assert main(detect_args(weights, [str(tmp_path / "images")], out,
                            "--score-threshold", "1e9")) == 0
    assert json.loads(out.read_text())["annotations"] == []
    assert "No region scored above the score threshold" in capsys.readouterr().err
    assert main(detect_args(weights, [str(tmp_path / "images")], out)) == 0
    assert json.loads(out.read_text())["annotations"]
    assert "No region scored" not in capsys.readouterr().err


def test_detect_round_trip_on_mixed_sizes_and_formats(weights, tmp_path):
    paths = write_mixed_images(tmp_path / "images")
    other = tmp_path / "more" / "rgb.jpg"  # same file name as an image of the folder
    other.parent.mkdir()
    Image.fromarray(scene((50, 50), 9)).save(other)
    out, vis = tmp_path / "out" / "results.json", tmp_path / "drawn"
    assert main(detect_args(weights, [str(tmp_path / "images"), str(other)], out,
                            "--vis", str(vis), "--vis-threshold", "0")) == 0

    document = json.loads(out.read_text())
    files = sorted(paths.values()) + [str(other)]
    assert [(i["id"], i["file_name"]) for i in document["images"]] == list(enumerate(files, 1))
    assert document["categories"] == [{"id": k + 1, "name": n} for k, n in enumerate(CLASSES)]
    coco = COCO(str(out))  # a valid COCO-style file
    assert len(coco.getAnnIds()) == len(document["annotations"]) > 0
    for image in document["images"]:
        height, width = Image.open(image["file_name"]).size[::-1]
        assert (image["height"], image["width"]) == (height, width)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]])):
            x, y, w, h = ann["bbox"]
            assert 0 <= x <= x + w <= width and 0 <= y <= y + h <= height
            assert ann["category_id"] in (1, 2, 3)

    drawn = sorted(os.listdir(vis))
    assert drawn == sorted(list(paths) + ["5_rgb.jpg"])
    for image, name in zip(document["images"], [os.path.basename(f) for f in files[:-1]]):
        assert cv2.imread(str(vis / name)).shape == (image["height"], image["width"], 3)

    detector = tiny_detector(weights, tmp_path / "cache", score_threshold=0.0)
    detector.set_vocabulary(CLASSES)
    expected = detector(files[0])
    got = [a for a in document["annotations"] if a["image_id"] == 1]
    assert [a["score"] for a in got] == pytest.approx(expected.scores.tolist(), rel=1e-5)
    assert [CLASSES[a["category_id"] - 1] for a in got] == expected.labels


def test_vocabulary_file_and_precomputed_embeddings(weights, tmp_path):
    image = tmp_path / "scene.png"
    Image.fromarray(scene()).save(image)
    names = tmp_path / "names.txt"
    names.write_text("\n".join(CLASSES) + "\n")
    embeddings = tmp_path / "emb.pth"
    save_embeddings(torch.randn(3, TINY.embed_dim), str(embeddings))
    out = tmp_path / "results.json"
    assert main(detect_args(weights, [str(image)], out, "--vocabulary", str(names),
                            "--embeddings", str(embeddings), classes=None)) == 0
    assert [c["name"] for c in json.loads(out.read_text())["categories"]] == CLASSES


def _missing_image(d):
    return [str(d / "missing.png")], []


def _corrupt_image(d):
    (d / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage, not an image")
    return [str(d / "bad.png")], []


def _truncated_image(d):  # a valid header: it fails only when decoded, after good.png ran
    noise = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    Image.fromarray(noise).save(d / "cut.jpg")
    (d / "cut.jpg").write_bytes((d / "cut.jpg").read_bytes()[:1800])
    return [str(d / "cut.jpg")], []


def _classes(text):
    return lambda d: ([], ["--classes", text])


def _narrow_embeddings(d):
    save_embeddings(torch.randn(3, 16), str(d / "narrow.pth"))
    return [], ["--embeddings", str(d / "narrow.pth")]


def _missing_checkpoint(d):
    return [], ["--weights", str(d / "regionclip_nothere.pth")]


BAD_INPUTS = {  # case: (make the input in a folder -> (extra images, extra args), message)
    "missing image": (_missing_image, "missing.png"),
    "corrupt image": (_corrupt_image, "bad.png"),
    "truncated image": (_truncated_image, "cut.jpg"),
    "empty vocabulary": (_classes(""), "empty vocabulary"),
    "duplicate class": (_classes("cat,dog,cat"), "duplicate.*cat"),
    "width mismatch": (_narrow_embeddings, "narrow.pth.*width 32"),
    "missing checkpoint": (_missing_checkpoint, "regionclip_nothere.pth.*MODEL_ZOO.md"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_clearly_without_partial_json(weights, tmp_path, capsys, case):
    make, message = BAD_INPUTS[case]
    good = tmp_path / "good.png"
    Image.fromarray(scene()).save(good)
    images, extra = make(tmp_path)
    out_dir = tmp_path / "out"
    assert main(detect_args(weights, [str(good), *images], out_dir / "results.json",
                            *extra)) == 1
    error = capsys.readouterr().err
    assert re.search(message, error), error
    assert "Traceback" not in error
    assert not out_dir.exists() or os.listdir(out_dir) == []


def test_embed_writes_the_region_embeddings(weights, tmp_path, capsys):
    image = tmp_path / "scene.jpg"
    Image.fromarray(scene((64, 90), 3)).save(image)
    boxes = [[0, 0, 30, 40], [10, 5, 80, 60]]
    detector = tiny_detector(weights, tmp_path / "cache")
    expected = detector.embed_regions(str(image), boxes)
    out = tmp_path / "emb.pth"
    spec = ";".join(",".join(str(v) for v in box) for box in boxes)
    assert main(["embed", str(image), "--boxes", spec, "--weights", weights, "--out", str(out),
                 *MODEL_ARGS]) == 0
    saved = torch.load(out, weights_only=True)
    torch.testing.assert_close(saved["embeddings"], expected)
    torch.testing.assert_close(saved["boxes"], torch.tensor(boxes, dtype=torch.float32))
    boxes_json = tmp_path / "boxes.json"
    boxes_json.write_text(json.dumps({"boxes": boxes}))
    assert main(["embed", str(image), "--boxes-json", str(boxes_json), "--weights", weights,
                 "--out", str(tmp_path / "emb2.pth"), *MODEL_ARGS]) == 0
    torch.testing.assert_close(torch.load(tmp_path / "emb2.pth")["embeddings"], expected)
    for bad, message in (("1,2,3", "box 0"), ("0,0,5,5;500,500,600,600", "outside")):
        assert main(["embed", str(image), "--boxes", bad, "--weights", weights, "--out",
                     str(tmp_path / "bad.pth"), *MODEL_ARGS]) == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad.pth").exists()


@pytest.mark.slow
def test_python_dash_m_entry_point(weights, tmp_path):
    image = tmp_path / "scene.png"
    Image.fromarray(scene()).save(image)
    out = tmp_path / "results.json"
    env = {**os.environ, "REGIONCLIP_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "regionclip.cli",
                           *detect_args(weights, [str(image)], out)],
                          cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(out.read_text())["images"][0]["file_name"] == str(image)


HELP_PROBE = """
import runpy, sys
sys.argv = ["regionclip", *sys.argv[1:]]
try:
    runpy.run_module("regionclip.cli", run_name="__main__")  # python -m regionclip.cli ...
except SystemExit as exit:
    assert exit.code == 0, exit.code
print("imported:", sorted(m for m in ("torch", "cv2", "numpy") if m in sys.modules))
"""


@pytest.mark.parametrize("argv", [["--help"], ["detect", "--help"], ["embed", "--help"]])
def test_help_imports_nothing_heavy_and_reads_as_plain_text(argv):
    done = subprocess.run([sys.executable, "-c", HELP_PROBE, *argv], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    *text, imported = done.stdout.splitlines()
    assert imported == "imported: []"
    assert text[0].startswith("usage: regionclip") and "--help" in "\n".join(text)
    assert not re.search(r"``|:func:|:class:", done.stdout)
    if argv == ["--help"]:
        assert "The regionclip command: detect named classes in images" in done.stdout


def test_detect_ids_are_train_nets_custom_image_ids(weights, tmp_path):
    """Both writers number a folder's images from 1 in name order (datasets/README.md)."""
    paths = write_mixed_images(tmp_path / "images")
    out = tmp_path / "results.json"
    assert main(detect_args(weights, [str(tmp_path / "images")], out)) == 0
    detect_ids = {i["file_name"]: i["id"] for i in json.loads(out.read_text())["images"]}
    records = get_dataset_dicts("lvis_v1_val_custom_img", input_dir=str(tmp_path / "images"))
    assert detect_ids == {r["file_name"]: r["image_id"] for r in records}
    assert sorted(detect_ids.values()) == list(range(1, len(paths) + 1))


def test_precision_flag_reaches_the_detector(monkeypatch):
    from regionclip import cli, commands

    seen = {}
    monkeypatch.setattr(commands.Detector, "from_pretrained", lambda *a, **k: seen.update(k))
    args = cli.build_parser().parse_args(["detect", "x.jpg", "--classes", "cat", "--out", "o",
                                          "--weights", "w.pth", "--precision", "bf16"])
    commands.load_detector(args)
    assert seen["precision"] == "bf16"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["embed", "x.jpg", "--boxes", "0,0,1,1", "--out", "o",
                                       "--weights", "w.pth", "--precision", "fp16"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_gpu_detect_agrees_with_cpu(weights, tmp_path, precision):
    from _agreement import matched_fraction

    paths = sorted(write_mixed_images(tmp_path / "images").values())
    documents = []
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.json"
        args = detect_args(weights, paths, out, "--precision", precision, "--batch-size", "2")
        args[args.index("--device") + 1] = device
        assert main(args) == 0
        documents.append(json.loads(out.read_text())["annotations"])

    def per_image(annotations):
        rows = [[a for a in annotations if a["image_id"] == i + 1] for i in range(len(paths))]
        return [(torch.tensor([[x, y, x + w, y + h] for x, y, w, h in
                               (a["bbox"] for a in r)]).reshape(-1, 4),
                 torch.tensor([a["score"] for a in r]),
                 torch.tensor([a["category_id"] for a in r])) for r in rows]
    tolerance = 1e-4 if precision == "fp32" else 0.02
    matched, total = matched_fraction(*map(per_image, documents), score_tol=tolerance)
    assert total > 10 and matched >= 0.99 * total
