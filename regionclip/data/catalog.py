"""Dataset catalog: dataset name -> records and metadata.

Built-in names (paths relative to ``$DETECTRON2_DATASETS``, default ``./datasets``):

- ``coco_2017_{train,val}``: COCO 2017 instances.
- ``coco_2017_ovd_{all,b,t}_{train,test}``: the open-vocabulary splits (65 / 48 base /
  17 novel classes; build them with ``tools/prepare_coco_ovd.py``).
- ``lvis_v1_{train,val,test_dev,test_challenge}``: LVIS v1; ``lvis_v1_train`` is reduced to
  the 866 base (frequent + common) classes, ``lvis_v1_{train,val}_fullysup`` are not.
- ``lvis_v1_{train,val}_custom_img``: every image of a folder (``INPUT_DIR``) with the LVIS
  vocabulary; results are written but not evaluated.
- Detic's OV-COCO names: ``coco_zeroshot_train_oriorder``, ``coco_generalized_zeroshot_val``
  (80-category jsons; ``tools/prepare_detic_coco.py``) and ``coco_caption_train_tags`` (image
  labels and captions, see ``regionclip.data.image_labels``).

A COCO-format dataset of your own needs no code: name it
``coco_json:<path/to/annotations.json>:<path/to/image_dir>`` (paths as given, not under the
root), or call ``register_coco_json(name, json_file, image_root)`` once before use. When every
category of such a json has ``"split": "seen"`` or ``"unseen"`` (OVR-CNN's OV-COCO files, the toy
world), the evaluator also reports AP50 over the novel, base and all classes. Image-labelled data
in Detic's format is named ``image_labels:<path/to/labels.json>:<path/to/image_dir>``.
"""

import dataclasses
import functools
import os
from dataclasses import dataclass

from regionclip.data import coco_ovd
from regionclip.data.coco import (
    LVIS_RARE,
    load_coco_json,
    load_image_folder,
    load_lvis_json,
    lvis_base_categories,
    read_categories,
)
from regionclip.data.image_labels import load_image_label_json
from regionclip.download_pages import missing_file_message

DATASETS_ENV = "DETECTRON2_DATASETS"
DEFAULT_ROOT = "datasets"
DEFAULT_CUSTOM_IMAGE_DIR = os.path.join("datasets", "custom_images")
COCO_JSON_PREFIX = "coco_json:"
IMAGE_LABELS_PREFIX = "image_labels:"
# The original caps ground-truth boxes per LVIS image (GT-box inference memory).
LVIS_MAX_ANNOTATIONS = 500
_README_HINT = "see datasets/README.md for the expected layout"
# A COCO json category's "split" in OVR-CNN's open-vocabulary files: base / novel.
OVD_SPLIT_VALUES = ("seen", "unseen")


@dataclass(frozen=True)
class DatasetSpec:
    """How to read one dataset. Relative paths are under the dataset root."""

    image_root: str
    json_file: str
    format: str  # "coco", "lvis", "image_folder" or "image_labels"
    evaluator_type: str  # "coco", "lvis" or "" (no evaluator)
    evaluate: bool = True  # False: results json only (no ground truth to compare with)
    lvis_base_only: bool = False
    drop_empty_images: bool = False  # training only: images without boxes teach nothing
    max_annotations: int = 0
    ovd_split: bool = False  # categories are COCO ids of the OVD novel/base split


def _coco_specs():
    specs = {
        f"coco_2017_{split}": DatasetSpec(
            f"coco/{split}2017", f"coco/annotations/instances_{split}2017.json", "coco", "coco"
        )
        for split in ("train", "val")
    }
    for image_set, ovd_name in coco_ovd.IMAGE_SETS.items():
        for split in coco_ovd.SPLIT_IDS:
            json_file = f"coco/annotations/{coco_ovd.ovd_json_name(image_set, split)}"
            specs[f"coco_2017_ovd_{split}_{ovd_name}"] = DatasetSpec(
                f"coco/{image_set}", json_file, "coco", "coco", ovd_split=True
            )
    return specs


def _lvis_specs():
    """LVIS v1 entries.

    Unlike the original, evaluation splits keep images without annotations: LVISEval scores
    every image of the ground-truth json, and an image without boxes can still list negative
    categories on which false positives count, so skipping inference there would overstate
    AP. The original's reordering by annotation count is not reproduced (it changes no
    metric); its cap of 500 boxes per image is, on every split as there (it was meant for
    ground-truth-box inference, where each box is a region to embed, but also trims training
    images).
    """
    json_files = {
        "train": "lvis/lvis_v1_train.json",
        "val": "lvis/lvis_v1_val.json",
        "test_dev": "lvis/lvis_v1_image_info_test_dev.json",
        "test_challenge": "lvis/lvis_v1_image_info_test_challenge.json",
    }
    cap = LVIS_MAX_ANNOTATIONS
    specs = {
        f"lvis_v1_{split}": DatasetSpec(
            "coco", json_file, "lvis", "lvis", evaluate=split == "val", max_annotations=cap
        )
        for split, json_file in json_files.items()
    }
    specs["lvis_v1_train"] = DatasetSpec(
        "coco", json_files["train"], "lvis", "lvis", lvis_base_only=True,
        drop_empty_images=True, max_annotations=cap,
    )
    for split in ("train", "val"):
        specs[f"lvis_v1_{split}_fullysup"] = DatasetSpec(
            "coco", json_files[split], "lvis", "lvis", drop_empty_images=split == "train",
            max_annotations=cap,
        )
        # The json only supplies the 1203-class vocabulary; images come from INPUT_DIR.
        specs[f"lvis_v1_{split}_custom_img"] = DatasetSpec(
            "", json_files[split], "image_folder", "lvis", evaluate=False
        )
    return specs


def _detic_specs():
    """Detic's OV-COCO datasets (its ``coco_zeroshot.py`` names and paths)."""
    folder = "coco/zero-shot"
    return {
        "coco_zeroshot_train_oriorder": DatasetSpec(
            "coco/train2017", f"{folder}/instances_train2017_seen_2_oriorder.json", "coco",
            "coco", ovd_split=True),
        "coco_generalized_zeroshot_val": DatasetSpec(
            "coco/val2017", f"{folder}/instances_val2017_all_2_oriorder.json", "coco", "coco",
            ovd_split=True),
        "coco_caption_train_tags": DatasetSpec(
            "coco/train2017", "coco/annotations/captions_train2017_tags_allcaps.json",
            "image_labels", "", evaluate=False),
    }


_BUILTIN = {**_coco_specs(), **_lvis_specs(), **_detic_specs()}
_REGISTERED = {}


def register_coco_json(name, json_file, image_root, evaluator_type="coco"):
    """Make a COCO-format dataset available under ``name`` (relative paths: from the cwd)."""
    if name in _BUILTIN or name in _REGISTERED:
        raise ValueError(f"dataset name {name!r} is already in use")
    _REGISTERED[name] = DatasetSpec(
        os.path.abspath(image_root), os.path.abspath(json_file), "coco", evaluator_type
    )


def list_datasets():
    """Names of the built-in and registered datasets."""
    return sorted(_BUILTIN) + sorted(_REGISTERED)


def is_builtin(name):
    """Whether ``name`` is a built-in dataset (its files are under :func:`dataset_root`)."""
    return name in _BUILTIN


def dataset_root():
    """Root folder of the built-in datasets (``$DETECTRON2_DATASETS``, default ``datasets``)."""
    return os.path.expanduser(os.environ.get(DATASETS_ENV, DEFAULT_ROOT))


def get_spec(name):
    """The ``DatasetSpec`` of ``name`` with absolute or root-joined paths."""
    if name.startswith(COCO_JSON_PREFIX):
        return _parse_json_name(name, COCO_JSON_PREFIX, "coco", "coco")
    if name.startswith(IMAGE_LABELS_PREFIX):
        return _parse_json_name(name, IMAGE_LABELS_PREFIX, "image_labels", "")
    spec = _REGISTERED.get(name)
    if spec is not None:
        return spec
    if name not in _BUILTIN:
        raise ValueError(
            f"unknown dataset {name!r}; valid names: {', '.join(list_datasets())}, "
            f"'{COCO_JSON_PREFIX}<json_file>:<image_dir>' or "
            f"'{IMAGE_LABELS_PREFIX}<json_file>:<image_dir>'"
        )
    spec = _BUILTIN[name]
    root = dataset_root()
    image_root = os.path.join(root, spec.image_root) if spec.image_root else ""
    return dataclasses.replace(
        spec, image_root=image_root, json_file=os.path.join(root, spec.json_file)
    )


def _parse_json_name(name, prefix, data_format, evaluator_type):
    parts = name[len(prefix):].split(":")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"expected '{prefix}<json_file>:<image_dir>', got {name!r}")
    return DatasetSpec(parts[1], parts[0], data_format, evaluator_type,
                       evaluate=bool(evaluator_type))


def _require_json(name, spec):
    if not os.path.isfile(spec.json_file):
        message = missing_file_message(spec.json_file, f"annotation file of dataset {name!r}")
        if is_builtin(name):
            message += f"; dataset root {dataset_root()!r} (set with ${DATASETS_ENV})"
        raise FileNotFoundError(message)


def get_dataset_dicts(name, input_dir=None, check_files=True):
    """Record dicts of dataset ``name`` (see ``regionclip.data.coco`` for their fields).

    ``input_dir`` is the image folder of the ``*_custom_img`` datasets (cfg ``INPUT_DIR``,
    default ``./datasets/custom_images``). With ``check_files`` a missing image file is an
    error now rather than hours into an evaluation.
    """
    spec = get_spec(name)
    if spec.format == "image_folder":
        return load_image_folder(input_dir or DEFAULT_CUSTOM_IMAGE_DIR)
    _require_json(name, spec)
    if spec.format == "lvis":
        records = load_lvis_json(
            spec.json_file, spec.image_root, spec.lvis_base_only, spec.max_annotations
        )
    elif spec.format == "image_labels":
        records = load_image_label_json(spec.json_file, spec.image_root)
    else:
        records = load_coco_json(spec.json_file, spec.image_root)
    if spec.drop_empty_images:
        records = [record for record in records if record["annotations"]]
    if check_files:
        check_image_files(records)
    return records


def check_image_files(records):
    """Raise FileNotFoundError naming missing image files of ``records``."""
    missing = [r["file_name"] for r in records if not os.path.isfile(r["file_name"])]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(records)} image files are missing, e.g. "
            f"{', '.join(missing[:3])}; {_README_HINT}"
        )


@dataclass(frozen=True)
class Metadata:
    """What a model, evaluator or visualiser needs to know about a dataset's classes.

    Contiguous class index ``k`` (the model's output) is dataset category id
    ``thing_dataset_ids[k]``.
    """

    name: str
    thing_classes: tuple
    thing_dataset_ids: tuple
    evaluator_type: str
    evaluate: bool
    json_file: str
    image_root: str
    class_frequencies: tuple = ()  # LVIS "r"/"c"/"f" per contiguous index
    novel_dataset_ids: frozenset = frozenset()
    base_dataset_ids: frozenset = frozenset()

    @property
    def thing_dataset_id_to_contiguous_id(self):
        return {cat_id: index for index, cat_id in enumerate(self.thing_dataset_ids)}

    @property
    def contiguous_id_to_dataset_id(self):
        return dict(enumerate(self.thing_dataset_ids))

    def frequency_groups(self):
        """LVIS frequency -> contiguous indices (empty for non-LVIS datasets)."""
        groups = {"r": [], "c": [], "f": []}
        for index, frequency in enumerate(self.class_frequencies):
            groups[frequency].append(index)
        return groups if self.class_frequencies else {}


def get_metadata(name):
    """``Metadata`` of dataset ``name``, read from its json (cached while the file is unchanged)."""
    spec = get_spec(name)
    _require_json(name, spec)
    return _read_metadata(name, spec, os.stat(spec.json_file).st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _read_metadata(name, spec, json_mtime):
    categories = read_categories(spec.json_file)
    fields = {}
    if spec.format in ("lvis", "image_folder"):
        fields = _lvis_fields(categories)
        if spec.lvis_base_only:
            categories = lvis_base_categories(categories)
            fields["class_frequencies"] = tuple(cat["frequency"] for cat in categories)
        names = tuple(cat["synonyms"][0] for cat in categories)
    else:
        names = tuple(cat["name"] for cat in categories)
    ids = tuple(cat["id"] for cat in categories)
    if spec.ovd_split:
        fields["novel_dataset_ids"] = frozenset(ids) & coco_ovd.NOVEL_IDS
        fields["base_dataset_ids"] = frozenset(ids) & coco_ovd.BASE_IDS
    elif spec.format == "coco":
        fields.update(_json_split_fields(categories))
    return Metadata(
        name, names, ids, spec.evaluator_type, spec.evaluate, spec.json_file, spec.image_root,
        **fields,
    )


def _json_split_fields(categories):
    """Novel/base ids from the categories' ``"split"`` ("unseen" / "seen"), as OVR-CNN's OV-COCO
    json files and the toy world mark them; nothing when any category lacks one."""
    splits = [cat.get("split") for cat in categories]
    if not categories or not all(split in OVD_SPLIT_VALUES for split in splits):
        return {}
    return {
        "novel_dataset_ids": frozenset(c["id"] for c in categories if c["split"] == "unseen"),
        "base_dataset_ids": frozenset(c["id"] for c in categories if c["split"] == "seen"),
    }


def _lvis_fields(categories):
    rare = frozenset(cat["id"] for cat in categories if cat["frequency"] == LVIS_RARE)
    return {
        "class_frequencies": tuple(cat["frequency"] for cat in categories),
        "novel_dataset_ids": rare,
        "base_dataset_ids": frozenset(cat["id"] for cat in categories) - rare,
    }
