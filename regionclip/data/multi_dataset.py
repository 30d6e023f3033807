"""Training on several datasets at once, each batch from one of them (Detic's mixed training).

``DATALOADER.SAMPLER_TRAIN MultiDatasetSampler``: every draw of the global index stream picks
dataset ``d`` with probability ``DATASET_RATIO[d] / sum(DATASET_RATIO)``, whatever the dataset
sizes, and an image of it uniformly (with replacement). Batches are grouped by dataset and
orientation, with ``DATASET_BS[d]`` images per process (``USE_DIFF_BS_SIZE``), so with Detic's
ratio [1, 4] and batch sizes [2, 8] a process runs a box batch or an image-labelled batch about
equally often. Each dataset has its own resize range (``DATASET_MIN_SIZES``,
``DATASET_MAX_SIZES``) and supervision (``DATASET_ANN``), which the mapper adds to every input.

The stream is a function of (seed, epoch) as in ``samplers.py``, so mixed training resumes
exactly like any other.
"""
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np

from .mapper import TrainingMapper
from .samplers import TrainingSampler, aspect_ratio_groups

MULTI_DATASET_SAMPLER = "MultiDatasetSampler"
_ORIENTATIONS = 2  # landscape, portrait


class MultiDatasetSampler(TrainingSampler):
    """Index stream over the concatenated datasets; each "epoch" is ``len(dataset_ids)``
    weighted draws with replacement.

    Args:
        dataset_ids: the dataset of each record (0, 1, ...), records of a dataset contiguous or
            not.
        ratios: relative share of the draws per dataset.
    """

    def __init__(self, dataset_ids: Sequence[int], ratios: Sequence[float], seed: int = 0,
                 rank=None, world_size=None):
        super().__init__(len(dataset_ids), shuffle=True, seed=seed, rank=rank,
                         world_size=world_size)
        ids = np.asarray(dataset_ids, dtype=np.int64)
        sizes = np.bincount(ids, minlength=len(ratios))
        if len(sizes) != len(ratios) or (sizes == 0).any():
            raise ValueError(f"DATALOADER.DATASET_RATIO {list(ratios)} needs one non-empty "
                             f"dataset per entry; dataset sizes {sizes.tolist()}")
        ratios = np.asarray(ratios, dtype=np.float64)
        weights = ratios[ids] / sizes[ids]
        self.probabilities = weights / weights.sum()

    def epoch_indices(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        return rng.choice(self.size, size=self.size, p=self.probabilities)


class MultiDatasetMapper:
    """A `TrainingMapper` per dataset; adds ``dataset_source``, ``ann_type`` and, for
    image-labelled data, ``pos_category_ids`` and ``captions`` to each input."""

    def __init__(self, mappers: Sequence[TrainingMapper], ann_types: Sequence[str]):
        self.mappers = list(mappers)
        self.ann_types = list(ann_types)

    def __call__(self, record: Dict, rng=None) -> Dict:
        source = record["dataset_source"]
        result = self.mappers[source](record, rng)
        result.update(dataset_source=source, ann_type=self.ann_types[source],
                      pos_category_ids=list(record.get("pos_category_ids", [])))
        if "captions" in record:
            result["captions"] = list(record["captions"])
        return result


@dataclass(frozen=True)
class MultiDatasetSettings:
    """``DATALOADER.{DATASET_RATIO, DATASET_ANN, DATASET_BS, DATASET_MIN_SIZES,
    DATASET_MAX_SIZES}`` checked against ``DATASETS.TRAIN``; batch size and image sizes
    resolved per dataset."""

    ratios: Tuple[float, ...]
    ann_types: Tuple[str, ...]
    batch_sizes: Tuple[int, ...]
    min_sizes: Tuple[Tuple[int, ...], ...]
    max_sizes: Tuple[int, ...]

    def group_batch_sizes(self) -> List[int]:
        """Batch size of each batching group (dataset x orientation, see `batch_groups`)."""
        return [size for size in self.batch_sizes for _ in range(_ORIENTATIONS)]


def batch_groups(records: Sequence[Dict]) -> List[int]:
    """Group of each record: its dataset and orientation (never mixed in one batch)."""
    orientation = aspect_ratio_groups(records)
    return [r["dataset_source"] * _ORIENTATIONS + o for r, o in zip(records, orientation)]


def _per_dataset(cfg, key: str, count: int) -> list:
    values = list(cfg.DATALOADER.get(key))
    if len(values) != count:
        raise ValueError(f"DATALOADER.{key} has {len(values)} entries for {count} DATASETS.TRAIN "
                         "datasets: give one per dataset")
    return values


def multi_dataset_settings(cfg, per_process_batch: int) -> MultiDatasetSettings:
    """The settings of ``cfg``; ``per_process_batch`` is used unless ``USE_DIFF_BS_SIZE``."""
    loader, count = cfg.DATALOADER, len(cfg.DATASETS.TRAIN)
    if not loader.MULTI_DATASET_GROUPING:
        raise ValueError("MultiDatasetSampler batches each dataset apart: mixed batches "
                         "(DATALOADER.MULTI_DATASET_GROUPING False) are not supported")
    if any(_per_dataset(cfg, "USE_RFS", count)):
        raise ValueError("DATALOADER.USE_RFS: repeat-factor sampling inside a dataset (Detic's "
                         "LVIS models) is not carried; set it to False for every dataset")
    sizes = [(tuple(cfg.INPUT.MIN_SIZE_TRAIN), cfg.INPUT.MAX_SIZE_TRAIN)] * count
    batch_sizes = [per_process_batch] * count
    if loader.USE_DIFF_BS_SIZE:
        if cfg.INPUT.CUSTOM_AUG != "ResizeShortestEdge":
            raise ValueError("DATALOADER.USE_DIFF_BS_SIZE needs INPUT.CUSTOM_AUG "
                             "ResizeShortestEdge (per-dataset DATASET_MIN_SIZES / MAX_SIZES)")
        batch_sizes = _per_dataset(cfg, "DATASET_BS", count)
        sizes = list(zip(map(tuple, _per_dataset(cfg, "DATASET_MIN_SIZES", count)),
                         _per_dataset(cfg, "DATASET_MAX_SIZES", count)))
    return MultiDatasetSettings(
        ratios=tuple(_per_dataset(cfg, "DATASET_RATIO", count)),
        ann_types=tuple(_per_dataset(cfg, "DATASET_ANN", count)),
        batch_sizes=tuple(batch_sizes), min_sizes=tuple(s for s, _ in sizes),
        max_sizes=tuple(m for _, m in sizes))


def build_multi_dataset_mapper(cfg, settings: MultiDatasetSettings) -> MultiDatasetMapper:
    mappers = [TrainingMapper(min_sizes=min_sizes, max_size=max_size,
                              sample_style=cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING,
                              flip=cfg.INPUT.RANDOM_FLIP, image_format=cfg.INPUT.FORMAT,
                              use_masks=cfg.MODEL.MASK_ON)
               for min_sizes, max_size in zip(settings.min_sizes, settings.max_sizes)]
    return MultiDatasetMapper(mappers, settings.ann_types)
