"""Matcher and subsample_labels against hand-computed cases and torchvision's Matcher."""
import pytest
import torch
from torchvision.models.detection._utils import Matcher as TorchvisionMatcher

from regionclip.modeling.matcher import Matcher, subsample_labels

# 2 gt x 5 predictions
IOU = torch.tensor(
    [
        [0.10, 0.45, 0.70, 0.00, 0.20],
        [0.05, 0.35, 0.60, 0.25, 0.10],
    ]
)


def test_thresholds_and_labels():
    matches, labels = Matcher([0.3, 0.5], [0, -1, 1])(IOU)
    assert matches.tolist() == [0, 0, 0, 1, 0]
    assert labels.tolist() == [0, -1, 1, 0, 0]
    assert matches.dtype == torch.int64 and labels.dtype == torch.int8


def test_boundaries_are_inclusive_below():
    iou = torch.tensor([[0.3, 0.5, 0.2999]])
    assert Matcher([0.3, 0.5], [0, -1, 1])(iou)[1].tolist() == [-1, 1, 0]


def test_low_quality_matches():
    # No prediction reaches 0.65; each gt's best predictions (ties included) become positive
    # and keep the gt of their own argmax as match.
    iou = torch.tensor([[0.1, 0.4, 0.4], [0.6, 0.3, 0.2]])
    matcher = Matcher([0.65], [0, 1], allow_low_quality_matches=True)
    matches, labels = matcher(iou)
    assert labels.tolist() == [1, 1, 1]  # gt 1 picks 0; gt 0 ties on 1 and 2: both positive
    assert matches.tolist() == [1, 0, 0]  # each keeps the gt of its own argmax
    assert Matcher([0.65], [0, 1])(iou)[1].tolist() == [0, 0, 0]


def test_no_ground_truth():
    matches, labels = Matcher([0.5], [0, 1])(torch.empty(0, 4))
    assert matches.tolist() == [0, 0, 0, 0] and labels.tolist() == [0, 0, 0, 0]
    assert Matcher([0.5], [-1, 1])(torch.empty(0, 2))[1].tolist() == [-1, -1]


def test_invalid_arguments():
    with pytest.raises(ValueError, match="> 0"):
        Matcher([0.0, 0.5], [0, -1, 1])
    with pytest.raises(ValueError, match="increasing"):
        Matcher([0.5, 0.3], [0, -1, 1])
    with pytest.raises(ValueError, match="labels"):
        Matcher([0.5], [0, 2])
    with pytest.raises(ValueError, match=">= 0"):
        Matcher([0.5], [0, 1])(torch.tensor([[-0.1]]))


@pytest.mark.parametrize("low_quality", [False, True])
def test_agrees_with_torchvision_matcher(low_quality):
    gen = torch.Generator().manual_seed(0)
    iou = torch.rand(6, 200, generator=gen) * 0.8
    matches, labels = Matcher([0.3, 0.7], [0, -1, 1], low_quality)(iou)
    reference = TorchvisionMatcher(0.7, 0.3, low_quality)(iou)  # -1 below low, -2 between
    assert torch.equal(labels == 1, reference >= 0)
    assert torch.equal(labels == 0, reference == -1)
    assert torch.equal(labels == -1, reference == -2)
    assert torch.equal(matches[labels == 1], reference[reference >= 0])


def test_subsample_fraction_and_fill():
    torch.manual_seed(0)
    labels = torch.tensor([-1] * 5 + [3] * 10 + [7] * 20 + [0] * 100)  # bg label 0
    pos, neg = subsample_labels(labels, num_samples=64, positive_fraction=0.25, bg_label=0)
    assert len(pos) == 16 and len(neg) == 48
    assert (labels[pos] > 0).all() and (labels[neg] == 0).all()
    assert len(set(pos.tolist())) == 16 and len(set(neg.tolist())) == 48


def test_subsample_short_of_positives_or_negatives():
    labels = torch.tensor([1, 1, 0, 0, 0, -1])
    pos, neg = subsample_labels(labels, num_samples=4, positive_fraction=0.5, bg_label=0)
    assert sorted(pos.tolist()) == [0, 1] and len(neg) == 2
    pos, neg = subsample_labels(labels, num_samples=10, positive_fraction=0.1, bg_label=0)
    assert len(pos) == 1 and sorted(neg.tolist()) == [2, 3, 4]  # int(10 * 0.1) = 1 positive
    pos, neg = subsample_labels(torch.tensor([5, 5, 5]), 2, 0.5, bg_label=5)
    assert len(pos) == 0 and len(neg) == 2  # labels equal to bg_label are negatives


def test_subsample_is_random_with_torch_seed():
    labels = torch.zeros(1000, dtype=torch.int64)
    torch.manual_seed(1)
    first = subsample_labels(labels, 10, 0.25, 0)[1]
    torch.manual_seed(1)
    assert torch.equal(first, subsample_labels(labels, 10, 0.25, 0)[1])
    assert not torch.equal(first, subsample_labels(labels, 10, 0.25, 0)[1])
