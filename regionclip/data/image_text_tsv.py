"""The original's image-caption form: TSV pairs (reference 5.1).

``*image*.tsv`` rows ``key<TAB>base64`` next to ``*text*.tsv`` rows ``key<TAB>JSON or raw
caption``, random access through ``.lineidx`` files (one byte offset per row).
"""
import base64
import binascii
import json
import logging
import os
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..atomic import atomic_open
from ..prompts import PROMPT_TEMPLATES, prompt_engineering
from .image_text_sources import MAX_CAPTIONS, RawSample, clean_captions, scan_line_offsets

logger = logging.getLogger(__name__)

MAX_TSV_FILES = 20  # the original's cap on image TSVs read from one folder
# Image-TSV name part -> text-TSV name part, tried in this order as the original did.
TSV_NAME_PAIRS = (("images", "text"), ("image", "text"), ("img", "caption"))


def parse_text_field(text: str, rng, max_captions: int = MAX_CAPTIONS) -> List[str]:
    """The text column of a text TSV -> captions, as the original's ``_decode_text``.

    A JSON object may hold ``"captions"`` (list or string) and/or ``"tags"`` (space-separated
    words); one of the present keys is drawn at random. Captions keep the first
    ``max_captions``; tags are shuffled and put into a random prompt template. Any other text
    (not JSON, or JSON that is not an object) is one raw caption.
    """
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        return clean_captions(text, max_captions)
    present = [k for k in ("captions", "tags") if k in value]
    if not present:
        return []
    if rng.choice(present) == "captions":
        return clean_captions(value["captions"], max_captions)
    words = str(value["tags"]).split(" ")
    rng.shuffle(words)
    return clean_captions(prompt_engineering(" ".join(words), rng.choice(PROMPT_TEMPLATES)))


def lineidx_path(tsv_path: str) -> str:
    return os.path.splitext(tsv_path)[0] + ".lineidx"


def generate_lineidx(tsv_path: str) -> np.ndarray:
    """Write ``tsv_path``'s ``.lineidx`` (one byte offset per row) and return the offsets.

    Written to a temporary file and renamed, so concurrent processes never read a partial
    index. A read-only folder only costs a warning: the offsets are used from memory.
    """
    offsets = scan_line_offsets(tsv_path)
    target = lineidx_path(tsv_path)
    try:
        with atomic_open(target, "w") as f:
            f.write("".join(f"{offset}\n" for offset in offsets))
    except OSError as error:
        logger.warning("Cannot write %s (%s); keeping the row offsets in memory", target, error)
    return offsets


def load_lineidx(tsv_path: str, checked_rows: int = 16) -> np.ndarray:
    """The row offsets of ``tsv_path`` from its ``.lineidx`` (generated when missing). An index
    of another file (the TSV rewritten since) is refused: ``checked_rows`` offsets spread over
    the file, the last included, must each start a line."""
    path = lineidx_path(tsv_path)
    if not os.path.isfile(path):
        logger.info("Generating the missing %s", path)
        return generate_lineidx(tsv_path)
    with open(path) as f:
        offsets = np.asarray(f.read().split(), dtype=np.int64)
    picked = np.unique(np.linspace(0, len(offsets) - 1, min(checked_rows, len(offsets))).round())
    bad = _not_line_starts(tsv_path, [int(offsets[int(i)]) for i in picked])
    if bad:
        raise ValueError(f"{path} does not belong to {tsv_path} (offset {bad[0]} is not the "
                         "start of a line); delete it to have it regenerated")
    return offsets


def _not_line_starts(tsv_path: str, offsets: List[int]) -> List[int]:
    """The ``offsets`` at which no line of ``tsv_path`` starts."""
    size, bad = os.path.getsize(tsv_path), []
    with open(tsv_path, "rb") as f:
        for offset in offsets:
            f.seek(max(offset - 1, 0))
            if offset >= size or (offset > 0 and f.read(1) != b"\n"):
                bad.append(offset)
    return bad


class TSVFile:
    """Random access to the rows of one TSV file through its row offsets."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"TSV file not found: {path}")
        self.path = path
        self.offsets = load_lineidx(path)
        self._file, self._pid = None, None

    def __len__(self) -> int:
        return len(self.offsets)

    def __getstate__(self):
        # Open files do not pickle (spawned DataLoader workers); each process opens its own.
        return {**self.__dict__, "_file": None, "_pid": None}

    def row(self, index: int) -> List[str]:
        # A handle inherited through fork shares its offset with the parent: reopen per process.
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = open(self.path, "rb"), os.getpid()
        self._file.seek(int(self.offsets[index]))
        line = self._file.readline().decode("utf-8", errors="replace")
        return line.rstrip("\r\n").split("\t")


def _text_tsv_name(name: str) -> Optional[str]:
    """The original's rule, kept so that its folders read unchanged: any ``.tsv`` whose name
    contains an image word is an image TSV ("imagenet_text.tsv" too)."""
    if not name.endswith(".tsv"):
        return None
    for image_part, text_part in TSV_NAME_PAIRS:
        if image_part in name:
            return name.replace(image_part, text_part)
    return None


def find_tsv_pairs(path: str, max_files: int = MAX_TSV_FILES) -> List[Tuple[str, str]]:
    """(image TSV, text TSV) pairs of a folder (sorted names, at most ``max_files``; 0 = all)
    or of one image TSV file."""
    if os.path.isdir(path):
        folder, names = path, sorted(os.listdir(path))
    elif os.path.isfile(path):
        folder, names = os.path.dirname(path), [os.path.basename(path)]
    else:
        raise FileNotFoundError(f"TSV dataset path not found: {path}")
    pairs = []
    for name in names:
        text_name = _text_tsv_name(name)
        if text_name is None:
            continue
        image_tsv, text_tsv = os.path.join(folder, name), os.path.join(folder, text_name)
        if not os.path.isfile(text_tsv):
            raise FileNotFoundError(f"image TSV {image_tsv} has no text TSV {text_tsv}")
        pairs.append((image_tsv, text_tsv))
    if not pairs:
        raise ValueError(f"no image TSV in {path}: expected *.tsv names containing 'images', "
                         "'image' or 'img', each next to its text TSV ('images'/'image' -> "
                         "'text', 'img' -> 'caption')")
    if max_files and len(pairs) > max_files:
        logger.warning("Reading the first %d of %d image TSVs in %s (max_files)", max_files,
                       len(pairs), path)
        pairs = pairs[:max_files]
    return pairs


def _decode_base64(text: str) -> Optional[bytes]:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


class TSVPairSource:
    """Image/text TSV pairs of a folder (or one image TSV); item i = row i of the pairs in
    order."""

    indexed = True

    def __init__(self, path: str, max_files: int = MAX_TSV_FILES,
                 max_captions: int = MAX_CAPTIONS):
        self.path, self.max_captions = path, max_captions
        self.files = [(TSVFile(i), TSVFile(t)) for i, t in find_tsv_pairs(path, max_files)]
        for image_tsv, text_tsv in self.files:
            if len(image_tsv) != len(text_tsv):
                raise ValueError(f"{image_tsv.path} has {len(image_tsv)} rows but "
                                 f"{text_tsv.path} has {len(text_tsv)}")
        self._ends = np.cumsum([len(image_tsv) for image_tsv, _ in self.files])
        if self._ends[-1] == 0:
            raise ValueError(f"the TSV files of {path} hold no rows")

    def __len__(self) -> int:
        return int(self._ends[-1])

    def read(self, index: int, rng) -> RawSample:
        file_index = int(np.searchsorted(self._ends, index, side="right"))
        row = index - (int(self._ends[file_index - 1]) if file_index else 0)
        image_tsv, text_tsv = self.files[file_index]
        image_row, text_row = image_tsv.row(row), text_tsv.row(row)
        if image_row[0] != text_row[0]:
            raise ValueError(f"TSV keys differ on line {row + 1}: {image_tsv.path} has "
                             f"{image_row[0]!r}, {text_tsv.path} has {text_row[0]!r}")
        image = _decode_base64(image_row[1]) if len(image_row) > 1 else None
        captions = parse_text_field("\t".join(text_row[1:]), rng, self.max_captions)
        return RawSample(image_row[0], image, captions)

    def iter_captions(self) -> Iterator[List[str]]:
        return iter_tsv_texts([text_tsv.path for _, text_tsv in self.files])


def iter_tsv_texts(text_tsvs: Sequence[str]) -> Iterator[List[str]]:
    """Per row of the text TSVs: all captions and the tags string, unsampled (for counting)."""
    for path in text_tsvs:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in filter(str.strip, f):
                text = line.rstrip("\r\n").split("\t", 1)[-1]
                try:
                    value = json.loads(text)
                except ValueError:
                    value = None
                if not isinstance(value, dict):
                    yield clean_captions(text, None)
                    continue
                tags = [value["tags"]] if isinstance(value.get("tags"), str) else []
                yield clean_captions(value.get("captions", []), None) + clean_captions(tags)
