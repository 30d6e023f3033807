"""batched_soft_nms against a plain greedy loop, hand-computed cases and torchvision NMS."""
import math

import pytest
import torch

from regionclip.modeling.box_predictor import batched_soft_nms
from regionclip.ops import batched_nms, box_iou  # torchvision's, the independent reference


def reference_soft_nms(boxes, scores, idxs, method, sigma, iou_threshold, prune):
    """The original algorithm, literally: one greedy loop over all boxes.

    The original keeps classes apart by offsetting coordinates; zeroing cross-class IoU does
    the same without the float rounding of large offsets.
    """
    iou = box_iou(boxes, boxes).nan_to_num(0.0)
    iou = torch.where(idxs[:, None] == idxs[None, :], iou, 0.0)
    scores = scores.clone()
    alive = torch.arange(len(scores))
    keep, rescored = [], []
    while alive.numel() > 0:
        top = alive[torch.argmax(scores[alive])]
        keep.append(int(top))
        rescored.append(float(scores[top]))
        ious = iou[top, alive]
        if method == "gaussian":
            decay = torch.exp(-torch.pow(ious, 2) / sigma)
        elif method == "linear":
            decay = torch.ones_like(ious)
            decay[ious > iou_threshold] = 1 - ious[ious > iou_threshold]
        else:
            decay = (ious < iou_threshold).float()
        scores[alive] = scores[alive] * decay
        alive = alive[(scores[alive] > prune) & (alive != top)]
    return torch.tensor(keep, dtype=torch.int64), torch.tensor(rescored)


def _clustered_inputs(seed, num_boxes, num_classes):
    """Boxes crowded around a few centres, so that IoUs are spread over (0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.rand(6, 2, generator=gen) * 100
    owner = torch.randint(6, (num_boxes,), generator=gen)
    ctr = centres[owner] + torch.randn(num_boxes, 2, generator=gen) * 6
    size = 10 + torch.rand(num_boxes, 2, generator=gen) * 30
    boxes = torch.cat([ctr - size / 2, ctr + size / 2], dim=1)
    scores = torch.rand(num_boxes, generator=gen)  # continuous: ties have probability 0
    idxs = torch.randint(num_classes, (num_boxes,), generator=gen) * 7 - 3  # not contiguous
    return boxes, scores, idxs


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("method", ["gaussian", "linear", "hard"])
@pytest.mark.parametrize("prune", [0.001, 0.3])
def test_matches_greedy_reference(seed, method, prune):
    boxes, scores, idxs = _clustered_inputs(seed, num_boxes=160, num_classes=1 + seed * 5)
    args = (method, 0.5, 0.3, prune)
    keep, rescored = batched_soft_nms(boxes, scores, idxs, *args)
    ref_keep, ref_rescored = reference_soft_nms(boxes, scores, idxs, *args)
    assert keep.tolist() == ref_keep.tolist()
    torch.testing.assert_close(rescored, ref_rescored)
    assert (rescored[:-1] >= rescored[1:]).all()


def test_empty_input():
    keep, rescored = batched_soft_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0).long())
    assert keep.shape == (0,) and keep.dtype == torch.int64
    assert rescored.shape == (0,) and rescored.dtype == torch.float32


def _hand_case():
    # box 1 overlaps box 0 with IoU 0.5; box 2 is far away
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 5], [50, 50, 60, 60]])
    return boxes, torch.tensor([0.9, 0.8, 0.7]), torch.zeros(3, dtype=torch.int64)


@pytest.mark.parametrize(
    "method, threshold, expected_keep, decayed",
    [
        ("gaussian", 0.3, [0, 2, 1], 0.8 * math.exp(-0.25 / 0.5)),
        ("linear", 0.3, [0, 2, 1], 0.8 * 0.5),
        ("linear", 0.6, [0, 1, 2], 0.8),  # IoU 0.5 is under the threshold: no decay
        ("hard", 0.3, [0, 2], None),
    ],
)
def test_single_class_hand_computed(method, threshold, expected_keep, decayed):
    boxes, scores, idxs = _hand_case()
    keep, rescored = batched_soft_nms(boxes, scores, idxs, method, 0.5, threshold, 0.001)
    assert keep.tolist() == expected_keep
    expected = {0: 0.9, 1: decayed, 2: 0.7}
    torch.testing.assert_close(rescored, torch.tensor([expected[i] for i in expected_keep]))


def test_classes_never_interact():
    boxes = torch.tensor([[0.0, 0, 10, 10]] * 4)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    keep, rescored = batched_soft_nms(boxes, scores, torch.tensor([0, 1, 2, 0]), "hard")
    assert keep.tolist() == [0, 1, 2]
    torch.testing.assert_close(rescored, scores[:3])


def test_prune_drops_decayed_and_low_boxes():
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [30, 30, 40, 40]])
    scores = torch.tensor([0.9, 0.8, 0.0005])
    idxs = torch.tensor([0, 0, 1])
    # identical boxes: 0.8 * exp(-1 / 0.5) = 0.108
    assert batched_soft_nms(boxes, scores, idxs, prune=0.1)[0].tolist() == [0, 1]
    assert batched_soft_nms(boxes, scores, idxs, prune=0.2)[0].tolist() == [0]
    # the 0.0005 box is pruned although it is alone in its class (the original's behaviour) ...
    assert 2 not in batched_soft_nms(boxes, scores, idxs, prune=0.001)[0].tolist()
    # ... unless it is the overall best, which the original picks before pruning anything
    assert batched_soft_nms(boxes[2:], scores[2:], idxs[2:], prune=0.001)[0].tolist() == [0]


@pytest.mark.parametrize("seed", range(3))
def test_hard_method_equals_torchvision_batched_nms(seed):
    boxes, scores, idxs = _clustered_inputs(seed, num_boxes=300, num_classes=8)
    keep, rescored = batched_soft_nms(boxes, scores, idxs, "hard", iou_threshold=0.5, prune=0)
    assert keep.tolist() == batched_nms(boxes, scores, idxs, 0.5).tolist()
    torch.testing.assert_close(rescored, scores[keep])


def test_inputs_untouched_and_bad_method():
    boxes, scores, idxs = _clustered_inputs(0, 20, 2)
    before = scores.clone()
    batched_soft_nms(boxes, scores, idxs)
    assert torch.equal(scores, before)
    with pytest.raises(ValueError, match="gaussian"):
        batched_soft_nms(boxes, scores, idxs, method="soft")
    with pytest.raises(ValueError, match="boxes"):
        batched_soft_nms(boxes, scores[:3], idxs)
    with pytest.raises(ValueError, match="finite"):
        batched_soft_nms(boxes, torch.full_like(scores, float("nan")), idxs)


def test_tied_scores_are_picked_lowest_index_first():
    """The original's greedy loop takes torch.argmax, the lowest index among ties: within a
    class (box 0 before its duplicate, box 2, which it then suppresses) and across classes
    (boxes 0 and 1, both 0.8)."""
    boxes = torch.tensor([[0.0, 0, 10, 10], [20.0, 20, 30, 30], [0.0, 0, 10, 10]])
    scores = torch.tensor([0.8, 0.8, 0.8])
    keep, rescored = batched_soft_nms(boxes, scores, torch.tensor([0, 1, 0]), "hard", 0.5, 0.5,
                                      0.001)
    assert keep.tolist() == [0, 1] and rescored.tolist() == pytest.approx([0.8, 0.8])
