"""Detic's weak supervision: image-label (max-size) and caption losses on image-level data.

An image-labelled batch carries no boxes, only the class ids named in each image
(``pos_category_ids``) and its captions. Its regions are the RPN's top ``WS_NUM_PROPS`` proposals
(most confident first), optionally followed by a box spanning the whole image. Per image:

- image labels: for each label one region is chosen (``max_size``: the largest proposal) and
  trained to score that class, with a sigmoid BCE over all C + 1 class columns (or softmax CE);
  the losses are averaged over the image's labels;
- captions: the whole-image box must match the image's own caption among all captions of the
  batch (every process's, with ``SYNC_CAPTION_BATCH``): BCE, negatives weighted
  ``NEG_CAP_WEIGHT``.

Both are summed over images, divided by the batch size and scaled by ``IMAGE_LOSS_WEIGHT``
into one ``image_loss``. Used by Detic's ``CustomRCNN`` and by RegionCLIP's ``CLIPFastRCNN``.
"""
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ...prompts import tokenize
from ...structures import Boxes, Instances
from ..pretrain_losses import gather_rows
from ..text_encoder import TextEncoder

ANN_TYPES = ("box", "image", "caption", "captiontag")
IMAGE_LABEL_LOSSES = ("max_size", "max_score", "first", "image")


@dataclass(frozen=True)
class WeakSupervision:
    """``MODEL.ROI_BOX_HEAD.{WS_NUM_PROPS, ADD_IMAGE_BOX, IMAGE_BOX_SIZE, IMAGE_LABEL_LOSS,
    SOFTMAX_WEAK_LOSS, IMAGE_LOSS_WEIGHT, CAPTION_WEIGHT, NEG_CAP_WEIGHT}`` and
    ``MODEL.{SYNC_CAPTION_BATCH, CAP_BATCH_RATIO}``."""

    num_proposals: int = 128
    add_image_box: bool = False
    image_box_size: float = 1.0
    image_label_loss: str = "max_size"
    softmax: bool = False
    image_loss_weight: float = 0.1
    caption_weight: float = 1.0
    neg_caption_weight: float = 0.125  # with or without sync_captions (Detic: with; DETIC.md)
    sync_captions: bool = False
    caption_batch_ratio: int = 4

    def __post_init__(self):
        if self.image_label_loss not in IMAGE_LABEL_LOSSES:
            raise ValueError(f"MODEL.ROI_BOX_HEAD.IMAGE_LABEL_LOSS {self.image_label_loss!r} is "
                             f"not available; valid: {IMAGE_LABEL_LOSSES}")
        if self.image_label_loss == "image" and not self.add_image_box:
            raise ValueError("IMAGE_LABEL_LOSS 'image' needs MODEL.ROI_BOX_HEAD.ADD_IMAGE_BOX True")


class CaptionBatch(NamedTuple):
    """Caption embeddings [N, D] scored as extra classes, and the row of this process's first
    image (0 unless the captions of several processes were gathered)."""

    features: torch.Tensor
    offset: int


def batch_ann_type(batched_inputs: Sequence[Dict]) -> str:
    """The supervision of a batch (``ann_type`` of its inputs, "box" when absent)."""
    types = {x.get("ann_type", "box") for x in batched_inputs}
    if len(types) != 1 or not types <= set(ANN_TYPES):
        raise ValueError(f"a batch must hold one supervision type of {ANN_TYPES}, got "
                         f"{sorted(types)}: batch the datasets separately (MultiDatasetSampler)")
    return types.pop()


def image_box(image_size, relative_size: float = 1.0, device=None) -> torch.Tensor:
    """[1, 4] xyxy box over the whole image, or centred and ``relative_size`` of it."""
    height, width = image_size
    margin = (1.0 - relative_size) / 2.0 if relative_size < 1.0 else 0.0
    box = [width * margin, height * margin, width * (1 - margin), height * (1 - margin)]
    return torch.tensor([box], device=device)


@torch.no_grad()
def top_proposals(proposals: List[Instances], settings: WeakSupervision) -> List[Instances]:
    """The regions of image-labelled images: the first ``num_proposals`` proposals (sorted by
    objectness), clipped, then the image box (objectness 1) when ``add_image_box``."""
    regions = []
    for props in proposals:
        boxes = props.proposal_boxes.tensor[: settings.num_proposals].clone()
        logits = props.objectness_logits[: settings.num_proposals]
        boxes = Boxes(boxes)
        boxes.clip(props.image_size)
        if settings.add_image_box:
            whole = image_box(props.image_size, settings.image_box_size, boxes.device)
            boxes = Boxes(torch.cat([boxes.tensor, whole.to(boxes.tensor.dtype)]))
            logits = torch.cat([logits, logits.new_ones(1)])
        regions.append(Instances(props.image_size, proposal_boxes=boxes, objectness_logits=logits))
    return regions


def chosen_row(method: str, scores: torch.Tensor, label: int, boxes: torch.Tensor) -> int:
    """The region trained on ``label``. ``max_size`` skips the last row, which Detic reserves
    for the image box; without one (its max-size config) the last proposal is skipped too, as
    in the released training."""
    if method == "max_size":
        areas = Boxes(boxes).area()
        return int(areas[:-1].argmax()) if len(areas) > 1 else 0
    if method == "max_score":
        return int(scores[:, label].argmax())
    if method == "first":
        return 0
    return len(scores) - 1  # "image": the whole-image box


def image_label_loss(scores: torch.Tensor, labels: Sequence[int], boxes: torch.Tensor,
                     method: str = "max_size", softmax: bool = False) -> torch.Tensor:
    """Mean over ``labels`` of the loss of each label's chosen region of one image.

    scores: [n, C + 1] class logits (background last); boxes: [n, 4] xyxy of the regions.
    Sigmoid: BCE summed over all C + 1 columns against the one-hot label (the background
    column adds the constant log 2, as in Detic); softmax: cross-entropy of the chosen row.
    """
    loss = scores.sum() * 0.0
    for label in labels:
        row = scores[chosen_row(method, scores, label, boxes)]
        if softmax:
            loss = loss + F.cross_entropy(row[None], row.new_tensor([label]).long())
        else:
            target = torch.zeros_like(row)
            target[label] = 1.0
            loss = loss + F.binary_cross_entropy_with_logits(row, target, reduction="sum")
    return loss / max(len(labels), 1)


def caption_loss(logits: torch.Tensor, target: int, neg_weight: float) -> torch.Tensor:
    """BCE of one region's caption logits [N] against its own caption ``target``:
    positive term + ``neg_weight`` x the sum of the N - 1 negative terms."""
    targets = torch.zeros_like(logits)
    targets[target] = 1.0
    terms = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return terms[target] + neg_weight * (terms.sum() - terms[target])


def weak_losses(logits: torch.Tensor, regions: List[Instances], labels: Sequence[Sequence[int]],
                captions: Optional[CaptionBatch], ann_type: str,
                settings: WeakSupervision) -> torch.Tensor:
    """``image_loss`` of an image-labelled batch.

    logits: [sum n_i, C + 1 (+ N)] of all regions; the last N columns score the captions when
    ``captions`` is given. regions: per image (`top_proposals`); labels: per image class ids.
    """
    num_captions = 0 if captions is None else len(captions.features)
    per_image = logits.float().split([len(r) for r in regions])
    label_total, caption_total = logits.sum() * 0.0, logits.sum() * 0.0
    for index, (scores, region, image_labels) in enumerate(zip(per_image, regions, labels)):
        if len(scores) == 0:
            continue
        scores, caption_scores = scores.split([scores.shape[1] - num_captions, num_captions], 1)
        if "caption" in ann_type:
            if not settings.add_image_box:
                raise ValueError("the caption loss scores the image box: set "
                                 "MODEL.ROI_BOX_HEAD.ADD_IMAGE_BOX True")
            caption_total = caption_total + settings.caption_weight * caption_loss(
                caption_scores[-1], captions.offset + index, settings.neg_caption_weight)
        if ann_type != "caption":
            label_total = label_total + image_label_loss(
                scores, image_labels, region.proposal_boxes.tensor, settings.image_label_loss,
                settings.softmax)
    return (label_total + caption_total) / len(regions) * settings.image_loss_weight


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def random_captions(batched_inputs: Sequence[Dict]) -> List[str]:
    """One of each input's ``captions``, drawn uniformly (torch's generator, as Detic)."""
    chosen = []
    for x in batched_inputs:
        captions = x.get("captions") or []
        if not captions:
            raise ValueError(f"caption supervision needs 'captions' in every input; "
                             f"{x.get('file_name', 'an input')} has none")
        chosen.append(captions[int(torch.randint(len(captions), ()))])
    return chosen


@torch.no_grad()
def encode_captions(text_encoder: Optional[TextEncoder], batched_inputs: Sequence[Dict],
                    ann_type: str, settings: WeakSupervision, device=None
                    ) -> Optional[CaptionBatch]:
    """The caption classifier of a batch: embeddings of one random caption per image (caption
    batches), gathered across processes when the captions are synchronised (then on every
    batch, see `caption_batch`). None without a text tower or captions."""
    if text_encoder is None:
        if "caption" in ann_type:
            raise ValueError(f"ann_type {ann_type!r} needs the text tower: set "
                             "MODEL.WITH_CAPTION True")
        return None
    features = None
    if "caption" in ann_type:
        tokens = tokenize(random_captions(batched_inputs), text_encoder.context_length)
        features = text_encoder.encode_text(tokens.to(device)).float()
    return caption_batch(features, len(batched_inputs), text_encoder.output_dim, settings,
                         device)


@torch.no_grad()
def caption_batch(features: Optional[torch.Tensor], batch_size: int, dim: int,
                  settings: WeakSupervision, device=None) -> Optional[CaptionBatch]:
    """The caption classifier of this batch: its own captions, or with ``sync_captions`` and
    several processes those of all processes. Every process must call this every step then
    (a collective): one without captions (a box batch) sends ``batch_size x
    caption_batch_ratio`` zero rows, which score 0 for everyone, and gets None back."""
    if not (settings.sync_captions and _distributed()):
        return None if features is None else CaptionBatch(features, 0)
    rank = dist.get_rank()
    rows = features if features is not None else torch.zeros(
        batch_size * settings.caption_batch_ratio, dim, device=device)
    tagged = torch.cat([rows.float(), torch.full((len(rows), 1), float(rank), device=rows.device)],
                       dim=1)
    gathered = gather_rows(tagged)
    if features is None:
        return None
    return CaptionBatch(gathered[:, :-1], int((gathered[:, -1] < rank).sum()))
