"""Text-embedding classifier and box post-processing of the region head.

Region embeddings are classified by cosine similarity with frozen text embeddings divided by
a temperature; background is a fixed all-zero embedding, so its logit is always 0. Deltas are
class-agnostic and regressed from the unnormalised embedding, as in the original.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import batched_nms
from ..structures import Boxes, Instances
from .box_coder import Box2BoxTransform
from .losses import box_regression_loss, classification_loss, put_classification_stats
from .matcher import regression_targets


def _frozen_linear(weight: torch.Tensor) -> nn.Linear:
    """A bias-free layer holding ``weight``, on its device and of its dtype."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device,
                      dtype=weight.dtype)
    layer.weight.data.copy_(weight)
    layer.weight.requires_grad_(False)
    return layer


class TextEmbeddingPredictor(nn.Module):
    """Scores regions against a vocabulary of text embeddings.

    Attribute names are the official checkpoint names under ``roi_heads.box_predictor``:
    ``cls_score`` (training vocabulary, [C, D]), ``cls_bg_score`` (zeros, [1, D]),
    ``test_cls_score`` (open-set test vocabulary, [C_test, D], optional), ``bbox_pred``.
    """

    def __init__(
        self,
        train_embeddings: torch.Tensor,
        test_embeddings: Optional[torch.Tensor] = None,
        temperature: float = 0.01,
    ):
        super().__init__()
        embed_dim = train_embeddings.shape[1]
        self.temperature = temperature
        self.cls_score = _frozen_linear(train_embeddings)
        self.cls_bg_score = _frozen_linear(torch.zeros(1, embed_dim))
        self.test_cls_score = None if test_embeddings is None else _frozen_linear(test_embeddings)
        self.bbox_pred = nn.Linear(embed_dim, 4)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.bbox_pred.bias)

    @property
    def num_classes(self) -> int:
        """Classes scored now: the test vocabulary in eval mode when one is set."""
        return self._vocabulary().weight.shape[0]

    def _vocabulary(self) -> nn.Linear:
        if not self.training and self.test_cls_score is not None:
            return self.test_cls_score
        return self.cls_score

    def set_test_embeddings(self, embeddings: torch.Tensor) -> None:
        """Replace the test vocabulary ([C, D], unnormalised rows are fine)."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.cls_score.weight.shape[1]:
            raise ValueError(
                f"Vocabulary embeddings must be [C, {self.cls_score.weight.shape[1]}], "
                f"got {list(embeddings.shape)}"
            )
        # where the model is now (a vocabulary is often set after the model went to the GPU)
        self.test_cls_score = _frozen_linear(embeddings.to(self.cls_score.weight))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """x: [R, D] region embeddings -> (logits [R, C+1] with background last, deltas [R, 4])."""
        normalized = F.normalize(x, dim=1)
        text = F.normalize(self._vocabulary().weight, dim=1)
        background = self.cls_bg_score(normalized)
        logits = torch.cat([normalized @ text.t(), background], dim=1) / self.temperature
        return logits, self.bbox_pred(x)


@dataclass
class InferenceSettings:
    """Post-processing knobs (ROI_HEADS.* and MODEL.CLIP.* of the config)."""

    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_image: int = 100
    no_box_delta: bool = False
    multiply_rpn_score: bool = False
    report_unfused_scores: bool = False  # MODEL.CLIP.VIS
    soft_nms: bool = False
    soft_nms_method: str = "gaussian"
    soft_nms_sigma: float = 0.5
    soft_nms_prune: float = 0.001
    box_reg_weights: Tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)


@dataclass(frozen=True)
class LossSettings:
    """Training-loss knobs: MODEL.CLIP.FOCAL_SCALED_LOSS (gamma, 0 = plain or weighted CE) and
    BG_CLS_LOSS_WEIGHT, MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA / BBOX_REG_LOSS_WEIGHT /
    BBOX_REG_WEIGHTS."""

    focal_gamma: float = 0.0
    bg_weight: float = 1.0
    smooth_l1_beta: float = 0.0
    box_reg_loss_weight: float = 1.0
    box_reg_weights: Tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)


def predictor_losses(logits: torch.Tensor, deltas: torch.Tensor, sampled: List[Instances],
                     settings: LossSettings) -> Dict[str, torch.Tensor]:
    """``loss_cls`` and ``loss_box_reg`` of the sampled RoIs of a batch (reference 6.2).

    logits: [R, C + 1] against the training vocabulary (background last); deltas: [R, 4];
    sampled: per image RoIs with ``gt_classes`` and ``gt_boxes`` (`label_and_sample_proposals`).
    """
    classes = torch.cat([s.gt_classes for s in sampled])
    put_classification_stats(logits, classes)
    coder = Box2BoxTransform(weights=settings.box_reg_weights)
    foreground, targets = regression_targets(sampled, logits.shape[1] - 1, coder)
    box_loss = box_regression_loss(deltas, targets, foreground, settings.smooth_l1_beta)
    return {
        "loss_cls": classification_loss(logits, classes, settings.focal_gamma, settings.bg_weight),
        "loss_box_reg": box_loss * settings.box_reg_loss_weight,
    }


def predict_probs(logits: torch.Tensor, proposals: List[Instances], fuse_rpn: bool):
    """Softmax over classes + background, optionally fused with the RPN score.

    The original fuses with the proposal's *raw objectness logit*: sqrt(p * logit). Proposals
    with a negative logit get NaN scores and are dropped later as non-finite; scores can
    exceed 1. This is kept on purpose so that published LVIS numbers reproduce.
    Returns (fused probs, unfused probs), each split per image.
    """
    probs = F.softmax(logits, dim=-1)
    fused = probs
    if fuse_rpn:
        objectness = torch.cat([p.objectness_logits for p in proposals])
        fused = (probs * objectness[:, None]) ** 0.5
    sizes = [len(p) for p in proposals]
    return fused.split(sizes), probs.split(sizes)


def predict_boxes(deltas, proposals: List[Instances], settings: InferenceSettings):
    boxes = [p.proposal_boxes.tensor for p in proposals]
    if settings.no_box_delta:
        return boxes
    coder = Box2BoxTransform(weights=settings.box_reg_weights)
    decoded = coder.apply_deltas(deltas, torch.cat(boxes))
    return decoded.split([len(b) for b in boxes])


def fusion_can_pass(objectness: torch.Tensor, score_thresh: float) -> torch.Tensor:
    """[R] bool: the proposals whose RPN-fused score ``sqrt(p * logit)`` can pass the threshold.

    Since every class probability p is at most 1, a proposal scores at most sqrt(logit) in any
    class: one whose logit is at or below ``score_thresh ** 2`` (or NaN) never yields a
    detection, so its region need not be embedded. The bound keeps a relative margin of 1e-4
    for the float32 rounding of softmax, product and square root (each a few 1e-7), so no
    proposal that could pass is ever dropped.
    """
    if score_thresh < 0:
        return objectness == objectness  # every finite score passes; NaN rows are dropped
    return objectness > score_thresh ** 2 * (1 - 1e-4)


def detect_images(
    boxes: List[torch.Tensor],
    scores: List[torch.Tensor],
    unfused_scores: List[torch.Tensor],
    image_sizes: List[Tuple[int, int]],
    settings: InferenceSettings,
) -> List[Tuple[Instances, torch.Tensor]]:
    """Threshold, per-class NMS (or soft-NMS) and top-k for a batch of images in one pass.

    Per image: boxes [R_i, 4] class-agnostic; scores, unfused_scores [R_i, C+1] (background
    last). One NMS call covers every (image, class) group, so the batch costs one
    device-to-host sync, not one per image or class. Returns per image the detections and,
    for each, the index of the proposal it came from.
    """
    counts = torch.tensor([len(b) for b in boxes])
    device = boxes[0].device if boxes else torch.device("cpu")
    image = torch.repeat_interleave(torch.arange(len(boxes)), counts).to(device)
    boxes, scores = torch.cat(boxes), torch.cat(scores)[:, :-1]
    valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores).all(dim=1)
    boxes = _clip_per_image(boxes, image, image_sizes)

    rows, classes = ((scores > settings.score_thresh) & valid[:, None]).nonzero().unbind(1)
    groups = image[rows] * scores.shape[1] + classes
    cand_boxes, cand_scores = boxes[rows], scores[rows, classes]
    if settings.soft_nms:
        keep, reported = batched_soft_nms(
            cand_boxes, cand_scores, groups, settings.soft_nms_method, settings.soft_nms_sigma,
            settings.nms_thresh, settings.soft_nms_prune, images=image[rows])
    else:
        keep = batched_nms(cand_boxes, cand_scores, groups, settings.nms_thresh)
        reported = cand_scores[keep]
        if settings.report_unfused_scores:
            reported = torch.cat(unfused_scores)[rows[keep], classes[keep]]
    keep, reported, per_image = _top_k_per_image(keep, reported, image[rows], len(image_sizes),
                                                 settings.detections_per_image)
    results = []
    first_rows = (torch.cumsum(counts, 0) - counts).tolist()
    for size, first, k, r in zip(image_sizes, first_rows, keep.split(per_image),
                                 reported.split(per_image)):
        result = Instances(size, pred_boxes=Boxes(cand_boxes[k]), scores=r,
                           pred_classes=classes[k])
        results.append((result, rows[k] - first))
    return results


def _clip_per_image(boxes: torch.Tensor, image: torch.Tensor, image_sizes) -> torch.Tensor:
    """Boxes clamped to their own image: x to [0, width], y to [0, height] (as `Boxes.clip`)."""
    sizes = torch.tensor(image_sizes, dtype=boxes.dtype).to(boxes.device)[image]  # [R, (h, w)]
    upper = sizes.flip(1).repeat(1, 2)  # (w, h, w, h)
    return torch.minimum(boxes.clamp(min=0), upper)


def _top_k_per_image(keep, reported, image, num_images: int, k: int):
    """The first ``k`` (all when negative) of each image's detections, in score order.

    ``keep`` comes in descending score order over the batch; a stable sort by image keeps
    that order within each image. Returns (keep, reported, detections per image).
    """
    by_image = torch.sort(image[keep], stable=True)[1]
    keep, reported = keep[by_image], reported[by_image]
    counts = torch.bincount(image[keep], minlength=num_images)
    if k >= 0:  # negative keeps all, as detectron2
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(keep), device=keep.device) - starts[image[keep]]
        keep, reported = keep[rank < k], reported[rank < k]
        counts = counts.clamp(max=k)
    return keep, reported, counts.tolist()


METHODS = ("gaussian", "linear", "hard")


def batched_soft_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    idxs: torch.Tensor,
    method: str = "gaussian",
    sigma: float = 0.5,
    iou_threshold: float = 0.3,
    prune: float = 0.001,
    images: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Soft-NMS applied independently within each class.

    Greedy per class: take the highest-scoring remaining box, decay the scores of the other
    remaining boxes of its class by their IoU with it, then drop boxes whose score is <= prune.
    Decay: "gaussian" ``s * exp(-iou^2 / sigma)``; "linear" ``s * (1 - iou)`` where
    ``iou > iou_threshold``; "hard" ``0`` where ``iou >= iou_threshold`` (plain NMS).
    As in the original, a box scoring <= prune from the start is only kept when it is the
    overall top-scoring box (the original's first pick happens before any pruning); with
    ``images``, the top-scoring box of each image, so a batch gives each image's own result.

    Args:
        boxes: [N, 4] xyxy.
        scores: [N] finite scores (ValueError otherwise).
        idxs: [N] integer class of each box.
        method: one of METHODS.
        sigma: gaussian width.
        iou_threshold: IoU threshold of "linear" and "hard".
        prune: score at or below which a box is discarded.
        images: [N] image of each box, for a batch of images (classes then never span two).
    Returns:
        keep: [K] int64 indices into ``boxes``, in non-increasing order of rescored score
            (ties: lower index first, the order of the original's greedy loop).
        rescored: [K] the decayed scores of the kept boxes at the moment they were picked.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown soft-NMS method {method!r}; choose one of {METHODS}")
    num = boxes.shape[0]
    if boxes.shape != (num, 4) or scores.shape != (num,) or idxs.shape != (num,):
        raise ValueError(
            f"Expected boxes [N, 4], scores [N], idxs [N]; got {tuple(boxes.shape)}, "
            f"{tuple(scores.shape)}, {tuple(idxs.shape)}"
        )
    if scores.numel() == 0:
        return scores.new_empty((0,), dtype=torch.int64), scores.new_empty((0,))
    if not bool(torch.isfinite(scores).all()):
        # A NaN never equals its class maximum, so its class would never finish.
        raise ValueError("batched_soft_nms needs finite scores; filter the others first")

    index = _initial_candidates(scores, idxs, prune, images)
    classes = torch.unique(idxs.index_select(0, index), return_inverse=True)[1]
    num_classes = int(classes.max()) + 1
    score = scores.index_select(0, index)
    box = boxes.index_select(0, index)
    # The area travels as a fifth column so that one gather serves both.
    box = torch.cat([box, ((box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1]))[:, None]], dim=1)

    kept_index, kept_score = [], []
    while index.numel() > 0:
        first = _class_argmax(score, classes, num_classes)
        picks = first[first < index.numel()]
        kept_index.append(index.index_select(0, picks))
        kept_score.append(score.index_select(0, picks))

        iou = _iou_with_pick(box, first.index_select(0, classes))
        score = score * _decay(iou, method, sigma, iou_threshold)
        alive = score > prune
        alive[picks] = False
        alive = alive.nonzero().squeeze(1)
        index, classes, score, box = (
            t.index_select(0, alive) for t in (index, classes, score, box)
        )
    return _merge_by_score(torch.cat(kept_index), torch.cat(kept_score))


def _initial_candidates(scores: torch.Tensor, idxs: torch.Tensor, prune: float,
                        images: Optional[torch.Tensor]) -> torch.Tensor:
    """[K] indices of the boxes that can ever be kept, grouped by class, ascending within one.

    The original prunes every box after its first pick, the image's maximum; a box at or below
    ``prune`` can therefore only survive as that first pick. Removing the others up front
    changes nothing else, since a box that is never picked never decays anyone. Grouping by
    class makes the per-class reductions below several times faster on CPU.
    """
    candidate = scores > prune
    if images is None:
        candidate[scores.argmax()] = True
    else:
        firsts = _class_argmax(scores, images, int(images.max()) + 1)
        candidate[firsts[firsts < len(scores)]] = True
    index = candidate.nonzero().squeeze(1)
    by_class = torch.sort(idxs.index_select(0, index), stable=True)[1]
    return index.index_select(0, by_class)


def _class_argmax(score: torch.Tensor, classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[num_classes] position of each class's current pick; n for a class with no box left.

    The pick is the class's highest score, the lowest position among ties: within a class
    positions follow the original index order, so this is torch.argmax's choice in the
    original loop.
    """
    n = score.numel()
    class_max = score.new_full((num_classes,), -float("inf"))
    class_max.scatter_reduce_(0, classes, score, "amax")
    positions = torch.arange(n, device=score.device)
    tied = score == class_max.index_select(0, classes)
    first = torch.full_like(class_max, n, dtype=torch.int64)
    return first.scatter_reduce_(0, classes, torch.where(tied, positions, n), "amin")


def _iou_with_pick(box: torch.Tensor, pick_of: torch.Tensor) -> torch.Tensor:
    """[n] IoU of each box with its class's pick; 0 where they do not intersect.

    Args: box: [n, 5] (x1, y1, x2, y2, area); pick_of: [n] positions into ``box``.
    The formula and the 0-for-no-intersection rule are detectron2's `pairwise_iou`.
    """
    pick = box.index_select(0, pick_of)
    top_left = torch.maximum(box[:, :2], pick[:, :2])
    bottom_right = torch.minimum(box[:, 2:4], pick[:, 2:4])
    wh = (bottom_right - top_left).clamp_(min=0)
    inter = wh[:, 0] * wh[:, 1]
    return torch.where(inter > 0, inter / (pick[:, 4] + box[:, 4] - inter), 0.0)


def _decay(iou: torch.Tensor, method: str, sigma: float, iou_threshold: float) -> torch.Tensor:
    """[n] multiplicative score decay for the given IoUs."""
    if method == "gaussian":
        return torch.exp(-(iou * iou) / sigma)
    if method == "linear":
        return torch.where(iou > iou_threshold, 1 - iou, 1.0)
    return (iou < iou_threshold).to(iou.dtype)


def _merge_by_score(
    index: torch.Tensor, score: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Order all classes' picks by score (descending), ties by index (ascending).

    Each class's picks already come in that order, so this is the sequence in which the
    original's single greedy loop would have emitted them.
    """
    by_index = torch.argsort(index)
    index, score = index[by_index], score[by_index]
    by_score = torch.argsort(score, descending=True, stable=True)
    return index[by_score], score[by_score]
