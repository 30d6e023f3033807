"""Image-caption pretraining data: one iterable dataset over TSV pairs, tar shards and jsonl.

Each record is ``{"image": float [3, H, W] in [0, 1] RGB after the transforms, "captions":
list of at most 5 str, "tokens": long [n_captions, 77], "height", "width": the decoded image's
size before the transforms, "key": str, "stream_position": (split, epoch, draws)}``;
``collate_image_text`` batches records as a list.

Caption choice: the dataset keeps all captions; the model draws one per image per step, as the
original's PretrainFastRCNN did, with ``choose_captions``, which uses each image's own caption
count (the original used the first image's count for the whole batch, reference 11.7).

Splitting work without duplicates: items of indexed sources (TSV rows, jsonl lines) and
shards of tar sources are "units". Every epoch all units are permuted with a seed shared by
all processes, and split ``rank * num_workers + worker_id`` takes every
``(world_size * num_workers)``-th unit. A source with fewer shards than splits has each shard
cut into interleaved parts (sample ordinal modulo the number of parts), so every split gets
work and no sample is read twice in an epoch. Samples from shards pass a shuffle buffer.
Each sample's random choices (tags, flip) come from a generator seeded by (seed, epoch, unit,
sample in unit), the buffer's from (seed, epoch, split).

Resuming (``ImageTextLoader`` in ``image_text_loader.py``): a split's stream is a function of
the seed and the layout (processes x workers) only, so the position (epoch, draws) of every
split is all a checkpoint needs. A resumed split skips its epoch's first draws without reading
them (TSV and jsonl) or replays them without decoding any image (tar shards, through the
shuffle buffer).

Skipping: a missing or undecodable image, an item without captions, or an unreadable shard is
skipped and counted in ``skipped`` (shared memory, so the counts of DataLoader workers show in
the main process). Each worker logs its first ten skips, then a summary every ``log_period``.
An epoch in which a split reads samples but can use none of them raises.
"""
import functools
import io
import logging
import math
import random
from itertools import islice
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from ..distributed import get_rank, get_world_size
from ..prompts import CONTEXT_LENGTH, tokenize
from .image_text_sources import MAX_CAPTIONS, RawSample, ShardReadError
from .mapper import ImageReadError, read_image

logger = logging.getLogger(__name__)

SKIP_REASONS = ("image", "caption", "shard")
# PIL's integer resampling codes (AUG.INTERPOLATION) -> torchvision modes.
PIL_INTERPOLATION = {
    0: InterpolationMode.NEAREST, 1: InterpolationMode.LANCZOS, 2: InterpolationMode.BILINEAR,
    3: InterpolationMode.BICUBIC, 4: InterpolationMode.BOX, 5: InterpolationMode.HAMMING,
}
_COUNTER_SLOTS = 256  # one row of skip counts per DataLoader worker id (modulo this)
_LOGGED_SKIPS = 10
# Captions tokenized per process and kept: a corpus read for several epochs (the toy world's
# teacher reads its 12,000 captions 64 times) pays CLIP's pure-Python BPE once per caption.
_TOKEN_CACHE_SIZE = 16384


class ImageTextTransform:
    """The original's pretraining transforms (``build_clip_transforms`` with one IMAGE_SIZE).

    ``size`` (s,): shorter side to s with PIL; if the longer side would exceed ``max_size``
    (0 = no cap) it becomes ``max_size`` and the shorter side ``int(max_size * s / long)``
    (torchvision ``Resize(max_size)``, integer truncation). ``size`` (h, w): exactly that size.
    Then a horizontal flip with probability ``flip_prob`` and a [0, 1] float tensor.
    """

    def __init__(self, size: Sequence[int] = (800,), max_size: int = 1333,
                 interpolation: int = 3, flip_prob: float = 0.5):
        size = [int(s) for s in size]
        if len(size) not in (1, 2) or min(size) <= 0:
            raise ValueError(f"image size must be (shorter side,) or (h, w), got {size}")
        if max_size and (len(size) == 2 or max_size <= size[0]):
            raise ValueError(f"max_size {max_size} needs one size value below it, got {size}")
        if interpolation not in PIL_INTERPOLATION:
            raise ValueError(f"interpolation must be a PIL filter code "
                             f"{sorted(PIL_INTERPOLATION)}, got {interpolation}")
        self.size, self.max_size, self.flip_prob = size, max_size or None, flip_prob
        self.interpolation = PIL_INTERPOLATION[interpolation]

    def __call__(self, image: Image.Image, rng: random.Random) -> torch.Tensor:
        image = TF.resize(image, self.size, self.interpolation, max_size=self.max_size)
        if rng.random() < self.flip_prob:
            image = TF.hflip(image)
        return TF.to_tensor(image)


def decode_image(image) -> np.ndarray:
    """Encoded bytes or a path -> uint8 [H, W, 3] RGB, upright; ImageReadError if unusable."""
    if image is None:
        raise ImageReadError("no usable image data")
    source = io.BytesIO(image) if isinstance(image, bytes) else image
    try:
        return read_image(source, "RGB")
    except Image.DecompressionBombError as error:
        raise ImageReadError(str(error)) from error


class ImageTextDataset(IterableDataset):
    """Records of one or more sources, split across processes and DataLoader workers.

    ``infinite`` repeats epochs forever (training); otherwise one pass. ``seed`` must be equal
    in all processes: it orders the units. ``rank``/``world_size`` default to
    ``regionclip.distributed``'s.

    Resuming: every record carries ``stream_position`` (split, epoch, draws), the position of
    its split's stream just after it (draws count skipped samples too). ``start_positions``
    ({split: (epoch, draws)}) makes each split continue from there, and ``worker_offset``
    shifts which DataLoader worker serves which split (see :class:`ImageTextLoader`).
    """

    def __init__(self, sources: Sequence, transform: Callable, *, shuffle: bool = True,
                 infinite: bool = True, seed: int = 0, rank: Optional[int] = None,
                 world_size: Optional[int] = None, shuffle_buffer: int = 256,
                 max_captions: int = MAX_CAPTIONS, log_period: int = 1000,
                 context_length: int = CONTEXT_LENGTH):
        if not sources:
            raise ValueError("ImageTextDataset needs at least one source")
        self.sources, self.transform = list(sources), transform
        self.shuffle, self.infinite, self.seed = shuffle, infinite, seed
        self.rank = get_rank() if rank is None else rank
        self.world_size = get_world_size() if world_size is None else world_size
        self.shuffle_buffer, self.max_captions = shuffle_buffer, max_captions
        self.log_period, self.context_length = log_period, context_length
        self.start_positions: Dict[int, Tuple[int, int]] = {}
        self.worker_offset = 0
        self._counts = torch.zeros(_COUNTER_SLOTS, len(SKIP_REASONS), dtype=torch.int64)
        self._counts.share_memory_()

    @property
    def skipped(self) -> Dict[str, int]:
        """Items skipped so far per reason, summed over this process's DataLoader workers."""
        return dict(zip(SKIP_REASONS, self._counts.sum(dim=0).tolist()))

    def __iter__(self) -> Iterator[dict]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        # Batches go to the workers in turn; a loader resumed at batch k shifts the workers so
        # that its worker w continues the stream that delivered batch k + w before.
        split = self.rank * num_workers + (worker_id + self.worker_offset) % num_workers
        num_splits = self.world_size * num_workers
        slot = worker_id % _COUNTER_SLOTS
        blocks = self._unit_blocks(num_splits)
        epoch, start = self.start_positions.get(split, (0, 0))
        while True:
            units = self._split_units(blocks, epoch, split, num_splits)
            if len(units) == 0:
                logger.warning("Image-text split %d of %d has no data", split, num_splits)
                return
            produced = read = 0
            for drawn, (raw, rng) in enumerate(
                    self._epoch_samples(blocks, units, epoch, split, slot, start), start + 1):
                read += 1
                record = self._record(raw, rng, slot)
                if record is not None:
                    produced += 1
                    record["stream_position"] = (split, epoch, drawn)
                    yield record
            if produced == 0 and start == 0:
                self._raise_or_stop(read, split, num_splits)
                return
            if not self.infinite:
                return
            epoch, start = epoch + 1, 0

    def _unit_blocks(self, num_splits: int) -> List[tuple]:
        """(source, number of units, parts per shard) per source."""
        blocks = []
        for source in self.sources:
            if source.indexed:
                blocks.append((source, len(source), 1))
            else:
                parts = math.ceil(num_splits / len(source.shards))
                blocks.append((source, len(source.shards) * parts, parts))
        total = sum(count for _, count, _ in blocks)
        if total < num_splits:  # a reader without data would break the workers' turn order
            raise ValueError(f"image-text data has {total} items, fewer than the "
                             f"{self.world_size} processes x {num_splits // self.world_size} "
                             "loader workers that each read a share; lower "
                             "DATALOADER.NUM_WORKERS")
        return blocks

    def _split_units(self, blocks, epoch: int, split: int, num_splits: int) -> torch.Tensor:
        total = sum(count for _, count, _ in blocks)
        if not self.shuffle:
            return torch.arange(split, total, num_splits)
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(total, generator=generator)[split::num_splits].contiguous()

    def _epoch_samples(self, blocks, units, epoch: int, split: int, slot: int,
                       start: int) -> Iterator[Tuple[RawSample, random.Random]]:
        """(sample, its random generator) of one epoch of a split, from draw ``start`` on."""
        if all(source.indexed for source, _, _ in blocks):
            # one sample per unit and no shuffle buffer: skipped draws are never read
            return self._unit_stream(blocks, units[start:], epoch, slot)
        samples = self._unit_stream(blocks, units, epoch, slot)
        if self.shuffle and self.shuffle_buffer > 1:
            buffer_rng = random.Random(f"{self.seed}/{epoch}/{split}/buffer")
            samples = _buffer_shuffle(samples, self.shuffle_buffer, buffer_rng)
        # the buffer's order depends on everything read before: replay it, decoding nothing
        return islice(samples, start, None)

    def _unit_stream(self, blocks, units, epoch: int, slot: int) -> Iterator:
        starts = torch.tensor([0] + [count for _, count, _ in blocks]).cumsum(0)
        block_ids = torch.searchsorted(starts, units, right=True) - 1
        return (sample for unit, block in zip(units.tolist(), block_ids.tolist())
                for sample in self._unit_samples(blocks[block], unit - int(starts[block]),
                                                 f"{self.seed}/{epoch}/{unit}", slot))

    def _unit_samples(self, block, unit: int, seed: str, slot: int) -> Iterator:
        # Each sample draws from its own generator, seeded by where it sits in the data, so
        # its captions and flip do not depend on what was read or skipped before it.
        source, _, parts = block
        if source.indexed:
            rng = random.Random(f"{seed}/0")
            yield source.read(unit, rng), rng
            return
        shard, part = divmod(unit, parts)
        try:
            samples = source.iter_shard(shard, random.Random(seed), part, parts)
            for index, raw in enumerate(samples):
                yield raw, random.Random(f"{seed}/{index}")
        except ShardReadError as error:
            self._skip("shard", source.shards[shard], error, slot)

    def _record(self, raw: RawSample, rng, slot) -> Optional[dict]:
        if not raw.captions:
            self._skip("caption", raw.key, "no caption", slot)
            return None
        try:
            array = decode_image(raw.image)
        except ImageReadError as error:
            self._skip("image", raw.key, error, slot)
            return None
        captions = raw.captions[:self.max_captions]
        return {
            "image": self.transform(Image.fromarray(array), rng),
            "captions": captions,
            "tokens": torch.stack([_caption_tokens(c, self.context_length) for c in captions]),
            "height": int(array.shape[0]),
            "width": int(array.shape[1]),
            "key": raw.key,
        }

    def _skip(self, reason: str, key: str, error, slot: int) -> None:
        row = self._counts[slot]
        row[SKIP_REASONS.index(reason)] += 1
        count = int(row.sum())
        if count <= _LOGGED_SKIPS:
            logger.warning("Skipped image-text item %s (%s): %s", key, reason, error)
        elif count % self.log_period == 0:
            counts = dict(zip(SKIP_REASONS, row.tolist()))
            logger.warning("Image-text worker %d has skipped %d items so far: %s", slot, count,
                           counts)

    def _raise_or_stop(self, read: int, split: int, num_splits: int) -> None:
        names = ", ".join(str(source.path) for source in self.sources)
        if read:
            raise RuntimeError(f"no usable image-text item in {names}: all {read} items of "
                               f"split {split}/{num_splits} were skipped ({self.skipped})")
        logger.warning("Image-text split %d of %d read no samples from %s", split, num_splits,
                       names)


def _buffer_shuffle(samples: Iterator, size: int, rng: random.Random) -> Iterator:
    """Streamed samples in random order within a window of ``size`` (webdataset's shuffle)."""
    buffer = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        index = rng.randrange(size)
        yield buffer[index]
        buffer[index] = sample
    rng.shuffle(buffer)
    yield from buffer


def collate_image_text(batch: List[dict]) -> List[dict]:
    """Images differ in size: a batch is the list of records (the model pads)."""
    return list(batch)


def choose_captions(tokens: Sequence[torch.Tensor],
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One caption per image, uniform among that image's own: [n_i, L] each -> [B, L]."""
    picks = [t[torch.randint(len(t), (), generator=generator)] for t in tokens]
    return torch.stack(picks)


@functools.lru_cache(maxsize=_TOKEN_CACHE_SIZE)
def _caption_tokens(caption: str, context_length: int) -> torch.Tensor:
    """[context_length] CLIP BPE ids of one caption (callers stack, never modify, the copy)."""
    return tokenize(caption, context_length)[0]
