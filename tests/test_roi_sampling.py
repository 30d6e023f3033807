"""RoI labelling and sampling against hand-built IoU cases (detectron2 semantics)."""
import math

import pytest
import torch

from regionclip.events import pop_scalars
from regionclip.modeling.box_coder import Box2BoxTransform
from regionclip.modeling.matcher import (
    GT_OBJECTNESS_LOGIT,
    RoISampling,
    label_and_sample_proposals,
    regression_targets,
)
from regionclip.structures import Boxes, Instances

NUM_CLASSES = 3  # label 3 = background
SIZE = (100, 100)
GT_BOXES = [[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]]
GT_CLASSES = [1, 0]
# Each proposal with its IoU against the ground truth and the label it must get.
PROPOSALS = [
    ([0.0, 0.0, 10.0, 5.0], 1),  # IoU 0.5 with gt 0: foreground (>= 0.5)
    ([0.0, 0.0, 10.0, 4.0], 3),  # IoU 0.4 with gt 0: background
    ([22.0, 20.0, 32.0, 30.0], 0),  # IoU 80 / 120 = 0.67 with gt 1: foreground
    ([50.0, 50.0, 60.0, 60.0], 3),  # no overlap: background
]


def _targets(boxes=GT_BOXES, classes=GT_CLASSES):
    return Instances(SIZE, gt_boxes=Boxes(torch.tensor(boxes).reshape(-1, 4)),
                     gt_classes=torch.tensor(classes, dtype=torch.int64))


def _proposals(boxes):
    boxes = torch.tensor(boxes).reshape(-1, 4)
    return Instances(SIZE, proposal_boxes=Boxes(boxes),
                     objectness_logits=torch.arange(len(boxes), dtype=torch.float32))


def _by_box(sampled):
    return {tuple(b.tolist()): (int(c), tuple(g.tolist()), int(i)) for b, c, g, i in zip(
        sampled.proposal_boxes.tensor, sampled.gt_classes, sampled.gt_boxes.tensor,
        sampled.gt_index)}


def test_labels_matched_boxes_and_appended_ground_truth():
    proposals = _proposals([box for box, _ in PROPOSALS])
    sampled = label_and_sample_proposals([proposals], [_targets()], NUM_CLASSES,
                                         RoISampling(batch_size_per_image=512))[0]
    assert len(sampled) == len(PROPOSALS) + len(GT_BOXES)
    found = _by_box(sampled)
    for box, label in PROPOSALS:
        assert found[tuple(box)][0] == label
    assert found[(0.0, 0.0, 10.0, 5.0)][1:] == (tuple(GT_BOXES[0]), 0)
    assert found[(22.0, 20.0, 32.0, 30.0)][1:] == (tuple(GT_BOXES[1]), 1)
    # The appended ground truth is foreground with its own class and a near-certain logit.
    for box, cls in zip(GT_BOXES, GT_CLASSES):
        assert found[tuple(box)][0] == cls
    appended = sampled.objectness_logits[sampled.objectness_logits > len(PROPOSALS)]
    assert appended.tolist() == pytest.approx([GT_OBJECTNESS_LOGIT] * 2)
    assert GT_OBJECTNESS_LOGIT == pytest.approx(math.log(1e10), rel=1e-4)
    # Foreground comes first.
    is_fg = (sampled.gt_classes < NUM_CLASSES).tolist()
    assert is_fg == sorted(is_fg, reverse=True)


def test_without_appending_ground_truth_only_proposals_are_sampled():
    proposals = _proposals([box for box, _ in PROPOSALS])
    sampling = RoISampling(batch_size_per_image=512, append_gt=False)
    sampled = label_and_sample_proposals([proposals], [_targets()], NUM_CLASSES, sampling)[0]
    assert sorted(_by_box(sampled)) == sorted(tuple(box) for box, _ in PROPOSALS)


def _many_proposals(num_fg, num_bg):
    """num_fg copies of gt 0 (IoU 1) and num_bg far-away boxes."""
    return _proposals([GT_BOXES[0]] * num_fg + [[60.0, 60.0, 70.0, 70.0]] * num_bg)


@pytest.mark.parametrize("num_fg, expected_fg", [(100, 16), (3, 5)])
def test_sample_size_and_foreground_fraction(num_fg, expected_fg):
    # 64 RoIs with at most 25% = 16 foreground; with 3 fg proposals + 2 appended gt there are 5.
    sampling = RoISampling(batch_size_per_image=64, positive_fraction=0.25)
    sampled = label_and_sample_proposals([_many_proposals(num_fg, 500)], [_targets()],
                                         NUM_CLASSES, sampling)[0]
    assert len(sampled) == 64
    assert int((sampled.gt_classes < NUM_CLASSES).sum()) == expected_fg


def test_sample_counts_are_reported_per_image():
    """detectron2's ``roi_head/num_fg_samples`` / ``num_bg_samples``: means over the images."""
    pop_scalars()
    sampling = RoISampling(batch_size_per_image=64, positive_fraction=0.25)
    label_and_sample_proposals([_many_proposals(100, 500), _many_proposals(3, 500)],
                               [_targets(), _targets()], NUM_CLASSES, sampling)
    scalars = pop_scalars()
    assert scalars["roi_head/num_fg_samples"] == (16 + 5) / 2
    assert scalars["roi_head/num_bg_samples"] == (48 + 59) / 2


def test_only_foreground_sampling():
    sampling = RoISampling(batch_size_per_image=64, only_foreground=True)
    sampled = label_and_sample_proposals([_many_proposals(100, 500)], [_targets()],
                                         NUM_CLASSES, sampling)[0]
    assert len(sampled) == 16 and bool((sampled.gt_classes < NUM_CLASSES).all())
    # Without ground truth one background RoI fills the slot, as in the original.
    empty = _targets([], [])
    sampled = label_and_sample_proposals([_many_proposals(0, 10)], [empty], NUM_CLASSES,
                                         sampling)[0]
    assert sampled.gt_classes.tolist() == [NUM_CLASSES]


def test_image_without_ground_truth_gives_background_rois():
    sampled = label_and_sample_proposals([_many_proposals(0, 10)], [_targets([], [])],
                                         NUM_CLASSES, RoISampling())[0]
    assert len(sampled) == 10
    assert sampled.gt_classes.tolist() == [NUM_CLASSES] * 10
    assert torch.equal(sampled.gt_boxes.tensor, sampled.proposal_boxes.tensor)


def test_class_ids_outside_the_training_vocabulary_are_rejected():
    with pytest.raises(ValueError, match="contiguous ids in \\[0, 3\\)"):
        label_and_sample_proposals([_many_proposals(1, 1)], [_targets(GT_BOXES, [1, 3])],
                                   NUM_CLASSES, RoISampling())


def test_regression_targets_of_foreground_rois():
    # RoI [0, 0, 10, 5] -> gt [0, 0, 10, 10]: centre y 2.5 -> 5, height 5 -> 10.
    # weights (10, 10, 5, 5): dx = 0, dy = 10 * 2.5 / 5 = 5, dw = 0, dh = 5 * ln 2.
    sampled = Instances(SIZE, proposal_boxes=Boxes(torch.tensor([[0.0, 0.0, 10.0, 5.0]] * 2)),
                        gt_boxes=Boxes(torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 2)),
                        gt_classes=torch.tensor([2, NUM_CLASSES]))
    foreground, deltas = regression_targets([sampled], NUM_CLASSES, Box2BoxTransform())
    assert foreground.tolist() == [True, False]
    assert deltas.tolist() == [pytest.approx([0.0, 5.0, 0.0, 5 * math.log(2)])]
