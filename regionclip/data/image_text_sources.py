"""Readers of image-caption pairs on disk; no image decoding happens here.

* TSV pairs, the original's form: see ``image_text_tsv.py``.
* webdataset tar shards as img2dataset writes them: ``{key}.jpg`` + ``{key}.txt`` (+ ``.json``).
* a folder of images with ``captions.jsonl``: ``{"file_name": ..., "captions": [...]}`` or
  ``"caption": ...`` per line, file names relative to the folder.

Every source yields ``RawSample(key, image, captions)``: ``image`` is encoded bytes, a file
path, or None when the stored bytes cannot be used; ``captions`` holds at most ``max_captions``
strings. TSV and jsonl sources are indexed (``read(i)``); tar sources are sharded
(``iter_shard``); the dataset splits work across processes by items or by shards accordingly.
"""
import json
import logging
import os
import re
import tarfile
import zlib
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

logger = logging.getLogger(__name__)

MAX_CAPTIONS = 5
CAPTIONS_JSONL = "captions.jsonl"
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


def scan_line_offsets(path: str) -> np.ndarray:
    """Byte offset of every non-blank line of ``path``."""
    offsets, position = [], 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                offsets.append(position)
            position += len(line)
    return np.asarray(offsets, dtype=np.int64)


def _jsonl_entry(line: str, path: str, where: str, max_captions: int):
    try:
        entry = json.loads(line)
        file_name = entry["file_name"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} {where}: expected a JSON object with 'file_name' "
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
        for number, line in self._lines():
            _jsonl_entry(line, jsonl, f"line {number}", max_captions)

    def __len__(self) -> int:
        return len(self.offsets)

    def _lines(self) -> Iterator[Tuple[int, str]]:
        """(line number, line) of the non-blank lines."""
        with open(self.path, encoding="utf-8") as f:
            yield from ((number, line) for number, line in enumerate(f, start=1) if line.strip())

    def read(self, index: int, rng) -> RawSample:
        with open(self.path, "rb") as f:
            f.seek(int(self.offsets[index]))
            line = f.readline().decode("utf-8")
        # every line was checked when the file was opened: this fails only if it changed since
        key, file_name, captions = _jsonl_entry(
            line, self.path, f"entry {index + 1} (changed since it was opened?)",
            self.max_captions)
        return RawSample(key, os.path.join(self.root, file_name), captions)

    def iter_captions(self) -> Iterator[List[str]]:
        for number, line in self._lines():
            yield _jsonl_entry(line, self.path, f"line {number}", None)[2]


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
