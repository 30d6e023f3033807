"""Writing a toy world to disk in the formats the real datasets use.

Layout (``out`` is the world's folder)::

    world.json                  seed, sizes, categories with their split, file paths
    vocabulary.txt              candidate concept nouns: class names + other caption nouns
    detection/{train,val,test}/000001.jpg ...
    detection/train.json        COCO json: base categories and base boxes only (OV-COCO style)
    detection/{val,test}.json   COCO json: all categories, all boxes
    detection/train_all_categories.json   train.json listing all categories (Detic's training)
    pretrain/images/000001.jpg ...
    pretrain/captions.jsonl     {"file_name", "captions"} per line (``JsonlSource``)
    pretrain/image_labels.json  Detic's image labels: the classes each image's captions name
    web/images/000001.jpg ...   the teacher's corpus, same layout as ``pretrain``
    web/captions.jsonl

``pretrain`` stands for CC3M: scenes like the detection splits, for RegionCLIP pretraining.
``web`` stands for the corpus OpenAI CLIP was trained on (a different and far larger one than
CC3M): object-centric images of one or two large objects (:data:`WEB_SCENE`), captioned the
same way. It gives the from-scratch teacher what RegionCLIP assumes of CLIP, the names of
things seen in whole images, at a scale 2 CPU cores can train, while leaving it the gap the
paper targets: small objects among others, and image regions instead of whole images.

Categories carry ``"split": "seen"`` (base) or ``"unseen"`` (novel), as in OVR-CNN's OV-COCO
files, which is how the dataset catalog finds a COCO json's novel/base split. Novel objects are
drawn in training images like any other, only left unannotated. Every image has its own
random stream, seeded by (world seed, split, index): the output is a function of the seed and
the sizes. The world is written to a temporary folder that replaces ``out`` when complete.
"""
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from typing import Dict, List

import cv2
import numpy as np
from tqdm import tqdm

from ..data.image_labels import caption_image_labels
from .captions import captions
from .categories import CATEGORY_NAMES, NOVEL_NAMES, category_id
from .scene import Scene, SceneSpec, draw_scene

SPLITS = ("train", "val", "test")
_STREAMS = {"train": 1, "val": 2, "test": 3, "pretrain": 4, "web": 5}
JPEG_QUALITY = 92
WORLD_FILE = "world.json"
CAPTIONS_PER_IMAGE = 3
ALL_CATEGORIES_TRAIN = "detection/train_all_categories.json"
IMAGE_LABELS_FILE = "image_labels.json"
# Nouns of the captions that name no category (templates, backgrounds, fillers).
OTHER_NOUNS = ("picture", "illustration", "drawing", "photo", "icons", "art", "image",
               "book", "background", "wallpaper", "design", "element", "download", "quality")


@dataclass(frozen=True)
class WorldSizes:
    """Images per split; ``pretrain`` and ``web`` are numbers of image-caption pairs."""

    train: int = 1200
    val: int = 200
    test: int = 300
    pretrain: int = 4000
    web: int = 4000


# The teacher's corpus: iconic images, as much of the web's image-text data is.
WEB_SCENE = SceneSpec(min_side=128, max_side=192, min_objects=1, max_objects=2,
                      min_scale=0.35, max_scale=0.65, clutter=(0, 4))


def scene_rng(seed: int, stream: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _STREAMS[stream], index])


def category_dicts(names=CATEGORY_NAMES) -> List[Dict]:
    return [{"id": category_id(name), "name": name, "supercategory": "shape",
             "split": "unseen" if name in NOVEL_NAMES else "seen"} for name in names]


def _write_jpeg(path: str, image: np.ndarray) -> None:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError(f"could not encode {path}")
    with open(path, "wb") as f:
        f.write(data.tobytes())


def _annotations(scene: Scene, image_id: int, first_id: int, keep) -> List[Dict]:
    anns = []
    for obj in scene.objects:
        if obj.category in keep:
            anns.append({"id": first_id + len(anns), "image_id": image_id,
                         "category_id": category_id(obj.category), "bbox": list(obj.bbox),
                         "area": obj.area, "iscrowd": 0})
    return anns


def _write_detection_split(root: str, split: str, count: int, seed: int, spec: SceneSpec,
                           progress) -> None:
    """Images and COCO json of one split; train keeps base boxes and images holding one."""
    folder = os.path.join(root, "detection", split)
    os.makedirs(folder)
    keep = set(CATEGORY_NAMES) - set(NOVEL_NAMES) if split == "train" else set(CATEGORY_NAMES)
    images, annotations = [], []
    for index in range(count):
        scene = draw_scene(scene_rng(seed, split, index), spec)
        image_id = index + 1
        anns = _annotations(scene, image_id, len(annotations) + 1, keep)
        progress.update()
        if split == "train" and not anns:
            continue  # as OV-COCO's base split: only images with a base box
        file_name = f"{image_id:06d}.jpg"
        _write_jpeg(os.path.join(folder, file_name), scene.image)
        height, width = scene.image.shape[:2]
        images.append({"id": image_id, "file_name": file_name, "height": height,
                       "width": width})
        annotations.extend(anns)
    info = {"description": f"toy world, seed {seed}, {split}"}
    categories = category_dicts([n for n in CATEGORY_NAMES if n in keep])
    _write_json(os.path.join(root, "detection", f"{split}.json"),
                {"info": info, "images": images, "annotations": annotations,
                 "categories": categories})
    if split == "train":  # Detic trains one classifier over every class on base boxes
        _write_json(os.path.join(root, ALL_CATEGORIES_TRAIN),
                    {"info": info, "images": images, "annotations": annotations,
                     "categories": category_dicts()})


def _write_pairs(root: str, corpus: str, count: int, seed: int, spec: SceneSpec,
                 progress) -> None:
    """Image-caption pairs of ``corpus`` ("pretrain" or "web") in ``root/corpus``."""
    os.makedirs(os.path.join(root, corpus, "images"))
    entries, image_sizes = [], []
    for index in range(count):
        rng = scene_rng(seed, corpus, index)
        scene = draw_scene(rng, spec)
        file_name = f"images/{index + 1:06d}.jpg"
        _write_jpeg(os.path.join(root, corpus, file_name), scene.image)
        entries.append({"file_name": file_name,
                        "captions": captions(scene, rng, CAPTIONS_PER_IMAGE)})
        image_sizes.append(scene.image.shape[:2])
        progress.update()
    with open(os.path.join(root, corpus, "captions.jsonl"), "w") as f:
        f.writelines(json.dumps(entry) + "\n" for entry in entries)
    if corpus == "pretrain":  # Detic's image labels come from the CC3M stand-in's captions
        labels = caption_image_labels(_caption_json(entries, image_sizes), category_dicts())
        _write_json(os.path.join(root, corpus, IMAGE_LABELS_FILE), labels)


def _caption_json(entries: List[Dict], image_sizes) -> Dict:
    """The pairs as a COCO-captions json, the form Detic parses image labels from."""
    images = [{"id": i + 1, "file_name": entry["file_name"], "height": h, "width": w}
              for i, (entry, (h, w)) in enumerate(zip(entries, image_sizes))]
    texts = [{"image_id": i + 1, "caption": text}
             for i, entry in enumerate(entries) for text in entry["captions"]]
    return {"images": images, "annotations": texts}


def _write_json(path: str, data) -> None:
    with open(path, "w") as f:
        json.dump(data, f)


def write_world(out: str, seed: int = 0, sizes: WorldSizes = WorldSizes(),
                spec: SceneSpec = SceneSpec(), overwrite: bool = False,
                show_progress: bool = True) -> str:
    """Generate the world into folder ``out``; returns ``out``. ``spec`` shapes the detection
    and ``pretrain`` scenes; the ``web`` corpus always uses :data:`WEB_SCENE`.

    An existing ``out`` is an error unless ``overwrite``; it is replaced only once the new
    world is complete.
    """
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another --out or pass --overwrite")
    tmp = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.{uuid.uuid4().hex}.tmp")
    os.makedirs(tmp)
    total = sum(asdict(sizes).values())
    try:
        with tqdm(total=total, desc="toy world", unit="img", disable=not show_progress) as bar:
            for split in SPLITS:
                _write_detection_split(tmp, split, getattr(sizes, split), seed, spec, bar)
            _write_pairs(tmp, "pretrain", sizes.pretrain, seed, spec, bar)
            _write_pairs(tmp, "web", sizes.web, seed, WEB_SCENE, bar)
        with open(os.path.join(tmp, "vocabulary.txt"), "w") as f:
            f.writelines(f"{name}\n" for name in CATEGORY_NAMES + OTHER_NOUNS)
        _write_json(os.path.join(tmp, WORLD_FILE), _world_info(seed, sizes, spec))
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _world_info(seed: int, sizes: WorldSizes, spec: SceneSpec) -> Dict:
    return {
        "seed": seed, "sizes": asdict(sizes), "scene": asdict(spec),
        "web_scene": asdict(WEB_SCENE),
        "categories": category_dicts(),
        "files": {
            **{f"detection_{s}": [f"detection/{s}.json", f"detection/{s}"] for s in SPLITS},
            "detection_train_all_categories": [ALL_CATEGORIES_TRAIN, "detection/train"],
            "pretrain": "pretrain", "web": "web", "vocabulary": "vocabulary.txt",
            "pretrain_image_labels": [f"pretrain/{IMAGE_LABELS_FILE}", "pretrain"],
        },
    }
