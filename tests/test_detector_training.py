"""CLIPFastRCNN training: losses, which parameters learn, empty ground truth, and learning."""
import math

import pytest
import torch
from _rpn_utils import CONFIGS, TINY_C4
from _training_utils import (
    NUM_CLASSES,
    calibrated_random_init_,
    detection_ap50,
    rpn_config_file,
    shapes_dataset,
    train,
    trained_rpn,
)

from regionclip.checkpoint import load_checkpoint
from regionclip.config import load_config
from regionclip.modeling.build import build_model
from regionclip.structures import Boxes, Instances

TINY = str(CONFIGS / "tests" / "tiny.yaml")
SIZE = (64, 96)
BOXES = [[4.0, 4.0, 40.0, 44.0], [48.0, 16.0, 90.0, 60.0]]
# Held-out AP50 (percent) the trained detector must reach. Measured: 42.6; with broken losses
# 4.4 (both zeroed), 9.7 (classification loss zeroed), 7.3 (box loss zeroed); 4.5 when trained
# on a wrong label map (the last test).
MIN_AP50 = 25.0


def _cfg(*overrides):
    return load_config(TINY, ["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", *overrides])


def _rpn_cfg(*overrides):
    return _cfg("MODEL.CLIP.CROP_REGION_TYPE", "RPN", "MODEL.CLIP.OFFLINE_RPN_CONFIG",
                str(TINY_C4), *overrides)


def _input(seed=0, boxes=BOXES, classes=(0, 2), masks=False):
    gen = torch.Generator().manual_seed(seed)
    boxes = torch.tensor(boxes).reshape(-1, 4)
    instances = Instances(SIZE, gt_boxes=Boxes(boxes), gt_classes=torch.tensor(classes))
    if masks:
        instances.gt_masks = _box_masks(boxes)
    return {"image": torch.randint(0, 256, (3, *SIZE), generator=gen).float(),
            "instances": instances}


def _box_masks(boxes):
    """Bool [N, H, W]: each box's pixels (boxes on integer coordinates)."""
    masks = torch.zeros((len(boxes), *SIZE), dtype=torch.bool)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
        mask[y0:y1, x0:x1] = True
    return masks


def _calibrated(model, inputs):
    """Random trunk with live residual branches (see `calibrated_random_init_`)."""
    crops = model.preprocess(inputs).tensor[..., :64, :64]
    calibrated_random_init_(model.backbone, model.backbone.encode_image, crops)
    return model


def test_training_forward_returns_scalar_losses():
    torch.manual_seed(0)
    model = build_model(_cfg()).train()
    losses = model([_input(0), _input(1)])
    assert set(losses) == {"loss_cls", "loss_box_reg"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    assert losses["loss_cls"] > 0


def test_gradients_reach_the_trunk_from_res3_and_no_frozen_part():
    torch.manual_seed(0)
    model = build_model(_rpn_cfg("MODEL.MASK_ON", "True",
                                 "MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK", "True",
                                 "MODEL.CLIP.GET_CONCEPT_EMB", "True"))
    model.roi_heads.box_predictor.set_test_embeddings(torch.randn(5, 32))
    inputs = [_input(0, masks=True), _input(1, masks=True)]
    _calibrated(model, inputs).train()
    assert not model.offline_backbone.training and not model.offline_proposal_generator.training
    # the text tower is never trained here (DDP would refuse its unused parameters)
    assert not model.lang_encoder.training
    assert not any(p.requires_grad for p in model.lang_encoder.parameters())
    losses = model(inputs)
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_mask"}
    sum(losses.values()).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    learning = ("backbone.layer2.", "backbone.layer3.", "backbone.layer4.", "backbone.attnpool.",
                "roi_heads.box_predictor.bbox_pred.", "roi_heads.mask_head.")
    frozen = ("backbone.conv1.", "backbone.conv2.", "backbone.conv3.", "backbone.layer1.",
              "offline_backbone.", "offline_proposal_generator.", "lang_encoder.",
              "roi_heads.box_predictor.cls_score.", "roi_heads.box_predictor.cls_bg_score.",
              "roi_heads.box_predictor.test_cls_score.")
    for name, grad in grads.items():
        if name.startswith(frozen):
            assert grad is None, name
        else:
            assert name.startswith(learning), name
            assert grad is not None and grad.abs().sum() > 0, name
    assert all(any(n.startswith(p) for n in grads) for p in learning + frozen)


def test_image_without_ground_truth_gives_zero_box_loss_and_finite_cls_loss():
    torch.manual_seed(0)
    model = build_model(_rpn_cfg()).train()
    empty = _input(0, boxes=[], classes=[])
    losses = model([empty])
    assert losses["loss_box_reg"].item() == 0.0
    assert torch.isfinite(losses["loss_cls"]) and losses["loss_cls"] > 0  # all background
    sum(losses.values()).backward()


def test_ground_truth_regions_without_ground_truth_give_connected_zeros():
    torch.manual_seed(0)
    model = build_model(_cfg()).train()
    losses = model([_input(0, boxes=[], classes=[])])
    assert all(v.item() == 0.0 for v in losses.values())
    sum(losses.values()).backward()  # no RoI at all: still a graph to back-propagate


def test_mask_loss_compares_head_logits_with_cropped_ground_truth_masks():
    torch.manual_seed(0)
    model = build_model(_cfg("MODEL.MASK_ON", "True",
                             "MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK", "True")).train()
    predictor = model.roi_heads.mask_head.predictor
    torch.nn.init.zeros_(predictor.weight)
    torch.nn.init.constant_(predictor.bias, 1.0)
    # Proposals = the ground-truth boxes, each mask filling its box: every target pixel is 1,
    # every logit 1, so the loss is log(1 + e^-1).
    losses = model([_input(0, masks=True)])
    assert losses["loss_mask"].item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-5)
    # An empty mask makes every target pixel 0: log(1 + e).
    sample = _input(0, masks=True)
    sample["instances"].gt_masks[:] = False
    losses = model([sample])
    assert losses["loss_mask"].item() == pytest.approx(math.log(1 + math.e), rel=1e-5)


def test_mask_training_needs_ground_truth_masks():
    model = build_model(_cfg("MODEL.MASK_ON", "True",
                             "MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK", "True")).train()
    with pytest.raises(ValueError, match="gt_masks"):
        model([_input(0)])


def test_training_needs_ground_truth_instances():
    model = build_model(_cfg()).train()
    with pytest.raises(ValueError, match="instances"):
        model([{"image": torch.zeros(3, *SIZE)}])


def _trained_detector_ap50(label_shift=0):
    """Train the tiny CLIP detector from random init on the shapes data, with the RPN trained
    by `trained_rpn` as its offline RPN; AP50 on the held-out images.

    The COCO recipe's losses (focal gamma 0.5, background weight 0.2); a temperature of 0.05
    instead of 0.01, because logits of +-100 make SGD from random init unstable within a few
    hundred iterations (0.01 suits CLIP-pretrained embeddings). ``label_shift`` relabels every
    training object as class + shift (mod C): a consistent but wrong label map.
    """
    rpn_weights, _, _ = trained_rpn()
    train_split, test = shapes_dataset()
    torch.manual_seed(0)
    cfg = _cfg(
        "MODEL.CLIP.CROP_REGION_TYPE", "RPN", "MODEL.CLIP.OFFLINE_RPN_CONFIG", rpn_config_file(),
        "MODEL.CLIP.OFFLINE_RPN_POST_NMS_TOPK_TEST", "50", "MODEL.CLIP.CLSS_TEMP", "0.05",
        "MODEL.CLIP.FOCAL_SCALED_LOSS", "0.5", "MODEL.CLIP.BG_CLS_LOSS_WEIGHT", "0.2",
        "MODEL.ROI_HEADS.NUM_CLASSES", str(NUM_CLASSES), "TEST.DETECTIONS_PER_IMAGE", "100",
        "INPUT.MIN_SIZE_TEST", "192", "INPUT.MAX_SIZE_TEST", "384")
    model = build_model(cfg)
    load_checkpoint(model, rpn_weights, offline_rpn=True)
    inputs = train_split.inputs("RGB")
    for x in inputs:
        x["instances"].gt_classes = (x["instances"].gt_classes + label_shift) % NUM_CLASSES
    _calibrated(model, inputs[:16])
    train(model, cfg, inputs, iterations=300, batch_size=2, lr=0.02)
    return detection_ap50(model, test.inputs("RGB"), test.json_file)


@pytest.mark.slow
def test_detector_trained_from_random_init_detects_held_out_shapes():
    assert _trained_detector_ap50() >= MIN_AP50


@pytest.mark.slow
def test_detector_trained_on_a_wrong_label_map_stays_below_the_threshold():
    assert _trained_detector_ap50(label_shift=1) < MIN_AP50


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_training_step_agrees_with_cpu():
    # Ground-truth proposals, fewer than the RoI batch: sampling keeps them all on both devices.
    torch.manual_seed(0)
    model = build_model(_cfg()).train()
    inputs = [_input(0), _input(1)]
    losses = {}
    for device in ("cpu", "cuda"):
        model = model.to(device)
        model.zero_grad()
        step = model(inputs)
        sum(step.values()).backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        losses[device] = {k: v.item() for k, v in step.items()}
    for name, value in losses["cpu"].items():  # cuDNN may train in TF32
        assert losses["cuda"][name] == pytest.approx(value, rel=2e-2, abs=1e-4), name
