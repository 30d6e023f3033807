"""Assigning predictions to ground truth by IoU, and balanced fg/bg subsampling.

detectron2 semantics (`modeling/matcher.py`, `modeling/sampling.py`), which the RPN and the
RoI heads were trained with.
"""
from typing import Sequence, Tuple

import torch

IGNORE, NEGATIVE, POSITIVE = -1, 0, 1


class Matcher:
    """Give each prediction its best ground truth and a label from IoU thresholds.

    Example: ``Matcher([0.3, 0.5], [0, -1, 1])`` labels IoU < 0.3 as 0 (background),
    0.3 <= IoU < 0.5 as -1 (ignored) and IoU >= 0.5 as 1 (foreground).
    """

    def __init__(
        self,
        thresholds: Sequence[float],
        labels: Sequence[int],
        allow_low_quality_matches: bool = False,
    ):
        """Args:
        thresholds: increasing IoU cut points, the first one > 0.
        labels: len(thresholds) + 1 values in {-1, 0, 1}, one per interval.
        allow_low_quality_matches: also label 1 every prediction that is the best match
            (ties included) of some ground truth, whatever its IoU (Faster R-CNN RPN rule i).
        """
        thresholds = list(thresholds)
        if not thresholds or thresholds[0] <= 0:
            raise ValueError(f"Matcher thresholds must be non-empty and > 0, got {thresholds}")
        if any(lo > hi for lo, hi in zip(thresholds[:-1], thresholds[1:])):
            raise ValueError(f"Matcher thresholds must be increasing, got {thresholds}")
        if len(labels) != len(thresholds) + 1 or any(x not in (-1, 0, 1) for x in labels):
            raise ValueError(f"Need {len(thresholds) + 1} labels in {{-1, 0, 1}}, got {labels}")
        self.thresholds = [-float("inf")] + thresholds + [float("inf")]
        self.labels = list(labels)
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, match_quality_matrix: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Match predictions to ground truth.

        Args:
            match_quality_matrix: [M, N] non-negative quality (IoU) of M gt x N predictions.
        Returns:
            matches: [N] int64 index of the best gt (0 when there is no gt).
            match_labels: [N] int8 label of each prediction; with no gt all get ``labels[0]``.
        """
        if match_quality_matrix.dim() != 2:
            raise ValueError(f"Expected an [M, N] matrix, got {tuple(match_quality_matrix.shape)}")
        num_pred = match_quality_matrix.shape[1]
        if match_quality_matrix.numel() == 0:
            # No gt means IoU 0 with everything, hence the label of the lowest interval.
            matches = match_quality_matrix.new_zeros((num_pred,), dtype=torch.int64)
            labels = match_quality_matrix.new_full((num_pred,), self.labels[0], dtype=torch.int8)
            return matches, labels
        if not bool((match_quality_matrix >= 0).all()):
            raise ValueError("Matcher needs a match quality matrix with values >= 0")

        matched_vals, matches = match_quality_matrix.max(dim=0)
        match_labels = matches.new_full(matches.shape, POSITIVE, dtype=torch.int8)
        for label, low, high in zip(self.labels, self.thresholds[:-1], self.thresholds[1:]):
            match_labels[(matched_vals >= low) & (matched_vals < high)] = label
        if self.allow_low_quality_matches:
            self._set_low_quality_matches(match_labels, match_quality_matrix)
        return matches, match_labels

    @staticmethod
    def _set_low_quality_matches(labels: torch.Tensor, quality: torch.Tensor) -> None:
        """Label 1 (in place) each prediction that ties for the best quality of some gt.

        Like detectron2, ``matches`` is left alone: such a prediction keeps its own best gt.
        """
        best_per_gt = quality.max(dim=1).values
        is_best = quality == best_per_gt[:, None]
        labels[is_best.any(dim=0)] = POSITIVE


def subsample_labels(
    labels: torch.Tensor, num_samples: int, positive_fraction: float, bg_label: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Randomly pick up to ``num_samples`` labelled elements, favouring foreground.

    Positives (label not -1 and not ``bg_label``) are sampled up to
    ``int(num_samples * positive_fraction)``; negatives (``bg_label``) fill the rest.

    Args:
        labels: [N] int labels; -1 means ignore.
        num_samples: total number of samples wanted.
        positive_fraction: target share of positives.
        bg_label: the background label.
    Returns:
        pos_idx [P], neg_idx [Q] int64 indices into ``labels``, P + Q <= num_samples.
    """
    positive = ((labels != IGNORE) & (labels != bg_label)).nonzero().flatten()
    negative = (labels == bg_label).nonzero().flatten()
    num_pos = min(positive.numel(), int(num_samples * positive_fraction))
    num_neg = min(negative.numel(), num_samples - num_pos)
    pos_perm = torch.randperm(positive.numel(), device=positive.device)[:num_pos]
    neg_perm = torch.randperm(negative.numel(), device=negative.device)[:num_neg]
    return positive[pos_perm], negative[neg_perm]

