"""Detic's losses against hand computations: sigmoid CE with class masking, the max-size
proposal choice, the image-label and caption losses, and the regions of image-labelled data."""
import math

import pytest
import torch

from regionclip.modeling.detic.predictor import sigmoid_cross_entropy, softmax_cross_entropy
from regionclip.modeling.detic.weak_losses import (
    CaptionBatch,
    WeakSupervision,
    batch_ann_type,
    caption_loss,
    chosen_row,
    image_label_loss,
    top_proposals,
    weak_losses,
)
from regionclip.structures import Boxes, Instances


def _bce(logit: float, target: float) -> float:
    """-[t log s(x) + (1 - t) log(1 - s(x))], written out."""
    p = 1.0 / (1.0 + math.exp(-logit))
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def test_sigmoid_ce_masks_classes_without_training_images():
    logits = torch.tensor([[1.0, -2.0, 0.5, 0.0], [-1.0, 3.0, 2.0, 0.0],
                           [0.2, 0.1, -0.3, 0.0]], dtype=torch.float64)
    classes = torch.tensor([0, 2, 3])  # the last RoI is background (class C = 3)
    weight = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)  # class 2: no training images
    expected = 0.0
    for row, cls in zip(logits.tolist(), classes.tolist()):
        for c in range(3):
            expected += weight[c].item() * _bce(row[c], 1.0 if c == cls else 0.0)
    expected /= 3  # divided by the number of RoIs, not by the weights
    assert sigmoid_cross_entropy(logits, classes, weight).item() == pytest.approx(expected)
    unmasked = sum(_bce(r[c], float(c == k)) for r, k in zip(logits.tolist(), classes.tolist())
                   for c in range(3)) / 3
    assert sigmoid_cross_entropy(logits, classes).item() == pytest.approx(unmasked)


def test_softmax_ce_weighs_foreground_classes_and_keeps_background_at_one():
    """USE_SIGMOID_CE False: PyTorch's weighted mean, background weight 1 (hand case)."""
    logits = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    classes = torch.tensor([0, 2])  # a class-0 RoI and a background RoI (C = 2)
    ce_first = -math.log(math.e / (math.e + 2))
    weighted = softmax_cross_entropy(logits, classes, torch.tensor([0.5, 3.0], dtype=torch.float64))
    assert weighted.item() == pytest.approx((0.5 * ce_first + math.log(3)) / 1.5)
    masked = softmax_cross_entropy(logits, classes, torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert masked.item() == pytest.approx(math.log(3))  # class 0 has no training images
    assert softmax_cross_entropy(logits, classes).item() == pytest.approx(
        (ce_first + math.log(3)) / 2)


def test_sigmoid_ce_without_rois_is_a_connected_zero():
    logits = torch.zeros(0, 4, requires_grad=True)
    loss = sigmoid_cross_entropy(logits, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0 and logits.grad is not None


BOXES = torch.tensor([[0, 0, 10, 10], [0, 0, 30, 20], [5, 5, 20, 40], [0, 0, 64, 48.0]])


def test_max_size_takes_the_largest_proposal_but_never_the_last_row():
    scores = torch.zeros(4, 3)
    # areas 100, 600, 525, 3072: the image box (last) is the largest but is skipped
    assert chosen_row("max_size", scores, 0, BOXES) == 1
    assert chosen_row("max_size", scores, 0, BOXES[:1]) == 0  # a single row is taken
    scores[2, 1] = 5.0
    assert chosen_row("max_score", scores, 1, BOXES) == 2
    assert chosen_row("first", scores, 1, BOXES) == 0
    assert chosen_row("image", scores, 1, BOXES) == 3


@pytest.mark.parametrize("softmax", [False, True])
def test_image_label_loss_is_the_mean_over_labels_of_the_chosen_rows_loss(softmax):
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 4, generator=gen, dtype=torch.float64)  # 3 classes + background
    labels = [0, 2]
    row = scores[1].tolist()  # max_size: row 1 for every label
    if softmax:
        log_z = math.log(sum(math.exp(v) for v in row))
        expected = sum(log_z - row[label] for label in labels) / 2
    else:  # BCE over all C + 1 columns, the background column included
        expected = sum(sum(_bce(row[c], float(c == label)) for c in range(4))
                       for label in labels) / 2
    loss = image_label_loss(scores, labels, BOXES, "max_size", softmax)
    assert loss.item() == pytest.approx(expected)
    assert image_label_loss(scores, [], BOXES).item() == 0


def test_caption_loss_weights_the_negative_captions():
    logits = torch.tensor([2.0, -1.0, 0.5, 0.0], dtype=torch.float64)
    positive = _bce(-1.0, 1.0)
    negatives = _bce(2.0, 0.0) + _bce(0.5, 0.0) + _bce(0.0, 0.0)
    assert caption_loss(logits, 1, 0.125).item() == pytest.approx(positive + 0.125 * negatives)
    assert caption_loss(logits, 1, 1.0).item() == pytest.approx(positive + negatives)


def _region(boxes, size=(48, 64)):
    return Instances(size, proposal_boxes=Boxes(boxes), objectness_logits=torch.ones(len(boxes)))


def test_weak_losses_combine_labels_and_captions_per_image():
    """captiontag: max-size loss on the class columns + caption loss on the image box row,
    summed over images, / B, x IMAGE_LOSS_WEIGHT."""
    settings = WeakSupervision(add_image_box=True, neg_caption_weight=0.5, caption_weight=2.0,
                               image_loss_weight=0.1)
    gen = torch.Generator().manual_seed(1)
    regions = [_region(BOXES), _region(BOXES[1:])]
    captions = CaptionBatch(torch.zeros(5, 8), offset=2)  # 5 captions, ours start at row 2
    logits = torch.randn(7, 4 + 5, generator=gen, dtype=torch.float64)
    labels = [[1], [0, 2]]
    per_image = logits.split([4, 3])
    expected = 0.0
    for index, (scores, region, image_labels) in enumerate(zip(per_image, regions, labels)):
        expected += image_label_loss(scores[:, :4], image_labels,
                                     region.proposal_boxes.tensor).item()
        expected += 2.0 * caption_loss(scores[-1, 4:], 2 + index, 0.5).item()
    loss = weak_losses(logits, regions, labels, captions, "captiontag", settings)
    assert loss.item() == pytest.approx(expected / 2 * 0.1)
    only_captions = weak_losses(logits, regions, labels, captions, "caption", settings)
    expected_captions = sum(2.0 * caption_loss(s[-1, 4:], 2 + i, 0.5).item()
                            for i, s in enumerate(per_image))
    assert only_captions.item() == pytest.approx(expected_captions / 2 * 0.1)


def test_caption_loss_needs_the_image_box():
    regions = [_region(BOXES[:2])]
    with pytest.raises(ValueError, match="ADD_IMAGE_BOX True"):
        weak_losses(torch.zeros(2, 5), regions, [[0]], CaptionBatch(torch.zeros(1, 8), 0),
                    "caption", WeakSupervision())


def test_top_proposals_keep_the_first_k_clipped_and_add_the_image_box():
    proposals = [Instances((40, 50), proposal_boxes=Boxes(torch.tensor(
        [[-5.0, 2, 30, 60], [1, 1, 9, 9], [2, 2, 4, 4]])),
        objectness_logits=torch.tensor([3.0, 2.0, 1.0]))]
    settings = WeakSupervision(num_proposals=2, add_image_box=True)
    (regions,) = top_proposals(proposals, settings)
    assert regions.proposal_boxes.tensor.tolist() == [[0, 2, 30, 40], [1, 1, 9, 9],
                                                      [0, 0, 50, 40]]
    assert regions.objectness_logits.tolist() == [3.0, 2.0, 1.0]
    half = WeakSupervision(num_proposals=1, add_image_box=True, image_box_size=0.5)
    (regions,) = top_proposals(proposals, half)
    assert regions.proposal_boxes.tensor[-1].tolist() == [12.5, 10.0, 37.5, 30.0]
    assert proposals[0].proposal_boxes.tensor[0, 0] == -5.0  # the RPN's output is untouched


def test_a_batch_holds_one_supervision():
    assert batch_ann_type([{"ann_type": "image"}, {"ann_type": "image"}]) == "image"
    assert batch_ann_type([{}, {}]) == "box"
    with pytest.raises(ValueError, match="one supervision type"):
        batch_ann_type([{"ann_type": "image"}, {"ann_type": "box"}])
    with pytest.raises(ValueError, match="IMAGE_LABEL_LOSS 'wsddn'"):
        WeakSupervision(image_label_loss="wsddn")
