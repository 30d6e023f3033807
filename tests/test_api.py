"""The Python API (regionclip.api.Detector): detections, embeddings, inputs and their errors."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from _api_utils import (
    CLASSES,
    REPO,
    TINY,
    TINY_CONFIG,
    TINY_RPN_CONFIG,
    save_checkpoint_files,
    scene,
    tiny_detector,
    write_mixed_images,
)
from _checkpoint_utils import make_state_dict, prefixed, text_shapes
from _data_utils import make_coco_dataset
from PIL import Image

from regionclip.checkpoint import CheckpointMismatchError, save_checkpoint
from regionclip.config.variants import get_variant
from regionclip.evaluation.results import instances_to_coco_json
from regionclip.modeling.text_encoder import save_embeddings
from regionclip.vocabulary import ClassNameEncoder

FUSED = ["MODEL.CLIP.MULTIPLY_RPN_SCORE", "True"]  # exercise the original's score fusion too
KEEP_ALL = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]  # the random tiny CLIP is unsure


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return save_checkpoint_files(tmp_path_factory.mktemp("api"))


@pytest.fixture(scope="module")
def detector(files, tmp_path_factory):
    det = tiny_detector(files["pretrained"], tmp_path_factory.mktemp("cache"), overrides=KEEP_ALL)
    det.set_vocabulary(CLASSES)
    return det


# ------------------------------------------------------------------ equality with train_net


def _train_net_results(tmp_path, weights, emb_path, dataset, extra):
    out = tmp_path / "train_net"
    command = [sys.executable, "tools/train_net.py", "--eval-only", "--config-file",
               TINY_CONFIG, "MODEL.WEIGHTS", weights, "MODEL.CLIP.TEXT_EMB_PATH", emb_path,
               "DATASETS.TEST", f'("coco_json:{dataset[0]}:{dataset[1]}",)',
               "OUTPUT_DIR", str(out), *extra]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "inference" / "coco_instances_results.json").read_text())


def _gt_boxes(json_path):
    content = json.loads(open(json_path).read())
    boxes = {img["id"]: [] for img in content["images"]}
    for ann in content["annotations"]:
        x, y, w, h = ann["bbox"]
        boxes[ann["image_id"]].append([x, y, x + w, y + h])
    return content["images"], boxes


@pytest.mark.slow
@pytest.mark.parametrize("regions", ["RPN", "GT"])
def test_detections_equal_train_net_eval_only(files, tmp_path, regions):
    json_path, image_dir = make_coco_dataset(tmp_path / "data", num_images=2, image_size=(60, 80))
    rpn = regions == "RPN"  # with fine-tuned weights: box regression and score fusion run
    weights = files["finetuned"] if rpn else files["pretrained"]
    kwargs = {"text_weights": files["pretrained"]} if rpn else {}
    overrides = FUSED if rpn else KEEP_ALL
    extra = ["MODEL.CLIP.CROP_REGION_TYPE", "RPN", "MODEL.CLIP.OFFLINE_RPN_CONFIG",
             TINY_RPN_CONFIG] if rpn else []
    emb_path = str(tmp_path / "emb.pth")
    save_embeddings(ClassNameEncoder(files["pretrained"], TINY, cache_dir="")(CLASSES), emb_path)
    expected = _train_net_results(tmp_path, weights, emb_path, (json_path, image_dir),
                                  extra + overrides)

    detector = tiny_detector(weights, tmp_path / "cache", overrides=overrides, **kwargs)
    detector.set_vocabulary(CLASSES)
    images, gt_boxes = _gt_boxes(json_path)
    got = []
    for image in images:
        path = f"{image_dir}/{image['file_name']}"
        boxes = gt_boxes[image["id"]] if regions == "GT" else None
        result = detector(path, boxes=boxes)
        got += instances_to_coco_json(result.to_instances(), image["id"], {0: 1, 1: 3, 2: 18})
    assert len(got) == len(expected) > 0
    for mine, theirs in zip(got, expected):
        assert (mine["image_id"], mine["category_id"]) == (theirs["image_id"],
                                                           theirs["category_id"])
        assert mine["bbox"] == pytest.approx(theirs["bbox"], abs=1e-3)
        assert mine["score"] == pytest.approx(theirs["score"], rel=1e-4, abs=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_train_net_eval_only_agrees_with_cpu(files, tmp_path):
    from _agreement import matched_fraction

    json_path, image_dir = make_coco_dataset(tmp_path / "data", num_images=3, image_size=(60, 80))
    emb_path = str(tmp_path / "emb.pth")
    save_embeddings(ClassNameEncoder(files["pretrained"], TINY, cache_dir="")(CLASSES), emb_path)
    extra = ["MODEL.CLIP.CROP_REGION_TYPE", "RPN", "MODEL.CLIP.OFFLINE_RPN_CONFIG",
             TINY_RPN_CONFIG, *FUSED, "TEST.IMS_PER_BATCH", "2"]
    results = []
    for device in ("cpu", "cuda"):
        (tmp_path / device).mkdir()
        detections = _train_net_results(tmp_path / device, files["finetuned"], emb_path,
                                        (json_path, image_dir), extra + ["MODEL.DEVICE", device])
        results.append([(torch.tensor([[x, y, x + w, y + h] for x, y, w, h in
                                       (d["bbox"] for d in detections if d["image_id"] == i)]
                                      ).reshape(-1, 4),
                         torch.tensor([d["score"] for d in detections if d["image_id"] == i]),
                         torch.tensor([d["category_id"] for d in detections
                                       if d["image_id"] == i])) for i in (1, 2, 3)])
    matched, total = matched_fraction(*results, score_tol=1e-4)
    assert total > 10 and matched >= 0.99 * total


# ------------------------------------------------------------------ vocabulary invariances


def _by_box_and_label(result):
    return {(tuple(np.round(b, 3)), label): (s, e)
            for b, label, s, e in zip(result.boxes.tolist(), result.labels,
                                      result.scores.tolist(), result.embeddings)}


def _by_box(result):
    return {tuple(np.round(b, 3)): e for b, e in zip(result.boxes.tolist(), result.embeddings)}


def test_permuting_the_vocabulary_permutes_class_assignments_only(detector):
    image = scene(seed=5)
    detector.set_vocabulary(CLASSES)
    before = detector(image, return_embeddings=True)
    detector.set_vocabulary(CLASSES[::-1])
    after = detector(image, return_embeddings=True)
    detector.set_vocabulary(CLASSES)
    assert len(before) > 0
    a, b = _by_box_and_label(before), _by_box_and_label(after)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key][0] == pytest.approx(b[key][0], rel=1e-5)
        torch.testing.assert_close(a[key][1], b[key][1])
    for result, names in ((before, CLASSES), (after, CLASSES[::-1])):
        assert result.labels == [names[i] for i in result.class_ids.tolist()]


def test_adding_a_class_never_changes_region_embeddings(detector):
    image = scene(seed=6)
    before = _by_box(detector(image, return_embeddings=True))
    detector.set_vocabulary(CLASSES + ["traffic cone"])
    after = _by_box(detector(image, return_embeddings=True))
    detector.set_vocabulary(CLASSES)
    common = before.keys() & after.keys()
    assert common
    for key in common:
        assert torch.equal(before[key], after[key])


# ------------------------------------------------------------------ region embeddings


def test_embed_regions_equals_the_detectors_region_embeddings(detector):
    image = scene(seed=7)
    result = detector(image, return_embeddings=True)
    assert len(result) > 0 and result.embeddings.shape == (len(result), TINY.embed_dim)
    torch.testing.assert_close(result.embeddings.norm(dim=1), torch.ones(len(result)))
    torch.testing.assert_close(detector.embed_regions(image, result.boxes), result.embeddings,
                               atol=1e-5, rtol=1e-4)


def test_embed_regions_batched_equals_one_by_one_and_given_boxes_agree(detector):
    image = scene((70, 90), seed=8)
    boxes = [[0, 0, 30, 40], [10.5, 5, 80, 66], [40, 30, 90, 70], [0, 0, 90, 70]]
    batched = detector.embed_regions(image, boxes)
    single = torch.cat([detector.embed_regions(image, [b]) for b in boxes])
    torch.testing.assert_close(batched, single, atol=1e-6, rtol=1e-5)
    result = detector(image, boxes=boxes, return_embeddings=True)
    for box, embedding in zip(result.boxes.tolist(), result.embeddings):
        index = min(range(len(boxes)), key=lambda i: np.abs(np.subtract(boxes[i], box)).sum())
        torch.testing.assert_close(embedding, batched[index], atol=1e-5, rtol=1e-4)
    assert detector.embed_regions(image, []).shape == (0, TINY.embed_dim)


def test_embed_text_is_unit_norm_and_matches_the_classifier(detector):
    text = detector.embed_text(CLASSES)
    assert text.shape == (3, TINY.embed_dim)
    torch.testing.assert_close(text.norm(dim=1), torch.ones(3))
    stored = detector.model.roi_heads.box_predictor.test_cls_score.weight
    torch.testing.assert_close(torch.nn.functional.normalize(stored, dim=1), text)


def test_bad_boxes_are_named(detector):
    image = scene(seed=9)
    with pytest.raises(ValueError, match=r"box 1 .*x1 > x0"):
        detector.embed_regions(image, [[0, 0, 5, 5], [10, 10, 5, 20]])
    with pytest.raises(ValueError, match="outside"):
        detector.embed_regions(image, [[500, 500, 600, 600]])
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        detector.embed_regions(image, [[1, 2, 3]])


# ------------------------------------------------------------------ inputs and batches


def test_path_array_and_pil_inputs_agree(detector, tmp_path):
    paths = write_mixed_images(tmp_path)
    for name in ("grey.png", "rgba.png"):
        from_path = detector(paths[name])
        rgb = Image.open(paths[name]).convert("RGB")
        for other in (detector(rgb), detector(np.asarray(rgb))):
            torch.testing.assert_close(other.boxes, from_path.boxes)
            torch.testing.assert_close(other.scores, from_path.scores)
    grey = np.asarray(Image.open(paths["grey.png"]))
    torch.testing.assert_close(detector(grey).scores, detector(paths["grey.png"]).scores)


def test_a_list_of_mixed_sizes_equals_one_by_one(detector, tmp_path):
    paths = list(write_mixed_images(tmp_path).values())
    results = detector(paths, return_embeddings=True)
    assert len(results) == len(paths)
    for path, result in zip(paths, results):
        alone = detector(path, return_embeddings=True)
        assert result.image_size == Image.open(path).size[::-1]
        torch.testing.assert_close(result.boxes, alone.boxes)
        torch.testing.assert_close(result.embeddings, alone.embeddings)
        assert result.labels == alone.labels
        if len(result):
            assert result.boxes[:, 2].max() <= result.image_size[1]
            assert result.boxes[:, 3].max() <= result.image_size[0]
    batched = detector(paths, batch_size=3)
    assert [r.image_size for r in batched] == [r.image_size for r in results]


def test_bad_images_raise_clear_errors(detector, tmp_path):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(OSError, match="corrupt.jpg"):
        detector(str(corrupt))
    with pytest.raises(OSError, match="missing.png"):
        detector(str(tmp_path / "missing.png"))
    with pytest.raises(ValueError, match="uint8"):
        detector(np.zeros((10, 10, 3), dtype=np.float32))
    with pytest.raises(TypeError, match="unsupported image type"):
        detector(42)


# ------------------------------------------------------------------ vocabulary validation


@pytest.mark.parametrize("names, message", [
    ([], "empty vocabulary"), (["cat", "dog", "cat"], "duplicate.*cat"),
    (["cat", "  "], r"blank class name\(s\) at position\(s\) \[2\]"),
    ("cat", "list of class-name strings")])
def test_bad_vocabularies(detector, names, message):
    with pytest.raises(ValueError, match=message):
        detector.set_vocabulary(names)


def test_embedding_width_mismatch(detector, tmp_path):
    with pytest.raises(ValueError, match="embedding width 32"):
        detector.set_vocabulary(CLASSES, embeddings=torch.randn(3, 16))
    path = str(tmp_path / "emb.pth")
    save_embeddings(torch.randn(3, 16), path)
    with pytest.raises(ValueError, match="emb.pth"):
        detector.set_vocabulary(CLASSES, embeddings=path)
    detector.set_vocabulary(CLASSES)


def test_fine_tuned_weights_need_a_text_tower(files, tmp_path):
    detector = tiny_detector(files["finetuned"], tmp_path)
    with pytest.raises(ValueError, match="text_weights"):
        detector.set_vocabulary(CLASSES)
    with pytest.raises(RuntimeError, match="set_vocabulary"):
        detector(scene())
    detector.set_vocabulary(CLASSES, embeddings=torch.randn(3, TINY.embed_dim))
    assert detector(scene()).image_size == (60, 80)
    wrong = str(tmp_path / "rn50_text.pth")  # an RN50 text tower: 1024-wide embeddings
    save_checkpoint(wrong, make_state_dict(prefixed("lang_encoder.", text_shapes(
        get_variant("RN50")))))
    other = tiny_detector(files["finetuned"], tmp_path, text_weights=wrong)
    with pytest.raises(CheckpointMismatchError, match="does not match this tiny detector"):
        other.set_vocabulary(CLASSES)


def test_without_an_rpn_the_caller_gives_boxes(files, tmp_path):
    detector = tiny_detector(files["gt_only"], tmp_path, rpn=False,
                             text_weights=files["pretrained"], overrides=KEEP_ALL)
    detector.set_vocabulary(CLASSES)
    with pytest.raises(ValueError, match="boxes="):
        detector(scene())
    result = detector(scene(), boxes=[[0, 0, 20, 20], [5, 5, 60, 50]])
    assert set(result.labels) <= set(CLASSES) and len(result) > 0
    assert {tuple(b) for b in result.boxes.tolist()} <= {(0, 0, 20, 20), (5, 5, 60, 50)}


def test_missing_checkpoint_points_to_the_model_zoo(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"regionclip_finetuned-coco_rn50.pth.*MODEL_ZOO"):
        tiny_detector(tmp_path / "regionclip_finetuned-coco_rn50.pth", tmp_path)


# ------------------------------------------------------------------ the embedding cache


def test_vocabulary_cache_skips_the_text_tower(files, tmp_path, monkeypatch):
    first = tiny_detector(files["pretrained"], tmp_path / "cache")
    expected = first.embed_text(["zebra", "yak"])
    assert list((tmp_path / "cache" / "text").glob("*-*/*.pth"))
    monkeypatch.setenv("REGIONCLIP_CACHE", str(tmp_path / "cache"))
    second = tiny_detector(files["pretrained"], None)
    second.text_encoder._loader = None  # a cache miss would now fail
    torch.testing.assert_close(second.embed_text(["yak", "zebra"]), expected.flip(0))
    assert second.text_encoder._encoder is None


def test_cache_key_follows_the_text_tower_weights(files, tmp_path):
    state = torch.load(files["pretrained"], weights_only=True)["model"]
    state["lang_encoder.ln_final.bias"] = state["lang_encoder.ln_final.bias"] + 1.0
    altered = str(tmp_path / "altered.pth")
    save_checkpoint(altered, state)
    a = tiny_detector(files["pretrained"], tmp_path / "cache").embed_text(["cat"])
    b = tiny_detector(altered, tmp_path / "cache").embed_text(["cat"])
    fresh = tiny_detector(altered, "").embed_text(["cat"])
    assert not torch.allclose(a, b)
    torch.testing.assert_close(b, fresh)


# ------------------------------------------------------------------ records and defaults


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_detections_match_cpu(files, detector, tmp_path):
    gpu = tiny_detector(files["pretrained"], tmp_path, device="cuda")
    gpu.set_vocabulary(CLASSES)
    image = scene(seed=11)
    cpu_result, gpu_result = detector(image, return_embeddings=True), gpu(image,
                                                                         return_embeddings=True)
    assert gpu.device.type == "cuda" and gpu_result.boxes.device.type == "cpu"
    torch.testing.assert_close(gpu_result.boxes, cpu_result.boxes, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(gpu_result.embeddings, cpu_result.embeddings, atol=1e-3,
                               rtol=1e-3)
