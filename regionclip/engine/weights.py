"""Weights into models: the one place that decides what is loaded from which file.

- :func:`load_weights` (``tools/train_net.py`` and the other tools): ``MODEL.WEIGHTS``, then
  the offline RPN file ``MODEL.CLIP.BB_RPN_WEIGHTS``, as the original did.
- :func:`resolve_spec` / :func:`spec_config` / :func:`load_model` (the Python API and the
  ``regionclip`` command): a checkpoint file alone implies its config, offline RPN and text
  tower, from its record in :mod:`regionclip.model_zoo` or from what the file holds; explicit
  arguments win.
- :func:`load_text_encoder`: the text tower stored in a pretrained or OpenAI CLIP file.
"""
import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
from torch import nn

from ..checkpoint import DETECTRON2, VOCABULARY_KEYS, CheckpointError, LoadReport, load_checkpoint
from ..config import load_config
from ..config.variants import CLIPVariant
from ..download_pages import missing_file_message
from ..model_zoo import (
    DETECTOR_WEIGHTS,
    RPN_WEIGHTS,
    VARIANT_CONFIGS,
    ZERO_SHOT_CONFIG,
    CheckpointContents,
    DetectorWeights,
    RPNWeights,
    config_path,
    find_companion,
    inspect_checkpoint,
    rpn_for_layout,
)
from ..modeling.build import build_model
from ..modeling.detic.zero_shot_classifier import ZS_WEIGHT_KEY
from ..modeling.region_head import missing_by_design
from ..modeling.text_encoder import TextEncoder

_OFFLINE_PARTS = ("offline_backbone.", "offline_proposal_generator.")


def load_weights(cfg, model: nn.Module, skip_vocabulary: bool = False,
                 training: bool = False) -> List[LoadReport]:
    """``MODEL.WEIGHTS``, then (with RPN proposals) ``MODEL.CLIP.BB_RPN_WEIGHTS``.

    Class embeddings stored in a checkpoint are not loaded where ``MODEL.CLIP.TEXT_EMB_PATH``
    / ``OPENSET_TEST_TEXT_EMB_PATH`` name a file (the original let a same-sized checkpoint
    tensor win silently), nor at all with ``skip_vocabulary``. Weights the model does not need
    from ``MODEL.WEIGHTS`` (``training``: it is trained next) are logged as missing by design.
    """
    clip = cfg.MODEL.CLIP
    protected = VOCABULARY_KEYS if skip_vocabulary else [
        key for key, path in zip(VOCABULARY_KEYS, (clip.TEXT_EMB_PATH,
                                                   clip.OPENSET_TEST_TEXT_EMB_PATH)) if path]
    if skip_vocabulary or cfg.MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH:  # Detic's classifier
        protected = [*protected, ZS_WEIGHT_KEY]
    rpn_file = clip.BB_RPN_WEIGHTS if clip.CROP_REGION_TYPE == "RPN" else ""
    by_design = missing_by_design(model, training)
    by_design.update({p.rstrip("."): f"loaded next from {rpn_file}"
                      for p in _OFFLINE_PARTS if rpn_file})
    reports = []
    if cfg.MODEL.WEIGHTS:
        reports.append(load_checkpoint(model, cfg.MODEL.WEIGHTS, skip_prefixes=protected,
                                       by_design=by_design))
    if cfg.MODEL.WITH_CAPTION and cfg.MODEL.CAPTION_TEXT_WEIGHTS:  # Detic: the text tower only
        parts = {key.split(".")[0] for key in model.state_dict()} - {"text_encoder"}
        reports.append(load_checkpoint(model, cfg.MODEL.CAPTION_TEXT_WEIGHTS,
                                       skip_prefixes=sorted(parts)))
    if rpn_file:
        reports.append(load_checkpoint(model, rpn_file, offline_rpn=True))
    return reports


def load_text_encoder(weights: str, variant: CLIPVariant) -> TextEncoder:
    """The text tower of ``weights`` (a pretrained RegionCLIP file or OpenAI CLIP weights)."""
    holder = nn.Module()
    holder.lang_encoder = TextEncoder(variant)
    report = load_checkpoint(holder, weights)
    if report.missing or report.mismatched:
        raise CheckpointError(
            f"{weights} holds no complete {variant.name} text tower (lang_encoder.*): "
            f"{len(report.missing)} tensors missing, {len(report.mismatched)} mismatched. "
            "Fine-tuned detectors do not carry one; use the pretrained RegionCLIP file or "
            "OpenAI's CLIP weights of the same variant (see MODEL_ZOO.md).")
    return holder.lang_encoder.eval()


# ---------------------------------------------------------------------------------------------
# A checkpoint file alone
# ---------------------------------------------------------------------------------------------
def existing_file(path: str, what: str) -> str:
    """``path`` if it is a file, else FileNotFoundError naming it and where to get it."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return path
    raise FileNotFoundError(missing_file_message(path, what))


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build and load a detector."""

    weights: str
    variant: str
    config: str  # YAML path
    rpn: Optional[RPNWeights]  # None: no offline RPN (regions must be given)
    rpn_weights: str  # "" with an RPN: its weights are in `weights` (offline_* keys)
    text_weights: str  # "" when no text tower is known
    overrides: tuple


def _rpn_spec(weights: str, rpn_weights: Optional[str], rpn_config: Optional[str],
              record: Optional[DetectorWeights], contents: CheckpointContents):
    """(RPNWeights or None, file to load it from or "")."""
    if rpn_weights:
        rpn_weights = existing_file(rpn_weights, "RPN checkpoint")
        rpn = RPN_WEIGHTS.get(os.path.basename(rpn_weights)) or \
            rpn_for_layout(inspect_checkpoint(rpn_weights).rpn_layout)
        if rpn is None and not rpn_config:
            raise ValueError(f"{rpn_weights} holds no RPN (rpn_head.*) of a known layout")
    elif contents.rpn_layout:  # as the original's zero-shot flow: the RPN in the checkpoint
        rpn, rpn_weights = rpn_for_layout(contents.rpn_layout), ""
    else:
        rpn_weights = find_companion(weights, record.rpn if record else "")
        rpn = RPN_WEIGHTS.get(record.rpn) if rpn_weights else None
        if rpn is None and rpn_config:
            raise ValueError(f"rpn_config {rpn_config} given, but {weights} holds no offline "
                             "RPN: pass rpn_weights as well")
    if rpn_config:
        rpn = RPNWeights(rpn.file_name if rpn else "", rpn_config, rpn.lsj if rpn else False)
    return rpn, rpn_weights or ""


def resolve_spec(weights: str, rpn_weights: Optional[str] = None, variant: Optional[str] = None,
                 config: Optional[str] = None, rpn_config: Optional[str] = None,
                 text_weights: Optional[str] = None, overrides: Sequence = ()) -> ModelSpec:
    """Fill in every unspecified choice from the record or the file's contents."""
    weights = existing_file(weights, "checkpoint")
    record = DETECTOR_WEIGHTS.get(os.path.basename(weights))
    contents = inspect_checkpoint(weights)
    if contents.format == DETECTRON2:
        raise ValueError(f"{weights} is a detectron2 RPN checkpoint; pass it as rpn_weights "
                         "together with a RegionCLIP checkpoint as weights")
    variant = variant or contents.variant or (record.variant if record else "")
    if not variant:
        raise ValueError(f"cannot tell the CLIP variant of {weights} from its tensors; pass "
                         "variant= (RN50, RN50x4, ...)")
    variant_config, variant_rpn_config = VARIANT_CONFIGS.get(variant, (None, None))
    if rpn_weights or contents.rpn_layout:
        rpn_config = rpn_config or variant_rpn_config
    rpn, rpn_file = _rpn_spec(weights, rpn_weights, rpn_config, record, contents)
    if text_weights:
        text_weights = existing_file(text_weights, "text-tower checkpoint")
    elif contents.has_text_tower:
        text_weights = weights
    else:
        text_weights = find_companion(weights, record.text_weights if record else "")
    # The official scripts' additions belong to the official config only.
    extra = tuple(record.overrides) if record and not config else ()
    config = config or (record.config if record else variant_config or ZERO_SHOT_CONFIG)
    return ModelSpec(weights, variant, config_path(config), rpn, rpn_file, text_weights,
                     extra + tuple(overrides))


def spec_config(spec: ModelSpec, device: str, score_threshold: Optional[float] = None,
                nms_threshold: Optional[float] = None, max_detections: Optional[int] = None,
                precision: Optional[str] = None):
    """The config of ``spec``: its YAML, then the derived choices, then the user's values."""
    opts = ["MODEL.CLIP.VARIANT", spec.variant, "MODEL.DEVICE", device,
            "MODEL.WEIGHTS", spec.weights, "MODEL.CLIP.BB_RPN_WEIGHTS", spec.rpn_weights,
            "MODEL.CLIP.TEXT_EMB_PATH", "", "MODEL.CLIP.OPENSET_TEST_TEXT_EMB_PATH", ""]
    if spec.rpn is not None:
        opts += ["MODEL.CLIP.CROP_REGION_TYPE", "RPN",
                 "MODEL.CLIP.OFFLINE_RPN_CONFIG", config_path(spec.rpn.config),
                 "MODEL.CLIP.OFFLINE_RPN_LSJ_PRETRAINED", spec.rpn.lsj]
    else:  # regions come from the caller, as the original's ground-truth-box mode
        opts += ["MODEL.CLIP.CROP_REGION_TYPE", "GT", "MODEL.CLIP.MULTIPLY_RPN_SCORE", False]
    opts = [str(v) for v in opts + list(spec.overrides)]
    # typed, not text: yacs would read the text "0" as an int and refuse it for a float key
    for key, value, kind in (("MODEL.ROI_HEADS.SCORE_THRESH_TEST", score_threshold, float),
                             ("MODEL.ROI_HEADS.NMS_THRESH_TEST", nms_threshold, float),
                             ("TEST.DETECTIONS_PER_IMAGE", max_detections, int),
                             ("MODEL.PRECISION", precision, str)):
        if value is not None:
            opts += [key, kind(value)]
    return load_config(spec.config, opts)


def _check_loaded(report: LoadReport, parts: Sequence[str], what: str, hint: str) -> None:
    bad = [k for k in report.missing if k.startswith(tuple(parts))]
    bad += [k for k, _, _ in report.mismatched if k.startswith(tuple(parts))]
    if bad:
        raise CheckpointError(f"{report.path} does not fill the {what}: {len(bad)} tensors "
                              f"missing or of another shape (e.g. {bad[0]}); {hint}")


def load_model(spec: ModelSpec, cfg,
               step: Optional[Callable[[str], None]] = None) -> torch.nn.Module:
    """Build the detector of ``cfg`` (:func:`spec_config`) and load its weights (eval mode).

    Stored class embeddings are not loaded: the vocabulary is always set by the caller.
    ``step(text)`` is told as each of the two steps starts (a progress display).
    """
    step = step or (lambda text: None)
    step(f"building the {spec.variant} detector")
    model = build_model(cfg)
    step("loading its weights")
    reports = load_weights(cfg, model, skip_vocabulary=True)
    _check_loaded(reports[0], ("backbone.",), "CLIP image trunk", "use a RegionCLIP checkpoint")
    if spec.rpn is not None:
        _check_loaded(reports[-1], _OFFLINE_PARTS, f"offline RPN built from {spec.rpn.config}",
                      "pass the matching rpn_config (and rpn_weights)")
    return model.eval()
