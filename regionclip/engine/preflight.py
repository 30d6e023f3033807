"""Preflight: every input a run names is checked before anything heavy is loaded.

Without it a missing file is found only when its loader runs, one per run and often minutes
in: the class embeddings, then the checkpoint, then the annotation json, then the image folder.
:func:`config_inputs` lists what a ``tools/train_net.py`` config reads (under the same
conditions as the builders and loaders that read it); the ``regionclip`` command lists its
arguments. :func:`check_inputs` reports every missing one at once, each with its purpose and
where to get it (:func:`regionclip.download_pages.missing_file_message`).
"""
import os
from dataclasses import dataclass
from typing import Iterable, List

from ..config import base_files
from ..data.catalog import DATASETS_ENV, dataset_root, get_spec, is_builtin
from ..download_pages import missing_file_message

__all__ = ["FOLDER", "Input", "MissingInputsError", "check_inputs", "config_inputs",
           "dataset_inputs", "model_inputs"]

FILE, FOLDER, ANY = "file", "folder", "file or folder"
_PATTERN_CHARS = set("*?[{")  # a shard pattern, not a path: its reader resolves it


@dataclass(frozen=True)
class Input:
    path: str
    purpose: str  # what it is, with the key or option naming it
    kind: str = FILE

    def exists(self) -> bool:
        check = {FILE: os.path.isfile, FOLDER: os.path.isdir, ANY: os.path.exists}[self.kind]
        return check(self.path)


class MissingInputsError(FileNotFoundError):
    """Several inputs are missing: a summary line, then one line per input."""


def check_inputs(inputs: Iterable[Input]) -> None:
    """FileNotFoundError naming every missing input (one line for one, a list for several);
    an input named twice (two keys, one file) is reported once with both purposes."""
    purposes = {}
    for item in inputs:
        if item.path and not any(c in item.path for c in _PATTERN_CHARS) and not item.exists():
            purposes.setdefault(item.path, []).append(item.purpose)
    lines = [missing_file_message(path, " and ".join(dict.fromkeys(what)))
             for path, what in purposes.items()]
    if len(lines) == 1:
        raise FileNotFoundError(lines[0])
    if lines:
        raise MissingInputsError("\n".join(
            [f"{len(lines)} inputs are missing (nothing was loaded or written):"] +
            [f"  - {line}" for line in lines]))


def config_inputs(cfg, training: bool, weights: bool = True) -> List[Input]:
    """The files and folders ``cfg`` names that a run reads: the model's (``weights``: also
    the checkpoints of ``load_weights``, which a resumed run does not read) and those of the
    datasets it tests on (and, ``training``, trains on)."""
    return [*model_inputs(cfg, weights), *_training_inputs(cfg, training),
            *dataset_inputs(cfg.DATASETS.TEST, cfg.INPUT_DIR)]


def model_inputs(cfg, weights: bool = True) -> List[Input]:
    """The checkpoints (``weights``), embedding files and RPN config the model of ``cfg``
    reads."""
    clip, box_head = cfg.MODEL.CLIP, cfg.MODEL.ROI_BOX_HEAD
    rpn = clip.CROP_REGION_TYPE == "RPN"  # the offline RPN is built and loaded only then
    inputs = []
    if weights:
        inputs += [
            Input(cfg.MODEL.WEIGHTS, "checkpoint (MODEL.WEIGHTS)"),
            Input(clip.BB_RPN_WEIGHTS if rpn else "",
                  "offline RPN checkpoint (MODEL.CLIP.BB_RPN_WEIGHTS)"),
            Input(cfg.MODEL.CAPTION_TEXT_WEIGHTS if cfg.MODEL.WITH_CAPTION else "",
                  "caption text tower (MODEL.CAPTION_TEXT_WEIGHTS)"),
        ]
    inputs += [
        Input(clip.OFFLINE_RPN_CONFIG if rpn else "",
              "offline RPN config (MODEL.CLIP.OFFLINE_RPN_CONFIG)"),
        *[Input(path, "_BASE_ of the offline RPN config (MODEL.CLIP.OFFLINE_RPN_CONFIG)")
          for path in (base_files(clip.OFFLINE_RPN_CONFIG) if rpn else [])],
        Input(clip.TEXT_EMB_PATH, "class embeddings (MODEL.CLIP.TEXT_EMB_PATH)"),
        Input(clip.OPENSET_TEST_TEXT_EMB_PATH,
              "test class embeddings (MODEL.CLIP.OPENSET_TEST_TEXT_EMB_PATH)"),
        Input(clip.CONCEPT_POOL_EMB, "concept embeddings (MODEL.CLIP.CONCEPT_POOL_EMB)"),
        Input(clip.TEACHER_CONCEPT_POOL_EMB,
              "teacher concept embeddings (MODEL.CLIP.TEACHER_CONCEPT_POOL_EMB)"),
        Input(box_head.ZEROSHOT_WEIGHT_PATH,
              "class embeddings (MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH)"),
    ]
    if cfg.MODEL.RESET_CLS_TESTS:
        inputs += [Input(path, "test classifier (MODEL.TEST_CLASSIFIERS)")
                   for path in cfg.MODEL.TEST_CLASSIFIERS]
    return inputs


def _training_inputs(cfg, training: bool) -> List[Input]:
    if not training:
        return []
    box_head = cfg.MODEL.ROI_BOX_HEAD
    # Needed to train with IGNORE_ZERO_CATS unless MODEL.WEIGHTS carries the frequencies, which
    # "" declares (evaluation never needs them).
    inputs = [Input(box_head.CAT_FREQ_PATH if box_head.IGNORE_ZERO_CATS else "",
                    'class frequencies (MODEL.ROI_BOX_HEAD.CAT_FREQ_PATH; "" takes those '
                    "stored in MODEL.WEIGHTS)")]
    if cfg.DATASETS.PATH_TRAIN:  # image-caption pretraining data, not catalog names
        inputs += [Input(part, "image-text data (DATASETS.PATH_TRAIN)", ANY)
                   for path in cfg.DATASETS.PATH_TRAIN for part in path.split("+")]
        return inputs
    return inputs + dataset_inputs(cfg.DATASETS.TRAIN, cfg.INPUT_DIR)


def dataset_inputs(names: Iterable[str], input_dir: str) -> List[Input]:
    """Annotation json and image folder of catalog datasets (``input_dir``, the config's
    ``INPUT_DIR``, for image-folder datasets)."""
    inputs = []
    for name in names:
        spec = get_spec(name)
        of = f" of dataset {name!r}"
        under = f" (under {dataset_root()!r}, set with ${DATASETS_ENV})" if is_builtin(name) else ""
        if spec.format == "image_folder":  # its json gives only the class names
            inputs += [Input(input_dir, f"image folder (INPUT_DIR){of}", FOLDER),
                       Input(spec.json_file, f"class vocabulary json{of}{under}")]
        else:
            inputs += [Input(spec.json_file, f"annotation file{of}{under}"),
                       Input(spec.image_root, f"image folder{of}{under}", FOLDER)]
    return inputs
