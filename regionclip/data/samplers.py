"""Training samplers: infinite, sharded across processes, and restartable at any position.

All processes share one global stream of dataset indices, epoch after epoch; process ``r`` of
``W`` takes stream positions ``r, r + W, r + 2W, ...`` (detectron2's sharding), so within an
epoch no two processes see the same item. Epoch ``e`` is a function of ``(seed, e)`` only, which
makes the stream, and with it the data order of a run, a function of the seed and the
position: a resumed run restarts the stream where the checkpoint left it.

Each item also carries its stream position, a unique key the loader uses to seed that item's
augmentation, so augmentations too are independent of workers, prefetching and restarts.
"""
import logging
import math
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
from torch.utils.data import Sampler

from ..distributed import get_rank, get_world_size

logger = logging.getLogger("regionclip")

Item = Tuple[int, int]  # (dataset index, global stream position)


class TrainingSampler(Sampler):
    """Every dataset index once per epoch, in a new random order each epoch (``shuffle``).

    Iterating yields this process's dataset indices forever; :meth:`items` also gives the
    stream positions and can start after the first ``start`` items of this process.
    """

    def __init__(self, size: int, shuffle: bool = True, seed: int = 0,
                 rank: Optional[int] = None, world_size: Optional[int] = None):
        if size <= 0:
            raise ValueError(f"cannot sample from an empty dataset (size {size})")
        if seed < 0:
            raise ValueError(f"the sampler seed must be non-negative, got {seed}")
        self.size = size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = get_rank() if rank is None else rank
        self.world_size = get_world_size() if world_size is None else world_size

    def __iter__(self) -> Iterator[int]:
        return (index for index, _ in self.items())

    def items(self, start: int = 0) -> Iterator[Item]:
        """``(dataset index, stream position)`` of this process, skipping its first ``start``."""
        position = start * self.world_size + self.rank
        epoch, epoch_start = self._locate(position)
        while True:
            indices = self.epoch_indices(epoch)
            for k in range(position - epoch_start, len(indices), self.world_size):
                yield int(indices[k]), position
                position += self.world_size
            epoch_start += len(indices)
            epoch += 1

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """Dataset indices of epoch ``epoch`` of the global stream."""
        if not self.shuffle:
            return np.arange(self.size)
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def _locate(self, position: int) -> Tuple[int, int]:
        """(epoch, stream position where that epoch starts) of a global stream position."""
        epoch = position // self.size
        return epoch, epoch * self.size


class RepeatFactorTrainingSampler(TrainingSampler):
    """Images repeated per epoch by their repeat factor (LVIS; detectron2 semantics).

    A factor ``r`` is taken ``floor(r)`` times plus once more with probability ``r - floor(r)``
    (stochastic rounding, drawn anew each epoch), so the expected count per epoch is ``r``.
    """

    def __init__(self, repeat_factors: Sequence[float], shuffle: bool = True, seed: int = 0,
                 rank: Optional[int] = None, world_size: Optional[int] = None):
        factors = np.asarray(repeat_factors, dtype=np.float64)
        if factors.size and (factors < 1).any():
            raise ValueError("repeat factors must be >= 1")
        super().__init__(len(factors), shuffle, seed, rank, world_size)
        self.int_part = np.floor(factors)
        self.frac_part = factors - self.int_part

    def epoch_indices(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        counts = self.int_part + (rng.random(self.size) < self.frac_part)
        indices = np.repeat(np.arange(self.size), counts.astype(np.int64))
        return rng.permutation(indices) if self.shuffle else indices

    def _locate(self, position: int) -> Tuple[int, int]:
        # epochs differ in length: walk them (vectorised per epoch, cheap even for LVIS)
        epoch, epoch_start = 0, 0
        while True:
            length = len(self.epoch_indices(epoch))
            if position < epoch_start + length:
                return epoch, epoch_start
            epoch_start += length
            epoch += 1


def repeat_factors_from_category_frequency(records: Sequence[dict],
                                           repeat_thresh: float) -> List[float]:
    """Repeat factor of each image: ``max(1, sqrt(t / f_c))`` of its rarest category.

    ``f_c`` is the fraction of images that contain category ``c``, ``t`` is ``repeat_thresh``;
    an image without annotations gets 1 (LVIS paper, sec. 3; detectron2).
    """
    image_count = {}
    for record in records:
        for cat_id in {ann["category_id"] for ann in record["annotations"]}:
            image_count[cat_id] = image_count.get(cat_id, 0) + 1
    num_images = len(records)
    category_factor = {cat_id: max(1.0, math.sqrt(repeat_thresh / (count / num_images)))
                       for cat_id, count in image_count.items()}
    return [
        max((category_factor[ann["category_id"]] for ann in record["annotations"]), default=1.0)
        for record in records
    ]


def batched_items(items: Iterator[Item], batch_size: Union[int, Sequence[int]],
                  group_ids: Optional[Sequence[int]] = None) -> Iterator[List[Item]]:
    """Consecutive batches of ``items``; with ``group_ids`` (per dataset index) each batch is
    drawn from one group, e.g. landscape or portrait images, so padding wastes less.
    ``batch_size`` may be given per group (a sequence indexed by group id).

    Grouping keeps one pending batch per group and emits a group's batch when it fills (the
    order of detectron2's ``AspectRatioGroupedDataset``).
    """
    pending = {}
    for item in items:
        key = 0 if group_ids is None else group_ids[item[0]]
        bucket = pending.setdefault(key, [])
        bucket.append(item)
        if len(bucket) == (batch_size if isinstance(batch_size, int) else batch_size[key]):
            yield bucket
            pending[key] = []


def aspect_ratio_groups(records: Sequence[dict]) -> List[int]:
    """0 for landscape (width > height), 1 otherwise, per record."""
    return [0 if record["width"] > record["height"] else 1 for record in records]
