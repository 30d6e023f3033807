"""Agreement of two detectors' outputs on the same images: the fast-path criterion of issue 14.

A reference detection is matched by an unused detection of the other output with the same
class, box IoU >= ``min_iou`` and score within ``score_tol`` (greedy, best IoU first).
"""
import torch

from regionclip.ops import box_iou


def matched_fraction(reference, other, min_iou: float = 0.9, score_tol: float = 0.02):
    """(matched, total) over images; each argument: per image (boxes [N, 4], scores [N],
    classes [N])."""
    matched = total = 0
    for (ref_boxes, ref_scores, ref_classes), (boxes, scores, classes) in zip(reference, other):
        total += len(ref_scores)
        if len(ref_scores) == 0 or len(scores) == 0:
            continue
        fits = ((box_iou(ref_boxes.float(), boxes.float()) >= min_iou)
                & (ref_classes[:, None] == classes[None, :])
                & ((ref_scores[:, None] - scores[None, :]).abs() <= score_tol))
        iou = torch.where(fits, box_iou(ref_boxes.float(), boxes.float()), -1.0)
        used = torch.zeros(len(scores), dtype=torch.bool)
        for row in iou:
            row = torch.where(used, -1.0, row)
            best = int(row.argmax())
            if row[best] >= 0:
                used[best] = True
                matched += 1
    return matched, total
