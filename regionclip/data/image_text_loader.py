"""The image-text training loader: sources from the config, exact resume across processes.

``DATASETS.TRAIN`` / ``FACTORY_TRAIN`` / ``PATH_TRAIN`` name the data (one entry each; an entry
may join several datasets with ``+`` in name and path, as the original); ``AUG.TRAIN.*`` the
transform; ``SOLVER.IMS_PER_BATCH`` is split over the processes.
"""
import logging
import random
from typing import Iterator, List, Optional

import torch
from torch.utils.data import DataLoader

from ..config import ConfigError, resolve_clip_variant
from ..distributed import all_gather, get_world_size
from .image_text import ImageTextDataset, ImageTextTransform, collate_image_text
from .image_text_sources import MAX_CAPTIONS, JsonlSource, WebDatasetSource
from .image_text_tsv import TSVPairSource
from .loader import cap_workers

logger = logging.getLogger(__name__)

# DATASETS.FACTORY_TRAIN value -> source class (the first is the original's name).
FACTORIES = {
    "CLIPImgTxtPairTSVDataset": TSVPairSource,
    "WebDataset": WebDatasetSource,
    "ImageCaptionJsonl": JsonlSource,
}


def _split_plus(value: str, count: int, key: str) -> List[str]:
    parts = value.split("+")
    if len(parts) == 1:
        return parts * count
    if len(parts) != count:
        raise ConfigError(f"{key} entry {value!r} has {len(parts)} '+' parts, expected {count}")
    return parts


def build_sources(cfg, max_captions: int = MAX_CAPTIONS) -> list:
    """Sources of ``DATASETS.TRAIN`` / ``FACTORY_TRAIN`` / ``PATH_TRAIN`` (one entry each; an
    entry may join several datasets with ``+`` in name and path, as the original)."""
    names, factories, paths = (cfg.DATASETS.TRAIN, cfg.DATASETS.FACTORY_TRAIN,
                               cfg.DATASETS.PATH_TRAIN)
    if not names or not len(names) == len(factories) == len(paths):
        raise ConfigError("image-text pretraining needs one DATASETS.FACTORY_TRAIN and one "
                          "DATASETS.PATH_TRAIN entry per DATASETS.TRAIN entry, got "
                          f"{tuple(names)}, {tuple(factories)}, {tuple(paths)}")
    sources = []
    for name, factory, path in zip(names, factories, paths):
        part_paths = path.split("+")
        _split_plus(name, len(part_paths), "DATASETS.TRAIN")
        for part_factory, part_path in zip(_split_plus(factory, len(part_paths),
                                                       "DATASETS.FACTORY_TRAIN"), part_paths):
            if part_factory not in FACTORIES:
                raise ConfigError(f"unknown DATASETS.FACTORY_TRAIN {part_factory!r}; "
                                  f"choose from {sorted(FACTORIES)}")
            sources.append(FACTORIES[part_factory](part_path, max_captions=max_captions))
    return sources


def build_image_text_transform(cfg) -> ImageTextTransform:
    """AUG.TRAIN.IMAGE_SIZE / AUG.TRAIN.MAX_SIZE / AUG.INTERPOLATION, flip probability 0.5."""
    return ImageTextTransform(cfg.AUG.TRAIN.IMAGE_SIZE, cfg.AUG.TRAIN.MAX_SIZE,
                              cfg.AUG.INTERPOLATION)


def _shared_seed(cfg) -> int:
    # A random seed must still be the same in every process, or the unit splits overlap.
    return cfg.SEED if cfg.SEED >= 0 else all_gather(random.randrange(2 ** 31))[0]


def build_image_text_dataset(cfg, infinite: bool = True, rank: Optional[int] = None,
                             world_size: Optional[int] = None) -> ImageTextDataset:
    """The training dataset of an image-text config (``DATASETS.TRAIN ("imgtxtpairs",)``);
    captions are tokenized to the text tower's context length (77 for OpenAI's variants)."""
    return ImageTextDataset(build_sources(cfg), build_image_text_transform(cfg),
                            infinite=infinite, seed=_shared_seed(cfg), rank=rank,
                            world_size=world_size,
                            context_length=resolve_clip_variant(cfg).context_length)


class ImageTextLoader:
    """Infinite per-process batches (lists of records) of an :class:`ImageTextDataset`, which
    the trainer resumes exactly: ``state_dict`` holds the stream position of every split of
    every process at the last batch drawn, ``iter_from(iteration)`` continues from there.

    With several processes the positions are all-gathered after every batch (a few bytes), as
    the trainer saves the data state of the main process only. A checkpoint of another layout
    (number of processes or workers) cannot be continued exactly: the data starts a new epoch.
    """

    def __init__(self, dataset: ImageTextDataset, batch_size: int, num_workers: int = 0):
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        self.num_splits = dataset.world_size * max(num_workers, 1)
        self._iteration, self._positions = 0, {}

    def __iter__(self) -> Iterator[List[dict]]:
        return self.iter_from(0)

    def iter_from(self, iteration: int) -> Iterator[List[dict]]:
        """Batches ``iteration, iteration + 1, ...`` of the stream."""
        replay = iteration if iteration and iteration != self._iteration else 0
        if replay:
            logger.warning("No image-text stream position for iteration %d: replaying the data "
                           "from the start", iteration)
        if not iteration or replay:
            self._iteration, self._positions = 0, {}
        self.dataset.start_positions = dict(self._positions)
        self.dataset.worker_offset = self._iteration % max(self.num_workers, 1)
        workers = self.num_workers
        loader = DataLoader(
            self.dataset, batch_size=self.batch_size, num_workers=workers,
            collate_fn=collate_image_text, persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            # not the global torch generator: starting a loader must not shift the training's
            # random stream (region sampling, caption choice)
            generator=torch.Generator().manual_seed(self.dataset.seed))
        batches = self._tracked(iter(loader))
        for _ in range(replay):
            next(batches)
        return batches

    def _tracked(self, batches: Iterator[List[dict]]) -> Iterator[List[dict]]:
        for batch in batches:
            for record in batch:
                split, epoch, drawn = record["stream_position"]
                self._positions[split] = (epoch, drawn)
            if self.dataset.world_size > 1:
                mine = {s: p for s, p in self._positions.items()
                        if s // max(self.num_workers, 1) == self.dataset.rank}
                for positions in all_gather(mine):
                    self._positions.update(positions)
            self._iteration += 1
            yield batch

    def state_dict(self) -> dict:
        positions = {int(s): [int(e), int(d)] for s, (e, d) in self._positions.items()}
        return {"seed": self.dataset.seed, "num_splits": self.num_splits,
                "iteration": self._iteration, "positions": positions}

    def load_state_dict(self, state: dict) -> None:
        self.dataset.seed = int(state["seed"])
        self._iteration = int(state["iteration"])
        positions = {int(s): (int(e), int(d)) for s, (e, d) in state["positions"].items()}
        if int(state["num_splits"]) != self.num_splits:
            epoch = max((e for e, _ in positions.values()), default=-1) + 1
            logger.warning("The checkpoint's image-text data was split %d ways, this run splits "
                           "it %d ways (processes x workers): the data restarts at epoch %d",
                           state["num_splits"], self.num_splits, epoch)
            positions = {split: (epoch, 0) for split in range(self.num_splits)}
        self._positions = positions



def build_image_text_loader(cfg, dataset: Optional[ImageTextDataset] = None) -> ImageTextLoader:
    """SOLVER.IMS_PER_BATCH split over the processes, DATALOADER.NUM_WORKERS, list batches."""
    dataset = build_image_text_dataset(cfg) if dataset is None else dataset
    total, world_size = cfg.SOLVER.IMS_PER_BATCH, get_world_size()
    if total % world_size:
        raise ConfigError(f"SOLVER.IMS_PER_BATCH {total} is not divisible by the {world_size} "
                          "processes")
    if cfg.DATALOADER.ASPECT_RATIO_GROUPING:
        # Images are decoded as they stream in, so their sizes are not known ahead of batching.
        logger.warning("DATALOADER.ASPECT_RATIO_GROUPING is not applied to image-text data: "
                       "its batches mix orientations; set it False to say so in the config")
    loader = ImageTextLoader(dataset, total // world_size, cap_workers(cfg.DATALOADER.NUM_WORKERS))
    for source in dataset.sources:
        size = f"{len(source)} items" if source.indexed else f"{len(source.shards)} shards"
        logger.info("Image-text data: %s %s (%s)", type(source).__name__, source.path, size)
    logger.info("Image-text batches of %d per process, %d loader workers, data seed %d",
                loader.batch_size, loader.num_workers, dataset.seed)
    return loader
