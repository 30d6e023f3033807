"""Detic's CustomRCNN: checkpoint layout and loading, the zero-shot classifier against a hand
computation, the test-time classifier switch, and its configs."""
import math

import numpy as np
import pytest
import torch
from _checkpoint_utils import make_state_dict, prefixed, text_shapes
from _detic_utils import (
    DETIC_CONFIGS,
    OVCOCO_CONFIGS,
    TINY_DETIC,
    detic_shapes,
    save_npy_embeddings,
)

from regionclip.checkpoint import detect_format, load_checkpoint
from regionclip.config import load_config
from regionclip.config.variants import get_variant
from regionclip.engine.defaults import auto_output_dir
from regionclip.engine.weights import load_weights
from regionclip.modeling.build import build_model
from regionclip.modeling.detic.build import test_classifier as detic_test_classifier
from regionclip.modeling.detic.zero_shot_classifier import ZeroShotClassifier, load_class_embeddings


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def npy(tmp_path_factory):
    return save_npy_embeddings(tmp_path_factory.mktemp("meta") / "coco_clip_a+cname.npy", 80)


@pytest.fixture(scope="module")
def released(npy):
    """The BoxSup and caption models at their released sizes (CPU, built once)."""
    torch.manual_seed(0)
    models = {}
    for name in ("BoxSup_OVCOCO_CLIP_R50_1x", "Detic_OVCOCO_CLIP_R50_1x_caption"):
        cfg = load_config(DETIC_CONFIGS / f"{name}.yaml", [
            "MODEL.DEVICE", "cpu", "MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH", npy])
        models[name] = build_model(cfg)
    return models


# ---------------------------------------------------------------------------------------------
# Checkpoint layout and loading
# ---------------------------------------------------------------------------------------------
def test_released_layouts_have_detics_names_and_shapes(released):
    boxsup, caption = (released[n] for n in ("BoxSup_OVCOCO_CLIP_R50_1x",
                                             "Detic_OVCOCO_CLIP_R50_1x_caption"))
    assert _shapes(boxsup) == detic_shapes()
    assert len(detic_shapes()) == 279
    assert _shapes(caption) == detic_shapes(text=True)
    assert len(detic_shapes(text=True)) == 279 + 149


def test_a_detic_file_is_recognised_and_loads_completely(released, tmp_path):
    path = tmp_path / "BoxSup_OVCOCO_CLIP_R50_1x.pth"
    state = make_state_dict(detic_shapes(), seed=1)
    assert detect_format(state) == "detic"
    torch.save({"model": state, "iteration": 90000}, path)
    model = released["BoxSup_OVCOCO_CLIP_R50_1x"]
    report = load_checkpoint(model, path)
    assert report.format == "detic" and len(report.loaded) == 279
    assert not (report.missing or report.unexpected or report.mismatched or report.unused)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_the_text_tower_is_loaded_or_unused_by_design(released, tmp_path):
    path = tmp_path / "caption.pth"
    torch.save({"model": make_state_dict(detic_shapes(text=True), seed=2)}, path)
    report = load_checkpoint(released["BoxSup_OVCOCO_CLIP_R50_1x"], path)
    assert len(report.unused) == 149 and all(k.startswith("text_encoder.") for k in report.unused)
    assert "Unused by design (the model has no such part): text_encoder (149 tensors)" in \
        report.summary()
    report = load_checkpoint(released["Detic_OVCOCO_CLIP_R50_1x_caption"], path)
    assert len(report.loaded) == 428 and not report.missing


def test_openai_clip_file_gives_the_caption_model_its_text_tower_only(tmp_path):
    """MODEL.CAPTION_TEXT_WEIGHTS: CLIP's text tower -> text_encoder, its image tower unused."""
    clip = {**prefixed("visual.", {"conv1.weight": (8, 3, 3, 3)}),
            **text_shapes(get_variant("tiny"))}
    state = make_state_dict(clip, seed=3)
    state["logit_scale"] = torch.tensor(4.6)
    path = tmp_path / "clip.pt"
    torch.save(state, path)
    cfg = load_config(TINY_DETIC, ["MODEL.WITH_CAPTION", "True", "MODEL.CAPTION_TEXT_WEIGHTS",
                                   str(path), "MODEL.ROI_BOX_HEAD.IGNORE_ZERO_CATS", "False"])
    model = build_model(cfg)
    load_weights(cfg, model)
    for key, value in text_shapes(get_variant("tiny")).items():
        assert torch.equal(model.state_dict()[f"text_encoder.{key}"], state[key]), key
    report = load_checkpoint(model, path, skip_prefixes=["backbone", "proposal_generator",
                                                         "roi_heads"])
    assert report.unused == ["visual.conv1.weight"] and not report.missing


def test_a_class_embedding_file_wins_over_the_checkpoints_classifier(tmp_path):
    npy = save_npy_embeddings(tmp_path / "three.npy", 3, dim=32)
    path = tmp_path / "tiny.pth"
    state = make_state_dict(detic_shapes(3, tiny=True, anchors=9), seed=4)
    torch.save({"model": state}, path)
    cfg = load_config(TINY_DETIC, ["MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH", npy,
                                   "MODEL.WEIGHTS", str(path)])
    model = build_model(cfg)
    load_weights(cfg, model)
    weight = model.roi_heads.box_predictor.cls_score.zs_weight
    expected = torch.from_numpy(np.load(npy).astype(np.float32)).t()
    assert torch.allclose(weight[:, :3], expected / expected.norm(dim=0), atol=1e-6)
    freq_key = "roi_heads.box_predictor.freq_weight"
    assert torch.equal(model.state_dict()[freq_key], state[freq_key])


# ---------------------------------------------------------------------------------------------
# The zero-shot classifier against a hand computation
# ---------------------------------------------------------------------------------------------
def _hand_logits(x, weight, bias, embeddings, temperature, cls_bias=0.0, background=True):
    """float64 loops: 50 * cos(W x + b, e_c) for each class, then a 0 background logit."""
    rows = []
    for region in x:
        z = [sum(w * v for w, v in zip(row, region)) + b for row, b in zip(weight, bias)]
        z_norm = math.sqrt(sum(v * v for v in z))
        logits = []
        for e in embeddings:
            e_norm = math.sqrt(sum(v * v for v in e))
            logits.append(temperature * sum(a * c for a, c in zip(z, e)) / (z_norm * e_norm))
        rows.append([v + cls_bias for v in logits + ([0.0] if background else [])])
    return torch.tensor(rows, dtype=torch.float64)


def test_zero_shot_logits_equal_a_hand_computation():
    gen = torch.Generator().manual_seed(0)
    x, emb = torch.randn(4, 6, generator=gen), torch.randn(3, 5, generator=gen) * 10
    classifier = ZeroShotClassifier(6, 3, dim=5, embeddings=emb, use_bias=-2.0)
    w, b = classifier.linear.weight.tolist(), classifier.linear.bias.tolist()
    expected = _hand_logits(x.tolist(), w, b, emb.tolist(), 50.0, cls_bias=-2.0)
    assert torch.allclose(classifier(x).double(), expected, atol=1e-4)
    captions = torch.randn(2, 5, generator=gen)
    expected = _hand_logits(x.tolist(), w, b, captions.tolist(), 50.0, -2.0, background=False)
    assert torch.allclose(classifier(x, classifier=captions).double(), expected, atol=1e-4)


def test_classifier_matrix_is_normalised_columns_plus_a_zero_background():
    emb = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    classifier = ZeroShotClassifier(2, 2, dim=2, embeddings=emb)
    assert torch.allclose(classifier.zs_weight,
                          torch.tensor([[0.6, 0.0, 0.0], [0.8, 1.0, 0.0]]))
    assert "cls_bias" not in classifier.state_dict()  # USE_BIAS 0: no bias, as the released


def test_npy_class_embeddings_load_as_float32_and_are_checked(tmp_path):
    path = save_npy_embeddings(tmp_path / "e.npy", 7, dim=512)
    emb = load_class_embeddings(path, 512)
    assert emb.dtype == torch.float32 and emb.shape == (7, 512)
    assert torch.equal(emb, torch.from_numpy(np.load(path).astype(np.float32)))
    with pytest.raises(ValueError, match=r"expected \[C, 32\]"):
        load_class_embeddings(path, 32)
    with pytest.raises(FileNotFoundError, match="datasets/metadata"):
        load_class_embeddings(str(tmp_path / "missing.npy"), 512)


# ---------------------------------------------------------------------------------------------
# Test-time classifier switch (MODEL.RESET_CLS_TESTS) on the C4 model
# ---------------------------------------------------------------------------------------------
def test_reset_cls_test_swaps_the_classifier_of_the_c4_model_per_dataset(tmp_path):
    five, two = (save_npy_embeddings(tmp_path / f"{n}.npy", n, dim=32, seed=n) for n in (5, 2))
    cfg = load_config(TINY_DETIC, [
        "MODEL.ROI_BOX_HEAD.IGNORE_ZERO_CATS", "False", "DATASETS.TEST", "('a', 'b')",
        "MODEL.RESET_CLS_TESTS", "True", "MODEL.TEST_CLASSIFIERS", f"('{five}', '{two}')",
        "MODEL.TEST_NUM_CLASSES", "(5, 2)"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    image = [{"image": torch.rand(3, 64, 96) * 255}]
    for index, count in enumerate((5, 2)):
        model.set_test_classifier(detic_test_classifier(cfg, index))
        assert model.roi_heads.box_predictor.num_classes == count
        with torch.no_grad():
            classes = model(image)[0]["instances"].pred_classes
        assert len(classes) and int(classes.max()) < count
    assert model.train().roi_heads.box_predictor.num_classes == 3  # training keeps its own
    assert "roi_heads.box_predictor.cls_score.test_weight" not in model.state_dict()


def test_reset_cls_test_settings_are_checked(tmp_path):
    five = save_npy_embeddings(tmp_path / "5.npy", 5, dim=32)
    base = ["MODEL.RESET_CLS_TESTS", "True", "DATASETS.TEST", "('a',)",
            "MODEL.TEST_CLASSIFIERS", f"('{five}',)"]
    cfg = load_config(TINY_DETIC, base + ["MODEL.TEST_NUM_CLASSES", "(6,)"])
    with pytest.raises(ValueError, match="holds 5 classes but MODEL.TEST_NUM_CLASSES says 6"):
        detic_test_classifier(cfg, 0)
    cfg = load_config(TINY_DETIC, base + ["MODEL.TEST_NUM_CLASSES", "(5, 5)"])
    with pytest.raises(ValueError, match="one MODEL.TEST_CLASSIFIERS and one"):
        detic_test_classifier(cfg, 0)


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", OVCOCO_CONFIGS)
def test_the_four_ovcoco_configs_load_with_detics_settings(name):
    cfg = load_config(DETIC_CONFIGS / f"{name}.yaml")
    head = cfg.MODEL.ROI_BOX_HEAD
    assert cfg.MODEL.META_ARCHITECTURE == "CustomRCNN" and head.USE_SIGMOID_CE
    assert head.NORM_TEMP == 50.0 and head.IGNORE_ZERO_CATS and cfg.SOLVER.BASE_LR == 0.02
    assert cfg.DATASETS.TEST == ("coco_generalized_zeroshot_val",)
    if name.startswith("Detic"):
        assert cfg.DATALOADER.DATASET_RATIO == [1, 4] and cfg.DATALOADER.DATASET_BS == [2, 8]
        assert head.WS_NUM_PROPS == (1 if name.endswith("1x_caption") else 32)
        assert head.ADD_IMAGE_BOX == ("caption" in name)
    assert auto_output_dir(cfg.OUTPUT_DIR, f"configs/Detic/{name}.yaml") == \
        f"output/Detic-COCO/{name}"


def test_customrcnn_refuses_what_is_not_carried():
    with pytest.raises(ValueError, match="USE_ZEROSHOT_CLS True"):
        build_model(load_config(TINY_DETIC, ["MODEL.ROI_BOX_HEAD.USE_ZEROSHOT_CLS", "False"]))
    with pytest.raises(ValueError, match="CustomRes5ROIHeads"):
        build_model(load_config(TINY_DETIC, ["MODEL.ROI_HEADS.NAME", "DeticCascadeROIHeads"]))
    with pytest.raises(ValueError, match="MODEL.WITH_CAPTION True"):
        build_model(load_config(TINY_DETIC, ["WITH_IMAGE_LABELS", "True",
                                             "DATALOADER.DATASET_ANN", "['box', 'caption']"]))
