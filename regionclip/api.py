"""Python API: name your classes, get labelled boxes; give boxes, get region embeddings.

    detector = Detector.from_pretrained("regionclip_pretrained-cc_rn50.pth")
    detector.set_vocabulary(["red car", "traffic cone"])
    result = detector("street.jpg")              # .boxes [N, 4] xyxy, .scores, .labels
    regions = detector.embed_regions("street.jpg", [[10, 20, 200, 180]])   # [1, D], unit norm
    similarity = regions @ detector.embed_text(["red car", "bicycle"]).T   # [1, 2]

Images go through the test-time mapper of the data pipeline and the detector's own
``inference`` / ``embed_regions``: the API adds only input checks and the vocabulary.

Waits show a progress bar on stderr (``progress=False`` turns it off): loading, encoding class
names that are not cached yet, and detection in a list of images or on a CPU.
"""
import logging
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .checkpoint import CheckpointMismatchError
from .config.variants import get_variant
from .data.coco import check_class_names
from .data.mapper import InferenceMapper, build_inference_mapper, read_image
from .data.transforms import transform_boxes_xyxy
from .engine.weights import load_model, resolve_spec, spec_config
from .modeling.text_encoder import check_finite_embeddings, load_embeddings
from .progress import progress_bar, steps
from .structures import Boxes, Instances
from .vocabulary import ClassNameEncoder

__all__ = ["Detections", "Detector"]

logger = logging.getLogger("regionclip")

ImageInput = Union[str, os.PathLike, np.ndarray, Image.Image]
_ACCEPTED = "a file path, an HxWx3 uint8 RGB numpy array or a PIL image"


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
    ``CLIPFastRCNN``, its test-time mapper and an optional class-name encoder.
    """

    def __init__(self, model: torch.nn.Module, mapper: InferenceMapper,
                 text_encoder: Optional[ClassNameEncoder] = None, variant: str = ""):
        self.model = model.eval()
        self.mapper = mapper
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
                        precision: Optional[str] = None,
                        cache_dir: Optional[str] = None, overrides: Sequence = (),
                        progress: bool = True):
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
            precision: "fp32" (default, exact), or a fast path: "fp32-fast", "tf32", "bf16"
                (``MODEL.PRECISION``; same detections up to rounding, see README).
            cache_dir: class-embedding cache ($REGIONCLIP_CACHE or ~/.cache/regionclip);
                "" disables it.
            overrides: extra ``KEY VALUE`` config overrides.
            progress: a bar over the loading steps (stderr).
        """
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        with steps(f"Loading {os.path.basename(os.fspath(weights))}", 3, progress) as step:
            step("reading the checkpoint")
            spec = resolve_spec(weights, rpn_weights, variant, config, rpn_config, text_weights,
                                overrides)
            _log_spec(spec, device)
            cfg = spec_config(spec, device, score_threshold, nms_threshold, max_detections,
                              precision)
            model = load_model(spec, cfg, step)
        encoder = None
        if spec.text_weights:
            encoder = ClassNameEncoder(spec.text_weights, get_variant(spec.variant),
                                       str(model.device), cache_dir)
        return cls(model, build_inference_mapper(cfg), encoder, spec.variant)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def vocabulary(self) -> Optional[List[str]]:
        return None if self._vocabulary is None else list(self._vocabulary)

    def set_vocabulary(self, names: Sequence[str],
                       embeddings: Union[None, str, torch.Tensor] = None,
                       progress: bool = True) -> None:
        """Score regions against ``names`` from now on.

        ``embeddings``: precomputed [C, D] class embeddings (tensor or file, rows in the order
        of ``names``) instead of encoding the names with the text tower (cached per name on
        disk; ``progress``: a bar while uncached names are encoded).
        """
        names = check_class_names(names)
        source = "class embeddings"
        if embeddings is None:
            embeddings = self._encode(names, progress)
        elif isinstance(embeddings, torch.Tensor):
            embeddings = embeddings.detach().float().cpu()
        else:
            source, embeddings = f"class embeddings {embeddings}", load_embeddings(embeddings)
        if embeddings.dim() != 2 or embeddings.shape != (len(names), self.embed_dim):
            raise ValueError(
                f"{source} of shape {list(embeddings.shape)} do not fit {len(names)} class "
                f"names and this {self.variant} detector's embedding width {self.embed_dim}")
        check_finite_embeddings(embeddings, source)
        self.model.roi_heads.box_predictor.set_test_embeddings(embeddings)
        self._vocabulary = names

    def embed_text(self, names: Sequence[str], progress: bool = True) -> torch.Tensor:
        """[C, D] unit-norm text embeddings of class names (81-template ensemble)."""
        return F.normalize(self._encode(check_class_names(names), progress), dim=1)

    def _encode(self, names: List[str], progress: bool) -> torch.Tensor:
        if self.text_encoder is None:
            raise ValueError("this detector has no text tower to encode class names (fine-tuned "
                             "checkpoints carry none): pass text_weights= (the pretrained "
                             "RegionCLIP or OpenAI CLIP file of the same variant) or "
                             "precomputed embeddings; see MODEL_ZOO.md")
        try:
            return self.text_encoder(names, progress)
        except CheckpointMismatchError as err:
            raise CheckpointMismatchError(
                f"the text tower of {self.text_encoder.weights} does not match this "
                f"{self.variant} detector (embedding width {self.embed_dim}): {err}") from err

    @torch.no_grad()
    def __call__(self, images, boxes=None, return_embeddings: bool = False,
                 batch_size: int = 1, progress: Optional[bool] = None):
        """Detect the vocabulary in one image or a list of images.

        images: a path, an HxWx3 uint8 RGB array, a PIL image, or a list of them (any sizes).
        boxes: regions to classify instead of RPN proposals, [N, 4] xyxy in original pixels
            (a list of them for a list of images). Regions are kept as given (no regression).
        batch_size: images per forward pass; above 1 images are padded to a common size,
            which changes features near their borders slightly (as in detectron2).
        progress: a bar over the images (stderr); by default shown for a list of several
            images and on a CPU, where one image takes seconds to minutes (the bar of a single
            image is erased when it is done, so a loop of calls leaves no trail).
        Returns one :class:`Detections` per image (a single one for a single image).
        """
        if self._vocabulary is None:
            raise RuntimeError("no vocabulary: call set_vocabulary(['class name', ...]) first")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        single = not isinstance(images, (list, tuple))
        images = [images] if single else list(images)
        regions = self._region_lists(boxes, single, len(images))
        if progress is None:
            progress = len(images) > 1 or self.device.type == "cpu"
        results, step = [], batch_size
        with progress_bar(len(images), "Detecting", "image", progress, leave=not single) as bar:
            for start in range(0, len(images), step):
                chunk = slice(start, start + step)
                results += self._detect(images[chunk], regions[chunk], return_embeddings)
                bar.update(len(results) - bar.n)
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

    def _prepare(self, image: ImageInput, boxes=None) -> Tuple[dict, Optional[torch.Tensor]]:
        """Model input of one image (the test-time mapper's) and ``boxes`` in its pixels."""
        array = _rgb_array(image)
        if self.mapper.image_format == "BGR":
            array = array[:, :, ::-1]
        inputs, transform = self.mapper.map_image(array)
        if boxes is None:
            return inputs, None
        original = (inputs["height"], inputs["width"])
        resized = _map_boxes(boxes, transform, tuple(inputs["image"].shape[-2:]), original)
        return inputs, torch.as_tensor(resized, dtype=torch.float32)

    def _detect(self, images: list, regions: list, with_embeddings: bool) -> List[Detections]:
        prepared = [self._prepare(image, boxes) for image, boxes in zip(images, regions)]
        inputs = [x for x, _ in prepared]
        given = None if regions[0] is None else [b for _, b in prepared]
        results = self.model.inference(inputs, given, keep_embeddings=with_embeddings)
        return [self._detections(r["instances"], with_embeddings) for r in results]

    def _detections(self, instances: Instances, with_embeddings: bool) -> Detections:
        class_ids = instances.pred_classes.cpu()
        embeddings = (F.normalize(instances.region_embeddings, dim=1).cpu()
                      if with_embeddings else None)
        masks = instances.pred_masks.cpu() if instances.has("pred_masks") else None
        return Detections(
            boxes=instances.pred_boxes.tensor.cpu(), scores=instances.scores.cpu(),
            class_ids=class_ids, labels=[self._vocabulary[i] for i in class_ids.tolist()],
            image_size=instances.image_size, embeddings=embeddings, masks=masks)

    @torch.no_grad()
    def embed_regions(self, image: ImageInput, boxes) -> torch.Tensor:
        """[N, D] unit-norm region embeddings of ``boxes`` ([N, 4] xyxy, original pixels):
        the regional analogue of CLIP's ``encode_image``, comparable with :meth:`embed_text`."""
        inputs, regions = self._prepare(image, boxes)
        return F.normalize(self.model.embed_regions([inputs], [regions]), dim=1).cpu()


def _log_spec(spec, device: str) -> None:
    if spec.rpn is None:
        rpn = "none (regions must be given)"
    else:
        rpn = spec.rpn_weights or "stored in the checkpoint"
    logger.info("Loading %s on %s: CLIP %s, config %s, offline RPN %s, text tower %s",
                spec.weights, device, spec.variant, spec.config, rpn,
                spec.text_weights or "none")


def _rgb_array(image: ImageInput) -> np.ndarray:
    """uint8 [H, W, 3] RGB. Files are decoded upright (EXIF applied); greyscale arrays
    ([H, W] or [H, W, 1]) are repeated to 3 channels and RGBA arrays lose their alpha."""
    if isinstance(image, (str, os.PathLike)):
        return read_image(image, "RGB")
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    if not isinstance(image, np.ndarray):
        raise TypeError(f"unsupported image type {type(image).__name__}: give {_ACCEPTED}")
    if image.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8 (0-255), got {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4) or min(image.shape[:2]) == 0:
        raise ValueError(f"image arrays must be [H, W, 3] RGB (or [H, W] grey, [H, W, 4] "
                         f"RGBA), got shape {list(image.shape)}")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])


def _box_array(boxes) -> np.ndarray:
    """[N, 4] float64 xyxy boxes with x1 > x0 and y1 > y0; ValueError naming a bad box."""
    array = np.asarray(boxes, dtype=np.float64)
    if array.size == 0:
        return array.reshape(0, 4)
    if array.ndim == 1 and array.shape[0] == 4:
        array = array[None]
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"boxes must be [N, 4] (x0, y0, x1, y1), got shape {list(array.shape)}")
    for index, box in enumerate(array):
        if not np.isfinite(box).all() or box[2] <= box[0] or box[3] <= box[1]:
            raise ValueError(f"box {index} {box.tolist()} is not a valid x0, y0, x1, y1 box "
                             "(needs x1 > x0 and y1 > y0)")
    return array


def _map_boxes(boxes, transform, resized_size: Tuple[int, int],
               original_size: Tuple[int, int]) -> np.ndarray:
    """Boxes in original pixels -> [N, 4] in the resized input, clipped to the image;
    ValueError for a box that lies outside the image."""
    array = _box_array(boxes)
    height, width = original_size
    clipped = array.copy()
    clipped[:, 0::2] = clipped[:, 0::2].clip(0, width)
    clipped[:, 1::2] = clipped[:, 1::2].clip(0, height)
    outside = (clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])
    if outside.any():
        index = int(outside.nonzero()[0][0])
        raise ValueError(f"box {index} {array[index].tolist()} lies outside the "
                         f"{width}x{height} image")
    return transform_boxes_xyxy(transform, clipped, resized_size)
