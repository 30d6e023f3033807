"""Training losses of the region head and the RPN, as pure functions of tensors, and the
classification statistics detectron2 logs beside them.

Normalisations follow the original (reference section 6.2), which differ on purpose:
focal-scaled cross-entropy is a plain mean over all sampled RoIs, weighted cross-entropy is
PyTorch's weighted mean, and the box loss is a sum over foreground RoIs divided by the number of
sampled RoIs. Every loss returns a zero that is still connected to the graph when it has no
targets (the original's focal loss crashed there: reference section 11.12).
"""
from typing import Optional

import torch
import torch.nn.functional as F

from ..events import put_scalar
from ..ops import roi_align

# Below this, smooth-L1 is plain L1 (detectron2's cut-off; its quadratic part would divide by 0).
SMOOTH_L1_MIN_BETA = 1e-5
# Floor of (1 - p) in the focal factor: (1 - p)^gamma has an infinite derivative at p = 1 for
# gamma < 1, and a confident RoI whose CE rounds to 0 would otherwise get a NaN gradient.
_FOCAL_MIN_BASE = 1e-12
MASK_THRESHOLD = 0.5


def _connected_zero(tensor: torch.Tensor) -> torch.Tensor:
    """0, with a (zero) gradient path to ``tensor`` so every parameter still gets a grad."""
    return tensor.sum() * 0.0


def weighted_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                           bg_weight: float = 1.0) -> torch.Tensor:
    """sum_i w_{y_i} CE_i / sum_i w_{y_i}, w = 1 for foreground and ``bg_weight`` for background.

    logits: [R, C + 1], background last; targets: [R] int64 in [0, C]. With ``bg_weight`` 1 this
    is the plain mean cross-entropy.
    """
    if targets.numel() == 0:
        return _connected_zero(logits)
    weights = torch.ones(logits.shape[1], device=logits.device)
    weights[-1] = bg_weight
    return F.cross_entropy(logits, targets, weight=weights)


def focal_scaled_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, gamma: float,
                               bg_weight: float = 1.0) -> torch.Tensor:
    """mean_i w_i CE_i (1 - p_{i, y_i})^gamma with w_i = ``bg_weight`` for background RoIs, else 1.

    ``MODEL.CLIP.FOCAL_SCALED_LOSS``: the mean runs over all RoIs, not over the weights.
    logits: [R, C + 1], background last; targets: [R] int64 in [0, C].
    """
    if targets.numel() == 0:
        return _connected_zero(logits)
    ce = F.cross_entropy(logits, targets, reduction="none")
    # 1 - p_y = 1 - exp(-CE), written with expm1 so that it stays accurate for small CE.
    focal = (-torch.expm1(-ce)).clamp(min=_FOCAL_MIN_BASE) ** gamma
    background = targets == logits.shape[1] - 1
    weights = torch.where(background, torch.full_like(ce, bg_weight), torch.ones_like(ce))
    return (ce * focal * weights).mean()


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, focal_gamma: float = 0.0,
                        bg_weight: float = 1.0) -> torch.Tensor:
    """The original's choice: focal-scaled CE when ``focal_gamma`` > 0, else weighted CE."""
    if focal_gamma > 0:
        return focal_scaled_cross_entropy(logits, targets, focal_gamma, bg_weight)
    return weighted_cross_entropy(logits, targets, bg_weight)


def smooth_l1_loss(pred: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """Summed smooth-L1 (detectron2's form): 0.5 x^2 / beta below beta, |x| - 0.5 beta above;
    L1 when ``beta`` < 1e-5."""
    diff = (pred - target).abs()
    if beta < SMOOTH_L1_MIN_BETA:
        return diff.sum()
    return torch.where(diff < beta, 0.5 * diff ** 2 / beta, diff - 0.5 * beta).sum()


def box_regression_loss(pred_deltas: torch.Tensor, target_deltas: torch.Tensor,
                        foreground: torch.Tensor, beta: float = 0.0) -> torch.Tensor:
    """Class-agnostic Fast R-CNN box loss: smooth-L1 summed over foreground RoIs / all RoIs.

    pred_deltas: [R, 4] for all sampled RoIs; foreground: [R] bool; target_deltas: [F, 4] for
    the foreground RoIs in order. Dividing by R (not F) is detectron2's normalisation.
    """
    loss = smooth_l1_loss(pred_deltas[foreground], target_deltas, beta)
    return loss / max(foreground.numel(), 1)


def crop_and_resize_masks(masks: torch.Tensor, boxes: torch.Tensor, size: int,
                          mask_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Bool [R, size, size] mask targets: each box's region of its mask, resampled.

    masks: [N, H, W] bool image masks; boxes: [R, 4] xyxy in the same pixels; mask_index: [R]
    which mask each box crops (default: box i crops mask i). detectron2's
    ``BitMasks.crop_and_resize``: aligned RoIAlign (adaptive sampling) of the 0/1 mask,
    thresholded at 0.5. Only the masks in use are converted to float.
    """
    if mask_index is None:
        mask_index = torch.arange(len(boxes), device=boxes.device)
    if len(boxes) == 0:
        return torch.zeros((0, size, size), dtype=torch.bool, device=masks.device)
    used, local_index = mask_index.unique(return_inverse=True)
    source = masks[used.to(masks.device)][:, None].float()
    rois = torch.cat([local_index[:, None].to(boxes), boxes], dim=1).to(source)
    crops = roi_align(source, rois, (size, size), spatial_scale=1.0, sampling_ratio=0,
                      aligned=True)
    return crops[:, 0] >= MASK_THRESHOLD


def mask_loss(mask_logits: torch.Tensor, targets: torch.Tensor,
              classes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean per-pixel binary cross-entropy of foreground RoI masks (detectron2 Mask R-CNN).

    mask_logits: [R, K, M, M], K = 1 (class-agnostic) or one channel per class, then
    ``classes`` [R] picks each RoI's channel; targets: [R, M, M] bool.
    """
    if mask_logits.shape[0] == 0:
        return _connected_zero(mask_logits)
    if mask_logits.shape[1] == 1:
        logits = mask_logits[:, 0]
    else:
        logits = mask_logits[torch.arange(len(mask_logits), device=mask_logits.device), classes]
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))


@torch.no_grad()
def put_classification_stats(logits: torch.Tensor, classes: torch.Tensor) -> None:
    """Report detectron2's ``fast_rcnn/cls_accuracy`` (argmax = label over all sampled RoIs),
    ``fg_cls_accuracy`` and ``false_negative`` (foreground RoIs called background).
    logits: [R, C + 1], background last; classes: [R] in 0..C."""
    if not len(classes):
        return
    background = logits.shape[1] - 1
    predicted = logits.argmax(dim=1)
    put_scalar("fast_rcnn/cls_accuracy", (predicted == classes).float().mean())
    foreground = classes < background
    if bool(foreground.any()):
        put_scalar("fast_rcnn/fg_cls_accuracy",
                   (predicted[foreground] == classes[foreground]).float().mean())
        put_scalar("fast_rcnn/false_negative", (predicted[foreground] == background).float().mean())
