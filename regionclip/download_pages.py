"""Where every file regionclip reads comes from, and the error that says so when one is missing.

Nothing is downloaded automatically. Official files are recognised by their names; each maps to
the page it is published on and the folder the original's command lines expect it in (paths
relative to the repository root). MODEL_ZOO.md, pretrained_ckpt/README.md and datasets/README.md
show the same table; this module has no dependencies so that any layer can use it.
"""
import os
import re
from dataclasses import dataclass
from typing import Optional

__all__ = ["COCO_PAGE", "LVIS_PAGE", "MODEL_ZOO_PAGE", "OPENAI_CLIP_PAGE", "SOURCES",
           "FileSource", "file_source", "missing_file_message"]

# The original's model zoo page links the Google Drive folder holding the official files, in
# sub-folders named like those of pretrained_ckpt/ (regionclip, concept_emb, rpn, clip).
MODEL_ZOO_PAGE = "https://github.com/microsoft/RegionCLIP/blob/main/docs/MODEL_ZOO.md"
COCO_PAGE = "https://cocodataset.org/#download"
LVIS_PAGE = "https://www.lvisdataset.org/dataset"
OPENAI_CLIP_PAGE = "https://github.com/openai/CLIP"  # download links in clip/clip.py
_OVD_COMMAND = "python tools/prepare_coco_ovd.py --coco-root datasets/coco"


@dataclass(frozen=True)
class FileSource:
    """Where the files whose name matches ``pattern`` come from."""

    pattern: str  # regular expression matched against the whole file name
    folder: str  # where the original's command lines expect it
    how: str  # how to get it, one clause


def _zoo(folder: str) -> str:
    return f"download it from the RegionCLIP model zoo, {MODEL_ZOO_PAGE} (Google Drive folder " \
           f"{folder}/)"


SOURCES = (
    FileSource(r"regionclip_(pretrained-cc|finetuned-(coco|lvis))_rn50(x4)?\.pth",
               "pretrained_ckpt/regionclip", _zoo("regionclip")),
    FileSource(r"rpn_(coco_(48|65|80)|lvis_866(_lsj)?|lvis_1203_clipbackbone)\.pth",
               "pretrained_ckpt/rpn", _zoo("rpn")),
    FileSource(r"(coco|lvis)_\d+_\w*emb\w*\.pth|(coco|googlecc)_nouns_\d+\w*\.(txt|pth)",
               "pretrained_ckpt/concept_emb", _zoo("concept_emb")),
    FileSource(r"teacher_RN50(x4)?_student_RN50(x4)?_OAI_CLIP\.pth", "pretrained_ckpt/clip",
               _zoo("clip")),
    FileSource(r"RN50(x4|x16|x64)?\.pt|RN101\.pt", "pretrained_ckpt/clip",
               f"download OpenAI's CLIP weights, {OPENAI_CLIP_PAGE} (links in clip/clip.py)"),
    FileSource(r"instances_(train|val)2017\.json", "datasets/coco/annotations",
               f"download the COCO 2017 train/val annotations, {COCO_PAGE}"),
    FileSource(r"(train|val)2017", "datasets/coco",
               f"download the COCO 2017 train/val images, {COCO_PAGE}"),
    FileSource(r"ovd_ins_(train|val)2017_(all|b|t)\.json", "datasets/coco/annotations",
               f"build it from the COCO 2017 instances files with {_OVD_COMMAND}"),
    FileSource(r"lvis_v1_(train|val|image_info_test_(dev|challenge))\.json", "datasets/lvis",
               f"download the LVIS v1 annotations, {LVIS_PAGE}"),
    # Not downloaded: the user's own inputs of the custom-image and custom-concept scripts.
    FileSource(r"custom_images", "datasets", "create it and put your own images in it"),
    FileSource(r"concepts\.txt", "datasets/custom_concepts",
               "write it yourself: one class name per line"),
)


def file_source(path) -> Optional[FileSource]:
    """The source of the official file ``path`` names (by its file name); None for others."""
    name = os.path.basename(os.path.normpath(os.fspath(path)))
    return next((s for s in SOURCES if re.fullmatch(s.pattern, name)), None)


def missing_file_message(path, purpose: str) -> str:
    """One line: ``purpose`` not found at ``path``, and where to get it if it is official."""
    path = os.fspath(path)
    source = file_source(path)
    if source is None:
        return (f"{purpose} not found: {path}; check the path (the official files and where to "
                "get them: MODEL_ZOO.md, datasets/README.md)")
    guide = "datasets/README.md" if source.folder.startswith("datasets") else "MODEL_ZOO.md"
    return (f"{purpose} not found: {path}; {source.how}; the documented commands expect it "
            f"in {source.folder}/ (see {guide})")
