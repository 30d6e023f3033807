"""Region-head and RPN losses (reference section 6.2) and the classification statistics,
against hand-computed values."""
import math

import pytest
import torch
from _e2e_utils import TINY_CONFIG

from regionclip.config import load_config
from regionclip.events import pop_scalars
from regionclip.modeling.box_predictor import LossSettings, predictor_losses
from regionclip.modeling.build import loss_settings
from regionclip.modeling.losses import (
    box_regression_loss,
    classification_loss,
    crop_and_resize_masks,
    focal_scaled_cross_entropy,
    mask_loss,
    put_classification_stats,
    smooth_l1_loss,
    weighted_cross_entropy,
)
from regionclip.structures import Boxes, Instances

# Three RoIs scored over 2 classes + background (last column): class 0, background, class 1.
LOGITS = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
TARGETS = [0, 2, 1]


def _softmax_prob(row, index):
    return math.exp(row[index]) / sum(math.exp(v) for v in row)


def _hand_terms():
    """Per RoI (CE, p of the target class), written out from the logits."""
    p0 = math.exp(2) / (math.exp(2) + 2)  # RoI 0, class 0
    p1 = 1 / (2 + math.e)  # RoI 1, background (logit 0 against 0, 1, 0)
    p2 = 1 / 3  # RoI 2, uniform logits
    return [(-math.log(p), p) for p in (p0, p1, p2)]


def test_hand_probabilities_match_softmax():
    for (_, p), row, target in zip(_hand_terms(), LOGITS, TARGETS):
        assert p == pytest.approx(_softmax_prob(row, target))


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_focal_scaled_loss_is_plain_mean_with_background_weight(gamma):
    terms = _hand_terms()
    weights = [1.0, 0.2, 1.0]  # RoI 1 is background
    expected = sum(w * ce * (1 - p) ** gamma for w, (ce, p) in zip(weights, terms)) / 3
    loss = focal_scaled_cross_entropy(torch.tensor(LOGITS), torch.tensor(TARGETS), gamma, 0.2)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_focal_loss_with_gamma_zero_and_unit_weights_is_cross_entropy():
    expected = sum(ce for ce, _ in _hand_terms()) / 3
    loss = focal_scaled_cross_entropy(torch.tensor(LOGITS), torch.tensor(TARGETS), 0.0)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_weighted_cross_entropy_is_weighted_mean():
    ce = [c for c, _ in _hand_terms()]
    expected = (ce[0] + 0.8 * ce[1] + ce[2]) / (1 + 0.8 + 1)
    loss = weighted_cross_entropy(torch.tensor(LOGITS), torch.tensor(TARGETS), 0.8)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_weighted_cross_entropy_with_unit_weight_is_plain_cross_entropy():
    expected = sum(ce for ce, _ in _hand_terms()) / 3
    loss = weighted_cross_entropy(torch.tensor(LOGITS), torch.tensor(TARGETS), 1.0)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_classification_loss_chooses_focal_only_for_positive_gamma():
    logits, targets = torch.tensor(LOGITS), torch.tensor(TARGETS)
    focal = focal_scaled_cross_entropy(logits, targets, 0.5, 0.2)
    weighted = weighted_cross_entropy(logits, targets, 0.2)
    assert classification_loss(logits, targets, 0.5, 0.2).item() == pytest.approx(focal.item())
    assert classification_loss(logits, targets, 0.0, 0.2).item() == pytest.approx(weighted.item())
    assert focal.item() != pytest.approx(weighted.item())


def test_focal_loss_gradient_is_finite_for_certain_predictions():
    # Logits / 0.01 make p_y round to exactly 1: (1 - p)^0.5 has an infinite slope there.
    logits = torch.tensor([[100.0, -100.0, 0.0], [0.0, 0.0, 90.0]], requires_grad=True)
    loss = focal_scaled_cross_entropy(logits, torch.tensor([0, 2]), 0.5, 0.2)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("loss_fn", [
    lambda x, y: focal_scaled_cross_entropy(x, y, 0.5, 0.2),
    lambda x, y: weighted_cross_entropy(x, y, 0.2),
])
def test_classification_loss_without_rois_is_a_connected_zero(loss_fn):
    logits = torch.zeros((0, 4), requires_grad=True)
    loss = loss_fn(logits, torch.zeros(0, dtype=torch.int64))
    loss.backward()
    assert loss.item() == 0.0
    assert logits.grad is not None


def test_smooth_l1_beta_zero_is_l1_and_beta_one_is_huber():
    pred, target = torch.tensor([0.5, 3.0, -1.0]), torch.zeros(3)
    assert smooth_l1_loss(pred, target, 0.0).item() == pytest.approx(0.5 + 3.0 + 1.0)
    # |x| < 1: 0.5 x^2; else |x| - 0.5
    assert smooth_l1_loss(pred, target, 1.0).item() == pytest.approx(0.125 + 2.5 + 0.5)


def test_box_loss_sums_foreground_and_divides_by_all_rois():
    pred = torch.tensor([[0.1, 0.2, 0.0, -0.3], [5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 1.0, 1.0]])
    foreground = torch.tensor([True, False, True])
    targets = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.5, 1.0, 0.0]])
    # |0.1| + |0.2| + |-0.3| for RoI 0, |0.5| + |1.0| for RoI 2; RoI 1 (background) ignored.
    expected = (0.6 + 1.5) / 3
    loss = box_regression_loss(pred, targets, foreground, beta=0.0)
    assert loss.item() == pytest.approx(expected)


def test_box_loss_without_foreground_is_a_connected_zero():
    pred = torch.ones((4, 4), requires_grad=True)
    loss = box_regression_loss(pred, torch.zeros((0, 4)), torch.zeros(4, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(pred.grad, torch.zeros(4, 4))


def test_mask_targets_follow_aligned_roialign_and_half_threshold():
    mask = torch.zeros((1, 8, 8), dtype=torch.bool)
    mask[0, :, :3] = True  # columns 0-2
    # Box = whole image, 4 bins of 2 px. Aligned sampling points of bin 1 are x = 2.0 and 3.0
    # (centres 2.5, 3.5 shifted by -0.5): pixel 2 (on) and pixel 3 (off) average to 0.5,
    # which the >= 0.5 rule keeps.
    crops = crop_and_resize_masks(mask, torch.tensor([[0.0, 0.0, 8.0, 8.0]]), 4)
    expected = torch.tensor([[True, True, False, False]] * 4)
    assert torch.equal(crops[0], expected)


def test_mask_targets_crop_the_box_region_of_the_indexed_mask():
    masks = torch.zeros((2, 8, 8), dtype=torch.bool)
    masks[0, :4, :] = True  # top half
    masks[1, :, 4:] = True  # right half
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0], [4.0, 0.0, 8.0, 8.0], [0.0, 0.0, 8.0, 8.0]])
    crops = crop_and_resize_masks(masks, boxes, 2, mask_index=torch.tensor([1, 1, 0]))
    assert torch.equal(crops[0], torch.tensor([[False, True], [False, True]]))
    assert torch.equal(crops[1], torch.ones(2, 2, dtype=torch.bool))  # inside the right half
    assert torch.equal(crops[2], torch.tensor([[True, True], [False, False]]))


def test_mask_targets_default_to_one_mask_per_box_and_handle_no_boxes():
    masks = torch.zeros((2, 6, 6), dtype=torch.bool)
    masks[1] = True
    crops = crop_and_resize_masks(masks, torch.tensor([[0.0, 0.0, 6.0, 6.0]] * 2), 3)
    assert not crops[0].any() and crops[1].all()
    assert crop_and_resize_masks(masks, torch.zeros((0, 4)), 3).shape == (0, 3, 3)


def test_mask_loss_is_mean_pixel_bce_of_the_right_channel():
    targets = torch.tensor([[[True, False], [False, False]]])
    agnostic = torch.zeros((1, 1, 2, 2))
    assert mask_loss(agnostic, targets).item() == pytest.approx(math.log(2))
    # Class-specific: channel 1 of RoI 0 holds logit 2 everywhere.
    logits = torch.zeros((1, 3, 2, 2))
    logits[0, 1] = 2.0
    expected = (math.log(1 + math.exp(-2)) + 3 * math.log(1 + math.exp(2))) / 4
    assert mask_loss(logits, targets, torch.tensor([1])).item() == pytest.approx(expected)


def test_mask_loss_without_rois_is_a_connected_zero():
    logits = torch.zeros((0, 1, 4, 4), requires_grad=True)
    loss = mask_loss(logits, torch.zeros((0, 4, 4), dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None


def test_classification_stats_by_hand():
    """detectron2's ``fast_rcnn/*`` training statistics on four RoIs of 2 classes + background:
    labels 0, 1, 1, bg against argmax 0, bg, 1, 1."""
    pop_scalars()
    logits = torch.tensor([[5.0, 0.0, 1.0], [0.0, 1.0, 2.0], [0.0, 3.0, 1.0], [0.0, 4.0, 1.0]])
    put_classification_stats(logits, torch.tensor([0, 1, 1, 2]))
    assert pop_scalars() == pytest.approx({"fast_rcnn/cls_accuracy": 2 / 4,
                                           "fast_rcnn/fg_cls_accuracy": 2 / 3,
                                           "fast_rcnn/false_negative": 1 / 3})
    put_classification_stats(logits[3:], torch.tensor([2]))  # no foreground: accuracy only
    assert pop_scalars() == {"fast_rcnn/cls_accuracy": 0.0}


def test_box_loss_settings_come_from_the_config_and_weigh_the_loss():
    cfg = load_config(str(TINY_CONFIG), [
        "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT", "2.0", "MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA",
        "0.5", "MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS", "(1.0, 1.0, 1.0, 1.0)"])
    settings = loss_settings(cfg)
    assert settings == LossSettings(focal_gamma=cfg.MODEL.CLIP.FOCAL_SCALED_LOSS,
                                    bg_weight=cfg.MODEL.CLIP.BG_CLS_LOSS_WEIGHT,
                                    smooth_l1_beta=0.5, box_reg_loss_weight=2.0,
                                    box_reg_weights=(1.0, 1.0, 1.0, 1.0))
    # One foreground RoI whose ground truth lies 2 px to the right (dx 0.2), one background.
    sampled = [Instances((20, 20), proposal_boxes=Boxes(torch.tensor([[0.0, 0, 10, 10]] * 2)),
                         gt_boxes=Boxes(torch.tensor([[2.0, 0, 12, 10], [0.0, 0, 10, 10]])),
                         gt_classes=torch.tensor([0, 3]))]
    losses = predictor_losses(torch.zeros(2, 4), torch.zeros(2, 4), sampled,
                              LossSettings(smooth_l1_beta=0.5, box_reg_loss_weight=2.0,
                                           box_reg_weights=(1.0, 1.0, 1.0, 1.0)))
    # smooth-L1 below beta: 0.5 * 0.2^2 / 0.5 = 0.04, over 2 RoIs, times the weight 2
    assert losses["loss_box_reg"].item() == pytest.approx(0.04)
    assert losses["loss_cls"].item() == pytest.approx(math.log(4))  # uniform over 3 + bg
