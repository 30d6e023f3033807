"""PretrainFastRCNN: RegionCLIP's region-text pretraining model (reference sections 4.3, 5).

A frozen offline RPN proposes regions and a frozen CLIP teacher labels them with pool concepts;
the student trunk learns KL distillation, region-concept contrastive and image-text contrastive
losses (captions through the frozen text tower). Attribute names are the official checkpoint's
prefixes (concept pools and pixel statistics are non-persistent buffers), so CLIPFastRCNN loads
a saved state dict unchanged.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..events import put_scalar
from ..structures import ImageList
from .clip_resnet import INFERENCE_CHUNK, CLIPResNet, pool_regions
from .pretrain_losses import (
    DEFAULT_TEMPERATURE,
    TEACHER_TEMPERATURE,
    image_text_contrastive,
    pseudo_concept_labels,
    region_concept_contrastive,
    region_concept_distillation,
)
from .rpn import OfflineRPNInput, offline_proposals
from .text_encoder import TextEncoder

# Loss switch name -> the key of the returned loss dict.
LOSS_KEYS = {
    "distill": "loss_region_distill",
    "contrastive": "loss_concept_contrastive",
    "img_txt": "loss_img_txt_level",
}
LOSS_NAMES = tuple(LOSS_KEYS)
REGION_LOSSES = ("distill", "contrastive")


def whole_image_boxes(image_sizes: Sequence[Tuple[int, int]], device=None) -> List[torch.Tensor]:
    """One xyxy box [0, 0, w, h] per image, spanning that image's own extent.

    The original spanned the padded batch canvas (reference section 11.3), so a small image
    in a batch with a large one was embedded together with padding.
    """
    return [torch.tensor([[0.0, 0.0, float(w), float(h)]], device=device) for h, w in image_sizes]


def sample_boxes(boxes: torch.Tensor, num: int) -> torch.Tensor:
    """A uniformly random subset of ``num`` rows of ``boxes`` (all of them if num <= 0 or
    there are fewer)."""
    if num <= 0 or len(boxes) <= num:
        return boxes
    return boxes[torch.randperm(len(boxes), device=boxes.device)[:num]]


def context_squares(boxes: torch.Tensor, context: float) -> torch.Tensor:
    """xyxy squares of side ``context`` times each xyxy box's longer side, centred on it."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = context * (boxes[:, 2:] - boxes[:, :2]).amax(1, keepdim=True) / 2
    return torch.cat([centre - half, centre + half], 1)


def random_caption(tokens: torch.Tensor) -> torch.Tensor:
    """One row of an image's caption tokens [n_cap, L], chosen uniformly among its own."""
    if tokens.dim() != 2 or len(tokens) == 0:
        raise ValueError(f"caption tokens must be [n_captions >= 1, context_length], got "
                         f"{tuple(tokens.shape)}")
    return tokens[int(torch.randint(len(tokens), ()))]


class PretrainFastRCNN(nn.Module):
    """Region-text pretraining; ``forward`` returns the enabled losses (training mode only).

    Args:
        backbone / teacher_backbone: student and teacher CLIP trunks; the teacher is frozen
            here (no gradients, eval mode even under ``train()``).
        pixel_mean / pixel_std: CLIP statistics on the 0-1 scale (inputs are in [0, 1]).
        pooler_resolution / teacher_pooler_resolution: RoIAlign sizes on res4 (twice each
            trunk's attention-pool grid).
        losses: subset of ``LOSS_NAMES``. The region losses need the offline RPN and both
            concept pools; ``img_txt`` needs ``lang_encoder``.
        concept_emb / teacher_concept_emb: [C, D_student] / [C, D_teacher] unnormalised
            concept pools, same C (the teacher's argmax indexes the student's pool).
        sample_regions: proposals kept per image, chosen at random (0 = all).
        concept_thres: teacher probability a region's best concept must exceed.
        temperature: of the three losses (MODEL.CLIP.CLSS_TEMP).
        teacher_temperature: of the teacher's pseudo-label distributions
            (MODEL.CLIP.TEACHER_TEMP).
        teacher_crop_context: 0 = the teacher embeds regions by RoIAlign on its own feature
            map (the original); > 0 = it encodes each region as a whole image: a square of
            this many times the box's longer side, resampled to its CLIP input size (the
            image's outside is the mean colour). Crops labelled regions better in the toy
            world (docs/TOYWORLD.md), at the cost of one teacher pass per region.
        gather: all-gather image and caption embeddings across processes.
    """

    def __init__(
        self,
        *,
        backbone: CLIPResNet,
        teacher_backbone: CLIPResNet,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        pooler_resolution: int,
        teacher_pooler_resolution: int,
        losses: Sequence[str] = LOSS_NAMES,
        offline_backbone: Optional[nn.Module] = None,
        offline_proposal_generator: Optional[nn.Module] = None,
        offline_input: Optional[OfflineRPNInput] = None,
        concept_emb: Optional[torch.Tensor] = None,
        teacher_concept_emb: Optional[torch.Tensor] = None,
        lang_encoder: Optional[TextEncoder] = None,
        sample_regions: int = 0,
        concept_thres: float = 0.0,
        temperature: float = DEFAULT_TEMPERATURE,
        teacher_temperature: float = TEACHER_TEMPERATURE,
        teacher_crop_context: float = 0.0,
        gather: bool = False,
    ):
        super().__init__()
        self.losses = _check_losses(losses, offline_backbone, lang_encoder)
        self.backbone = backbone
        self.teacher_backbone = teacher_backbone.requires_grad_(False).eval()
        self.lang_encoder = lang_encoder.requires_grad_(False).eval() if lang_encoder else None
        self.offline_backbone = offline_backbone
        self.offline_proposal_generator = offline_proposal_generator
        self.offline_input = offline_input
        if self.region_losses:
            _check_concepts(concept_emb, teacher_concept_emb, backbone, teacher_backbone)
        self.register_buffer("concept_emb", concept_emb, False)
        self.register_buffer("teacher_concept_emb", teacher_concept_emb, False)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.pooler_resolution = pooler_resolution
        self.teacher_pooler_resolution = teacher_pooler_resolution
        self.sample_regions = sample_regions
        self.concept_thres = concept_thres
        self.temperature = temperature
        self.teacher_temperature = teacher_temperature
        if teacher_crop_context < 0:
            raise ValueError(f"MODEL.CLIP.TEACHER_CROP_CONTEXT must be >= 0 (0 = RoIAlign, e.g. "
                             f"1.5 = crops 1.5x the box), got {teacher_crop_context}")
        self.teacher_crop_context = teacher_crop_context
        self.gather = gather

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def region_losses(self) -> bool:
        return any(name in self.losses for name in REGION_LOSSES)

    def train(self, mode: bool = True) -> "PretrainFastRCNN":
        super().train(mode)
        self.teacher_backbone.eval()
        if self.lang_encoder is not None:
            self.lang_encoder.eval()
        return self

    def forward(self, batched_inputs: List[Dict]) -> Dict[str, torch.Tensor]:
        """Losses for a batch of dicts with ``image`` (float [3, H, W] RGB in [0, 1]) and
        ``tokens`` (long [n_captions, 77], needed by the image-text loss)."""
        if not self.training:
            raise RuntimeError(
                "PretrainFastRCNN only computes pretraining losses (call model.train()). To "
                "detect objects with a pretrained checkpoint, build MODEL.META_ARCHITECTURE "
                "CLIPFastRCNN and load the checkpoint as MODEL.WEIGHTS")
        images = [_unit_image(x["image"]).to(self.device) for x in batched_inputs]
        batch = ImageList.from_tensors([(x - self.pixel_mean) / self.pixel_std for x in images],
                                       self.backbone.size_divisibility)
        res4 = self.backbone(batch.tensor)["res4"]
        losses = {}
        if self.region_losses:
            losses.update(self._region_losses(images, batch.tensor, res4))
        if "img_txt" in self.losses:
            losses[LOSS_KEYS["img_txt"]] = self._image_text_loss(batched_inputs, res4,
                                                                 batch.image_sizes)
        return losses

    @torch.no_grad()
    def sample_proposals(self, images: List[torch.Tensor]) -> List[torch.Tensor]:
        """Offline-RPN boxes per image (xyxy, that image's pixels), randomly subsampled."""
        # The offline RPN takes 0-255 pixels; pretraining images are in [0, 1].
        proposals = offline_proposals(self.offline_backbone, self.offline_proposal_generator,
                                      self.offline_input, [x * 255.0 for x in images])
        return [sample_boxes(p.proposal_boxes.tensor, self.sample_regions) for p in proposals]

    def _region_losses(self, images, normalized: torch.Tensor, res4) -> Dict[str, torch.Tensor]:
        boxes = self.sample_proposals(images)
        student = self.backbone.embed_regions(res4, boxes, self.pooler_resolution)
        teacher = self.teacher_regions(normalized, boxes)
        labels = pseudo_concept_labels(teacher, self.teacher_concept_emb, self.concept_thres,
                                       self.teacher_temperature)
        put_scalar("pretrain/pseudo_label_kept", labels.keep.float().mean())
        region = F.normalize(student[labels.keep].float(), dim=1)
        concepts = F.normalize(self.concept_emb.float(), dim=1)
        losses = {}
        if "distill" in self.losses:
            logits = region @ concepts.t() / self.temperature
            losses[LOSS_KEYS["distill"]] = region_concept_distillation(logits, labels.probs)
        if "contrastive" in self.losses:
            losses[LOSS_KEYS["contrastive"]] = region_concept_contrastive(
                region, concepts[labels.targets], labels.label_matrix, self.temperature)
        return losses

    @torch.no_grad()
    def teacher_regions(self, normalized: torch.Tensor, boxes: List[torch.Tensor]) -> torch.Tensor:
        """Teacher embeddings [sum R_i, D_teacher] of the boxes, from the same normalised (and
        padded) batch as the student sees."""
        if not self.teacher_crop_context:
            res4 = self.teacher_backbone(normalized)["res4"]
            return self.teacher_backbone.embed_regions(res4, boxes, self.teacher_pooler_resolution)
        squares = [context_squares(b, self.teacher_crop_context) for b in boxes]
        crops = pool_regions(normalized, squares, self.teacher_backbone.variant.image_size,
                             stride=1)
        chunks = crops.split(INFERENCE_CHUNK) if len(crops) else [crops]
        return torch.cat([self.teacher_backbone.encode_image(chunk) for chunk in chunks])

    def _image_text_loss(self, batched_inputs, res4, image_sizes) -> torch.Tensor:
        boxes = whole_image_boxes(image_sizes, self.device)
        image = self.backbone.embed_regions(res4, boxes, self.pooler_resolution)
        tokens = torch.stack([random_caption(x["tokens"]) for x in batched_inputs])
        with torch.no_grad():
            text = self.lang_encoder.encode_text(tokens.to(self.device), only_eot=True)
        return image_text_contrastive(image, text, self.temperature, gather=self.gather)


def _unit_image(image: torch.Tensor) -> torch.Tensor:
    if not image.is_floating_point() or image.dim() != 3:
        raise ValueError(f"pretraining images must be float [3, H, W] RGB in [0, 1], got "
                         f"{image.dtype} {tuple(image.shape)}")
    return image


def _check_losses(losses: Sequence[str], offline_backbone, lang_encoder) -> Tuple[str, ...]:
    losses = tuple(losses)
    unknown = [name for name in losses if name not in LOSS_KEYS]
    if unknown or not losses:
        raise ValueError(f"pretraining losses must be a non-empty subset of {LOSS_NAMES}, "
                         f"got {list(losses)}")
    if any(name in losses for name in REGION_LOSSES) and offline_backbone is None:
        raise ValueError("the region losses need offline RPN proposals "
                         "(MODEL.CLIP.CROP_REGION_TYPE RPN and MODEL.CLIP.OFFLINE_RPN_CONFIG)")
    if "img_txt" in losses and lang_encoder is None:
        raise ValueError("the image-text loss needs the text encoder (lang_encoder)")
    return losses


def _check_concepts(concept_emb, teacher_concept_emb, backbone, teacher_backbone) -> None:
    if concept_emb is None or teacher_concept_emb is None:
        raise ValueError("the region losses need the concept pools (MODEL.CLIP.CONCEPT_POOL_EMB)")
    widths = (backbone.variant.embed_dim, teacher_backbone.variant.embed_dim)
    for name, emb, width in zip(("student", "teacher"), (concept_emb, teacher_concept_emb),
                                widths):
        if emb.dim() != 2 or emb.shape[1] != width:
            raise ValueError(f"the {name} concept pool must be [C, {width}] (the {name} CLIP "
                             f"embedding width), got {tuple(emb.shape)}")
    if concept_emb.shape[0] != teacher_concept_emb.shape[0]:
        raise ValueError(f"student and teacher concept pools must list the same concepts; got "
                         f"{concept_emb.shape[0]} and {teacher_concept_emb.shape[0]} rows")
