"""Samplers and DataLoader construction."""
from typing import Callable, List, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..engine.launch import get_rank, get_world_size


class MappedDataset(Dataset):
    """Applies ``mapper`` to a list of records on access (in the loader's workers)."""

    def __init__(self, records: Sequence[dict], mapper: Callable[[dict], dict]):
        self.records = records
        self.mapper = mapper

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return self.mapper(self.records[index])


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


def build_test_loader(records: Sequence[dict], mapper: Callable, num_workers: int = 0):
    """One image per batch (images differ in size), this process's shard only."""
    dataset = MappedDataset(records, mapper)
    return DataLoader(
        dataset,
        batch_size=1,
        sampler=InferenceSampler(len(dataset)),
        num_workers=num_workers,
        collate_fn=_as_list,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )
