"""Readers of image-caption pairs in three on-disk forms; no image decoding happens here.

* TSV pairs, the original's form (reference 5.1): ``*image*.tsv`` rows ``key<TAB>base64`` next
  to ``*text*.tsv`` rows ``key<TAB>JSON or raw caption``, random access through ``.lineidx``.
* webdataset tar shards as img2dataset writes them: ``{key}.jpg`` + ``{key}.txt`` (+ ``.json``).
* a folder of images with ``captions.jsonl``: ``{"file_name": ..., "captions": [...]}`` or
  ``"caption": ...`` per line, file names relative to the folder.

Every source yields ``RawSample(key, image, captions)``: ``image`` is encoded bytes, a file
path, or None when the stored bytes cannot be used; ``captions`` holds at most ``max_captions``
strings. TSV and jsonl sources are indexed (``read(i)``); tar sources are sharded
(``iter_shard``); the dataset splits work across processes by items or by shards accordingly.
"""
import base64
import binascii
import json
import logging
import os
import re
import tarfile
import zlib
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from ..atomic import atomic_open
from ..modeling.prompt_templates import PROMPT_TEMPLATES, prompt_engineering

logger = logging.getLogger(__name__)

MAX_CAPTIONS = 5
MAX_TSV_FILES = 20  # the original's cap on image TSVs read from one folder
CAPTIONS_JSONL = "captions.jsonl"
# Image-TSV name part -> text-TSV name part, tried in this order as the original did.
TSV_NAME_PAIRS = (("images", "text"), ("image", "text"), ("img", "caption"))
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
# webdataset's member naming: the key is the path up to the first dot of the file name.
_WDS_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
_BRACE = re.compile(r"\{([^{}]*)\}")
_BRACE_RANGE = re.compile(r"(\d+)\.\.(\d+)")


class RawSample(NamedTuple):
    key: str
    image: Union[bytes, str, None]
    captions: List[str]


class ShardReadError(OSError):
    """A tar shard is missing, truncated or not a tar file; the message names it."""


def clean_captions(values, max_captions: Optional[int] = MAX_CAPTIONS) -> List[str]:
    """A caption string or list -> the first ``max_captions`` (None: all) non-empty stripped
    strings."""
    values = [values] if isinstance(values, str) else values
    if not isinstance(values, (list, tuple)):
        return []
    captions = [v.strip() for v in values if isinstance(v, str) and v.strip()]
    return captions[:max_captions]


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


# ---------------------------------------------------------------------------------------------
# TSV pairs
# ---------------------------------------------------------------------------------------------
def lineidx_path(tsv_path: str) -> str:
    return os.path.splitext(tsv_path)[0] + ".lineidx"


def scan_line_offsets(path: str) -> np.ndarray:
    """Byte offset of every non-blank line of ``path``."""
    offsets, position = [], 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                offsets.append(position)
            position += len(line)
    return np.asarray(offsets, dtype=np.int64)


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


def load_lineidx(tsv_path: str) -> np.ndarray:
    path = lineidx_path(tsv_path)
    if not os.path.isfile(path):
        logger.info("Generating the missing %s", path)
        return generate_lineidx(tsv_path)
    with open(path) as f:
        offsets = np.asarray(f.read().split(), dtype=np.int64)
    if len(offsets) and offsets[-1] >= os.path.getsize(tsv_path):
        raise ValueError(f"{path} does not belong to {tsv_path} (offset {offsets[-1]} is past "
                         "its end); delete it to have it regenerated")
    return offsets


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


# ---------------------------------------------------------------------------------------------
# Folder of images + captions.jsonl
# ---------------------------------------------------------------------------------------------
def _jsonl_entry(line: str, path: str, line_number: int, max_captions: int):
    try:
        entry = json.loads(line)
        file_name = entry["file_name"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} line {line_number}: expected a JSON object with 'file_name' "
                         f"and 'captions' or 'caption' ({error!r})") from error
    captions = clean_captions(entry.get("captions", entry.get("caption")), max_captions)
    return str(entry.get("key", file_name)), file_name, captions


class JsonlSource:
    """Images of a folder described by its ``captions.jsonl`` (or by a given .jsonl file)."""

    indexed = True

    def __init__(self, path: str, max_captions: int = MAX_CAPTIONS):
        jsonl = os.path.join(path, CAPTIONS_JSONL) if os.path.isdir(path) else path
        if not os.path.isfile(jsonl):
            raise FileNotFoundError(f"captions file not found: {jsonl}")
        self.path, self.root, self.max_captions = jsonl, os.path.dirname(jsonl), max_captions
        # Only byte offsets stay in memory (8 bytes per image), but every line is checked now.
        self.offsets = scan_line_offsets(jsonl)
        if len(self.offsets) == 0:
            raise ValueError(f"{jsonl} lists no images")
        for number, line in enumerate(self._lines(), start=1):
            _jsonl_entry(line, jsonl, number, max_captions)

    def __len__(self) -> int:
        return len(self.offsets)

    def _lines(self) -> Iterator[str]:
        with open(self.path, encoding="utf-8") as f:
            yield from filter(str.strip, f)

    def _entry(self, index: int):
        with open(self.path, "rb") as f:
            f.seek(int(self.offsets[index]))
            line = f.readline().decode("utf-8")
        return _jsonl_entry(line, self.path, index + 1, self.max_captions)

    def read(self, index: int, rng) -> RawSample:
        key, file_name, captions = self._entry(index)
        return RawSample(key, os.path.join(self.root, file_name), captions)

    def iter_captions(self) -> Iterator[List[str]]:
        for number, line in enumerate(self._lines(), start=1):
            yield _jsonl_entry(line, self.path, number, None)[2]


# ---------------------------------------------------------------------------------------------
# webdataset tar shards (img2dataset)
# ---------------------------------------------------------------------------------------------
def expand_braces(pattern: str) -> List[str]:
    """``a/{00000..00002}.tar`` -> three paths (zero padding kept); ``{x,y}`` lists too."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[:match.start()], match.group(1), pattern[match.end():]
    numbers = _BRACE_RANGE.fullmatch(body)
    if numbers:
        first, last = numbers.groups()
        width = max(len(first), len(last)) if first.startswith("0") else 0
        choices = [str(i).zfill(width) for i in range(int(first), int(last) + 1)]
    else:
        choices = body.split(",")
    return [head + choice + rest for choice in choices for rest in expand_braces(tail)]


def _shard_candidates(spec: str) -> List[str]:
    if os.path.isdir(spec):
        names = sorted(n for n in os.listdir(spec) if n.endswith(TAR_SUFFIXES))
        return [os.path.join(spec, n) for n in names]
    if "{" in spec:
        return expand_braces(spec)
    if spec.endswith(".txt"):
        folder = os.path.dirname(spec)
        with open(spec, encoding="utf-8") as f:
            return [os.path.join(folder, line.strip()) for line in f if line.strip()]
    return [spec]


def expand_shards(spec: Union[str, Sequence[str]]) -> List[str]:
    """Shard paths from a folder (its tar files, sorted), a brace pattern, a list file (.txt,
    one path per line, relative to the list) or a single tar; a list mixes these. Missing
    shards are dropped with a warning (img2dataset leaves gaps where a whole shard failed)."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    candidates = [path for item in specs for path in _shard_candidates(item)]
    shards = [path for path in candidates if os.path.isfile(path)]
    if len(shards) < len(candidates):
        logger.warning("%d of the %d shards of %s do not exist", len(candidates) - len(shards),
                       len(candidates), spec)
    if not shards:
        raise FileNotFoundError(f"no tar shards found for {spec}")
    return shards


def iter_tar_samples(path: str, extensions: Optional[Sequence[str]] = None):
    """(key, {extension: bytes}) per sample of a tar, reading it as a stream. As in webdataset,
    a sample's members are consecutive and share the key; ``extensions`` limits what is read."""
    key, group = None, {}
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                match = _WDS_MEMBER.match(member.name) if member.isfile() else None
                if match is None:
                    continue
                member_key, extension = match.group(1), match.group(2).lower()
                if member_key != key:
                    if group:
                        yield key, group
                    key, group = member_key, {}
                if extensions is None or extension in extensions:
                    group[extension] = tar.extractfile(member).read()
    except (OSError, EOFError, tarfile.TarError, zlib.error) as error:
        raise ShardReadError(f"cannot read shard {path}: {error}") from error
    if group:
        yield key, group


def _wds_captions(group: dict, max_captions: int) -> List[str]:
    captions = []
    if "txt" in group:
        captions.append(group["txt"].decode("utf-8", errors="replace"))
    if "json" in group:
        try:
            caption = json.loads(group["json"]).get("caption")
        except (ValueError, AttributeError):
            caption = None
        # img2dataset repeats the .txt caption in the json: keep it once.
        if isinstance(caption, str) and caption.strip() not in [c.strip() for c in captions]:
            captions.append(caption)
    return clean_captions(captions, max_captions)


class WebDatasetSource:
    """webdataset tar shards: image from ``.jpg``/``.png``/..., captions from ``.txt`` and the
    ``"caption"`` of ``.json``."""

    indexed = False

    def __init__(self, spec: Union[str, Sequence[str]], max_captions: int = MAX_CAPTIONS):
        self.path, self.max_captions = spec, max_captions
        self.shards = expand_shards(spec)

    def iter_shard(self, shard_index: int, rng=None, part: int = 0,
                   num_parts: int = 1) -> Iterator[RawSample]:
        """Samples of one shard whose ordinal in it is ``part`` modulo ``num_parts``."""
        samples = iter_tar_samples(self.shards[shard_index])
        for ordinal, (key, group) in enumerate(samples):
            if ordinal % num_parts != part:
                continue
            image_ext = next((e for e in WDS_IMAGE_EXTENSIONS if e in group), None)
            image = group[image_ext] if image_ext else None
            yield RawSample(key, image, _wds_captions(group, self.max_captions))

    def iter_captions(self) -> Iterator[List[str]]:
        for shard in self.shards:
            for _, group in iter_tar_samples(shard, extensions=("txt", "json")):
                yield _wds_captions(group, None)
