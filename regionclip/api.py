"""Python API: name your classes, get labelled boxes; give boxes, get region embeddings.

    detector = Detector.from_pretrained("regionclip_pretrained-cc_rn50.pth")
    detector.set_vocabulary(["red car", "traffic cone"])
    result = detector("street.jpg")              # .boxes [N, 4] xyxy, .scores, .labels
    regions = detector.embed_regions("street.jpg", [[10, 20, 200, 180]])   # [1, D], unit norm
    similarity = regions @ detector.embed_text(["red car", "bicycle"]).T   # [1, 2]
"""
import contextlib
import dataclasses
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import CheckpointMismatchError
from .data.transforms import ResizeShortestEdge
from .image_input import ImageInput, is_single_image, map_boxes, to_rgb_array
from .config.variants import get_variant
from .modeling.text_encoder import load_embeddings
from .pretrained import load_model, resolve_spec, spec_config
from .structures import Boxes, Instances
from .text_cache import ClassNameEncoder, check_class_names

__all__ = ["Detections", "Detector"]


@dataclass
class Detections:
    """The detections of one image, on the CPU, best first within each class."""

    boxes: torch.Tensor  # [N, 4] float, xyxy in pixels of the original image
    scores: torch.Tensor  # [N]
    class_ids: torch.Tensor  # [N] int64, positions in the vocabulary
    labels: List[str]  # N class names
    image_size: Tuple[int, int]  # (height, width) of the original image
    embeddings: Optional[torch.Tensor] = None  # [N, D] unit-norm region embeddings, on request
    masks: Optional[torch.Tensor] = None  # [N, H, W] bool, for detectors with a mask head

    def __len__(self) -> int:
        return len(self.scores)

    def to_instances(self) -> Instances:
        """As ``Instances`` (pred_boxes, scores, pred_classes[, pred_masks])."""
        fields = dict(pred_boxes=Boxes(self.boxes), scores=self.scores,
                      pred_classes=self.class_ids)
        if self.masks is not None:
            fields["pred_masks"] = self.masks
        return Instances(self.image_size, **fields)


class Detector:
    """A RegionCLIP detector with a vocabulary set by name.

    Build it with :meth:`from_pretrained`; the constructor takes an already loaded
    ``CLIPFastRCNN`` with its test-time resize and an optional class-name encoder.
    """

    def __init__(self, model: torch.nn.Module, resize: ResizeShortestEdge,
                 image_format: str = "RGB", text_encoder: Optional[ClassNameEncoder] = None,
                 variant: str = ""):
        self.model = model.eval()
        self.resize = resize
        self.image_format = image_format
        self.text_encoder = text_encoder
        self.variant = variant
        self.embed_dim = model.roi_heads.box_predictor.cls_score.weight.shape[1]
        self._vocabulary: Optional[List[str]] = None

    @classmethod
    def from_pretrained(cls, weights: str, rpn_weights: Optional[str] = None,
                        variant: Optional[str] = None, device: Optional[str] = None, *,
                        config: Optional[str] = None, rpn_config: Optional[str] = None,
                        text_weights: Optional[str] = None,
                        score_threshold: Optional[float] = None,
                        nms_threshold: Optional[float] = None,
                        max_detections: Optional[int] = None,
                        cache_dir: Optional[str] = None, overrides: Sequence = ()):
        """Load a checkpoint with the official config, RPN and thresholds it was made for.

        Args:
            weights: a RegionCLIP checkpoint (official files are recognised by name; others
                are described by their tensors).
            rpn_weights: an offline RPN checkpoint; default: the RPN stored in ``weights``,
                else the official RPN file beside it; without any, regions must be given.
            variant: CLIP variant (RN50, RN50x4, ..., tiny); default: from the tensors.
            device: "cpu", "cuda", ...; default: a GPU when there is one.
            config / rpn_config: YAML files replacing the official ones.
            text_weights: a file holding the text tower (fine-tuned detectors have none; the
                pretrained RegionCLIP or OpenAI CLIP file of the same variant).
            score_threshold, nms_threshold, max_detections: replace the config's values.
            cache_dir: class-embedding cache ($REGIONCLIP_CACHE or ~/.cache/regionclip);
                "" disables it.
            overrides: extra ``KEY VALUE`` config overrides.
        """
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        spec = resolve_spec(weights, rpn_weights, variant, config, rpn_config, text_weights,
                            overrides)
        cfg = spec_config(spec, device, score_threshold, nms_threshold, max_detections)
        model = load_model(spec, cfg)
        encoder = None
        if spec.text_weights:
            encoder = ClassNameEncoder(spec.text_weights, get_variant(spec.variant),
                                       str(model.device), cache_dir)
        resize = ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
        return cls(model, resize, cfg.INPUT.FORMAT, encoder, spec.variant)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def vocabulary(self) -> Optional[List[str]]:
        return None if self._vocabulary is None else list(self._vocabulary)

    def set_vocabulary(self, names: Sequence[str],
                       embeddings: Union[None, str, torch.Tensor] = None) -> None:
        """Score regions against ``names`` from now on.

        ``embeddings``: precomputed [C, D] class embeddings (tensor or file, rows in the order
        of ``names``) instead of encoding the names with the text tower.
        """
        names = check_class_names(names)
        source = "class embeddings"
        if embeddings is None:
            embeddings = self._encode(names)
        elif isinstance(embeddings, torch.Tensor):
            embeddings = embeddings.detach().float().cpu()
        else:
            source, embeddings = f"class embeddings {embeddings}", load_embeddings(embeddings)
        if embeddings.dim() != 2 or embeddings.shape != (len(names), self.embed_dim):
            raise ValueError(
                f"{source} of shape {list(embeddings.shape)} do not fit {len(names)} class "
                f"names and this {self.variant} detector's embedding width {self.embed_dim}")
        self.model.roi_heads.box_predictor.set_test_embeddings(embeddings)
        self._vocabulary = names

    def embed_text(self, names: Sequence[str]) -> torch.Tensor:
        """[C, D] unit-norm text embeddings of class names (81-template ensemble)."""
        return F.normalize(self._encode(check_class_names(names)), dim=1)

    def _encode(self, names: List[str]) -> torch.Tensor:
        if self.text_encoder is None:
            raise ValueError("this detector has no text tower to encode class names (fine-tuned "
                             "checkpoints carry none): pass text_weights= (the pretrained "
                             "RegionCLIP or OpenAI CLIP file of the same variant) or "
                             "precomputed embeddings; see MODEL_ZOO.md")
        try:
            return self.text_encoder(names)
        except CheckpointMismatchError as err:
            raise CheckpointMismatchError(
                f"the text tower of {self.text_encoder.weights} does not match this "
                f"{self.variant} detector (embedding width {self.embed_dim}): {err}") from err

    def _prepare(self, image: ImageInput) -> Tuple[dict, object]:
        """Model input dict of one image (as the test-time mapper) and its resize transform."""
        array = to_rgb_array(image)
        if self.image_format == "BGR":
            array = array[:, :, ::-1]
        height, width = array.shape[:2]
        transform = self.resize.get_transform(height, width)
        chw = np.ascontiguousarray(transform.apply_image(array).transpose(2, 0, 1))
        tensor = torch.as_tensor(chw, dtype=torch.float32)
        return {"image": tensor, "height": height, "width": width}, transform

    def _given_regions(self, inputs: dict, transform, boxes) -> Instances:
        size = tuple(inputs["image"].shape[-2:])
        resized = map_boxes(boxes, transform, size, (inputs["height"], inputs["width"]))
        boxes = torch.as_tensor(resized, dtype=torch.float32, device=self.device)
        return Instances(size, proposal_boxes=Boxes(boxes),
                         objectness_logits=torch.ones(len(boxes), device=self.device))

    @torch.no_grad()
    def __call__(self, images, boxes=None, return_embeddings: bool = False,
                 batch_size: int = 1):
        """Detect the vocabulary in one image or a list of images.

        images: a path, an HxWx3 uint8 RGB array, a PIL image, or a list of them (any sizes).
        boxes: regions to classify instead of RPN proposals, [N, 4] xyxy in original pixels
            (a list of them for a list of images). Regions are kept as given (no regression).
        batch_size: images per forward pass; above 1 images are padded to a common size,
            which changes features near their borders slightly (as in detectron2).
        Returns one :class:`Detections` per image (a single one for a single image).
        """
        if self._vocabulary is None:
            raise RuntimeError("no vocabulary: call set_vocabulary(['class name', ...]) first")
        single = is_single_image(images)
        images = [images] if single else list(images)
        regions = self._region_lists(boxes, single, len(images))
        results = []
        for start in range(0, len(images), max(1, batch_size)):
            chunk = slice(start, start + max(1, batch_size))
            results += self._detect(images[chunk], regions[chunk], return_embeddings)
        return results[0] if single else results

    def _region_lists(self, boxes, single: bool, count: int) -> list:
        if boxes is None:
            if self.model.proposal_source != "RPN":
                raise ValueError("this detector has no region proposal network: pass boxes=, "
                                 "or load it with rpn_weights= (see MODEL_ZOO.md)")
            return [None] * count
        regions = [boxes] if single else list(boxes)
        if len(regions) != count:
            raise ValueError(f"got {len(regions)} box lists for {count} images")
        return regions

    def _detect(self, images: list, regions: list, with_embeddings: bool) -> List[Detections]:
        prepared = [self._prepare(image) for image in images]
        inputs = [p[0] for p in prepared]
        given = regions[0] is not None
        with self._region_settings(given):
            proposals = ([self._given_regions(x, t, b) for (x, t), b in zip(prepared, regions)]
                         if given else self.model.get_proposals(inputs))
            results = self.model.inference(inputs, proposals, keep_embeddings=with_embeddings)
        output = []
        for result in results:
            instances = result["instances"]
            embeddings = (F.normalize(instances.region_embeddings, dim=1)
                          if with_embeddings else None)
            output.append(self._detections(instances, embeddings))
        return output

    @contextlib.contextmanager
    def _region_settings(self, given: bool):
        """Given regions are scored as ground-truth boxes are: kept, and not fused with an
        objectness they do not have."""
        heads = self.model.roi_heads
        saved = heads.inference_settings
        if given:
            heads.inference_settings = dataclasses.replace(saved, no_box_delta=True,
                                                           multiply_rpn_score=False)
        try:
            yield
        finally:
            heads.inference_settings = saved

    def _detections(self, instances: Instances, embeddings) -> Detections:
        class_ids = instances.pred_classes.cpu()
        masks = instances.pred_masks.cpu() if instances.has("pred_masks") else None
        return Detections(
            boxes=instances.pred_boxes.tensor.cpu(), scores=instances.scores.cpu(),
            class_ids=class_ids, labels=[self._vocabulary[i] for i in class_ids.tolist()],
            image_size=instances.image_size,
            embeddings=None if embeddings is None else embeddings.cpu(), masks=masks)

    @torch.no_grad()
    def embed_regions(self, image: ImageInput, boxes) -> torch.Tensor:
        """[N, D] unit-norm region embeddings of ``boxes`` ([N, 4] xyxy, original pixels):
        the regional analogue of CLIP's ``encode_image``, comparable with :meth:`embed_text`."""
        inputs, transform = self._prepare(image)
        regions = self._given_regions(inputs, transform, boxes)
        model = self.model
        res4 = model.backbone(model.preprocess_image([inputs]).tensor)["res4"]
        embeddings = model.roi_heads.embed(res4, [regions.proposal_boxes.tensor],
                                           model.backbone.layer4, model.backbone.attnpool)
        return F.normalize(embeddings, dim=1).cpu()
