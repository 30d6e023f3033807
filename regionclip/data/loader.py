"""Samplers, batching and DataLoader construction for training and inference.

Training batches are lists of mapper dicts, ``SOLVER.IMS_PER_BATCH / world size`` per process.
Their content is a function of the data seed and the iteration only (see ``samplers.py``): a
loader restarted with :meth:`TrainingLoader.iter_from` at iteration ``k`` yields exactly what an
uninterrupted one yields from its ``k``-th batch on, whatever the number of workers.
"""
import functools
import logging
import os
from itertools import islice
from typing import Callable, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..distributed import all_gather, get_rank, get_world_size
from .catalog import get_dataset_dicts, get_metadata
from .mapper import build_training_mapper
from .multi_dataset import (
    MULTI_DATASET_SAMPLER,
    MultiDatasetSampler,
    batch_groups,
    build_multi_dataset_mapper,
    multi_dataset_settings,
)
from .samplers import (
    Item,
    RepeatFactorTrainingSampler,
    TrainingSampler,
    aspect_ratio_groups,
    batched_items,
    repeat_factors_from_category_frequency,
)

logger = logging.getLogger("regionclip")

TRAINING_SAMPLERS = ("TrainingSampler", "RepeatFactorTrainingSampler", MULTI_DATASET_SAMPLER)
# Separates the augmentation random streams from the sampler's epoch streams.
_AUGMENTATION_STREAM = 1
_MAX_SEED = 2 ** 31


class MappedDataset(Dataset):
    """Applies ``mapper`` to a list of records on access (in the loader's workers)."""

    def __init__(self, records: Sequence[dict], mapper: Callable[[dict], dict]):
        self.records = records
        self.mapper = mapper

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return self.mapper(self.records[index])


class TrainingDataset(Dataset):
    """Maps sampler items ``(index, stream position)`` with ``mapper(record, rng)``; the numpy
    Generator ``rng`` is seeded by (seed, position), so each item's augmentation is fixed."""

    def __init__(self, records: Sequence[dict], mapper: Callable, seed: int):
        self.records = records
        self.mapper = mapper
        self.seed = seed

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: Item) -> dict:
        index, position = item
        rng = np.random.default_rng([self.seed, _AUGMENTATION_STREAM, position])
        return self.mapper(self.records[index], rng)


class InferenceSampler(Sampler):
    """Splits ``range(size)`` into contiguous, non-overlapping shards, one per process."""

    def __init__(self, size: int, rank: int = None, world_size: int = None):
        rank = get_rank() if rank is None else rank
        world_size = get_world_size() if world_size is None else world_size
        shard = (size + world_size - 1) // world_size
        self.indices = range(rank * shard, min(size, (rank + 1) * shard))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _as_list(batch: List[dict]) -> List[dict]:
    return batch


def available_cpus() -> int:
    """CPU cores this process may run on: its affinity mask (taskset, a container's cpuset)
    where the platform has one, else the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cap_workers(requested: int) -> int:
    """``requested`` DataLoader workers, at most one per available core (more only compete for
    the same cores, and torch warns about them)."""
    cores = available_cpus()
    if requested > cores:
        _log_capped(requested, cores)
    return min(requested, cores)


@functools.lru_cache(maxsize=None)  # once per process: test loaders are built per evaluation
def _log_capped(requested: int, cores: int) -> None:
    logger.info("DATALOADER.NUM_WORKERS %d capped to %d: this process can use %d CPU cores",
                requested, cores, cores)


def build_test_loader(records: Sequence[dict], mapper: Callable, num_workers: int = 0,
                      batch_size: int = 1):
    """Batches of ``batch_size`` images in dataset order, this process's shard only."""
    if batch_size < 1:
        raise ValueError(f"TEST.IMS_PER_BATCH must be at least 1, got {batch_size}")
    dataset = MappedDataset(records, mapper)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=InferenceSampler(len(dataset)),
        num_workers=cap_workers(num_workers),
        collate_fn=_as_list,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )


class TrainingLoader:
    """Infinite per-process training batches (lists of mapper dicts), restartable.

    Args:
        records: dataset records.
        mapper: ``mapper(record, rng) -> dict``.
        sampler: a :class:`TrainingSampler` (or subclass) over ``records``; its ``seed`` is the
            data seed (sampling order and augmentations).
        batch_size: images per batch in this process, or per group (indexed by group id).
        group_ids: per-record group (e.g. :func:`aspect_ratio_groups`) that batches must not mix.
        num_workers: DataLoader worker processes.
    """

    def __init__(self, records: Sequence[dict], mapper: Callable, sampler: TrainingSampler,
                 batch_size: Union[int, Sequence[int]], group_ids: Optional[Sequence[int]] = None,
                 num_workers: int = 0):
        self.records = records
        self.mapper = mapper
        self.sampler = sampler
        self.batch_size = batch_size
        self.group_ids = group_ids
        self.num_workers = num_workers

    def __iter__(self) -> Iterator[List[dict]]:
        return self.iter_from(0)

    def batches(self, iteration: int = 0) -> Iterator[List[Item]]:
        """The sampler items of batches ``iteration, iteration + 1, ...``."""
        if self.group_ids is None:
            items = self.sampler.items(iteration * self.batch_size)
            return batched_items(items, self.batch_size)
        # Grouping keeps partial batches between iterations; replaying the (cheap, index-only)
        # stream from the start restores them exactly.
        batches = batched_items(self.sampler.items(), self.batch_size, self.group_ids)
        return islice(batches, iteration, None)

    def iter_from(self, iteration: int) -> Iterator[List[dict]]:
        """Mapped batches from batch ``iteration`` on."""
        seed = self.sampler.seed
        loader = DataLoader(
            TrainingDataset(self.records, self.mapper, seed),
            batch_sampler=self.batches(iteration),
            num_workers=self.num_workers,
            collate_fn=_as_list,
            pin_memory=torch.cuda.is_available(),
            # worker seeds come from this generator, not from the global torch RNG, so
            # starting a loader leaves the training's random stream untouched
            generator=torch.Generator().manual_seed(_worker_base_seed(seed, self.sampler.rank)),
        )
        return iter(loader)

    def state_dict(self) -> dict:
        return {"seed": self.sampler.seed}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.seed = int(state["seed"])


def _worker_base_seed(seed: int, rank: int) -> int:
    """Seed of the workers' global generators: distinct per process (mappers should draw from
    the ``rng`` they are given, which does not depend on workers at all)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def shared_seed(seed: int) -> int:
    """``seed`` if non-negative, else one random seed agreed by all processes."""
    if seed >= 0:
        return seed
    return int(all_gather(int(np.random.default_rng().integers(_MAX_SEED)))[0])


def check_same_classes(dataset_names: Sequence[str]) -> None:
    """Datasets trained together must list the same classes in the same order: a class id is a
    position in that list, so two different lists of one length would train wrong classes."""
    if not dataset_names:
        raise ValueError("DATASETS.TRAIN is empty: name at least one training dataset")
    first, *others = dataset_names
    classes = get_metadata(first).thing_classes
    for name in others:
        theirs = get_metadata(name).thing_classes
        if theirs != classes:
            diff = next((i for i, pair in enumerate(zip(classes, theirs)) if pair[0] != pair[1]),
                        min(len(classes), len(theirs)))
            raise ValueError(
                f"DATASETS.TRAIN: {name} lists {len(theirs)} classes and {first} {len(classes)}, "
                f"first different at position {diff}; datasets trained together need the same "
                "categories in their json files (list every category, even without boxes)")


def training_records(dataset_names: Sequence[str], filter_empty: bool = True,
                     input_dir: str = "") -> List[dict]:
    """Records of all ``dataset_names``, which must share one class list; with
    ``filter_empty`` images without non-crowd annotations are dropped (they teach nothing)."""
    check_same_classes(dataset_names)
    records = [r for name in dataset_names for r in get_dataset_dicts(name, input_dir=input_dir)]
    if filter_empty:
        before = len(records)
        records = [r for r in records
                   if any(not ann.get("iscrowd", 0) for ann in r.get("annotations", []))]
        logger.info("Removed %d of %d training images without usable annotations",
                    before - len(records), before)
    if not records:
        raise ValueError(f"No training images left in {tuple(dataset_names)}")
    return records


def build_training_sampler(cfg, records: Sequence[dict], seed: int) -> TrainingSampler:
    name = cfg.DATALOADER.SAMPLER_TRAIN
    logger.info("Using training sampler %s", name)
    if name == "TrainingSampler":
        return TrainingSampler(len(records), seed=seed)
    if name == "RepeatFactorTrainingSampler":
        factors = repeat_factors_from_category_frequency(records, cfg.DATALOADER.REPEAT_THRESHOLD)
        logger.info("Repeat factors: %.1f images per epoch on average per %d images",
                    sum(factors), len(records))
        return RepeatFactorTrainingSampler(factors, seed=seed)
    raise ValueError(f"DATALOADER.SAMPLER_TRAIN {name!r} is not available; valid names: "
                     f"{TRAINING_SAMPLERS}")


def per_process_batch(total: int, world_size: int) -> int:
    if total % world_size:
        raise ValueError(f"SOLVER.IMS_PER_BATCH {total} is not divisible by the number of "
                         f"processes {world_size}")
    return total // world_size


def build_train_loader(cfg, mapper: Optional[Callable] = None) -> TrainingLoader:
    """The training loader of ``DATASETS.TRAIN`` (``DATALOADER.*``, ``SOLVER.IMS_PER_BATCH``)."""
    if cfg.DATALOADER.SAMPLER_TRAIN == MULTI_DATASET_SAMPLER:
        return build_multi_dataset_loader(cfg)
    records = training_records(cfg.DATASETS.TRAIN, cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
                               cfg.INPUT_DIR)
    seed = shared_seed(cfg.SEED)
    groups = aspect_ratio_groups(records) if cfg.DATALOADER.ASPECT_RATIO_GROUPING else None
    return TrainingLoader(
        records,
        mapper or build_training_mapper(cfg),
        build_training_sampler(cfg, records, seed),
        per_process_batch(cfg.SOLVER.IMS_PER_BATCH, get_world_size()),
        groups,
        cap_workers(cfg.DATALOADER.NUM_WORKERS),
    )


def build_multi_dataset_loader(cfg) -> TrainingLoader:
    """Detic's mixed training (``multi_dataset.py``): every batch from one dataset of
    ``DATASETS.TRAIN``, with that dataset's batch size, image sizes and supervision. Only box
    datasets drop images without annotations (``FILTER_EMPTY_ANNOTATIONS``)."""
    names = cfg.DATASETS.TRAIN
    batch = 0 if cfg.DATALOADER.USE_DIFF_BS_SIZE else per_process_batch(
        cfg.SOLVER.IMS_PER_BATCH, get_world_size())
    settings = multi_dataset_settings(cfg, batch)
    check_same_classes(names)
    filter_box = cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
    records = [dict(record, dataset_source=source)
               for source, (name, ann) in enumerate(zip(names, settings.ann_types))
               for record in training_records([name], filter_box and ann == "box",
                                              cfg.INPUT_DIR)]
    sampler = MultiDatasetSampler([r["dataset_source"] for r in records], settings.ratios,
                                  seed=shared_seed(cfg.SEED))
    logger.info("Mixed training on %s: draw shares %s, per-process batches %s", list(names),
                list(settings.ratios), list(settings.batch_sizes))
    return TrainingLoader(records, build_multi_dataset_mapper(cfg, settings), sampler,
                          settings.group_batch_sizes(), batch_groups(records),
                          cap_workers(cfg.DATALOADER.NUM_WORKERS))
