#!/usr/bin/env python3
"""Generate the toy world: COCO detection splits and image-caption pairs, from a seed.

    python tools/make_toy_world.py --out datasets/toyworld --seed 0

The same seed and sizes give the same files. See ``regionclip/toyworld/writer.py`` for the
layout; the detection splits are read as ``coco_json:<json>:<image folder>`` datasets and the
pairs as ``DATASETS.FACTORY_TRAIN ("ImageCaptionJsonl",)`` with ``PATH_TRAIN`` the
``pretrain`` folder (RegionCLIP pretraining) or the ``web`` folder (the CLIP teacher).
"""
import argparse
import logging
import sys
from dataclasses import fields

from regionclip.engine.defaults import run_tool
from regionclip.toyworld import SceneSpec, WorldSizes, write_world

logger = logging.getLogger("regionclip.toyworld")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults, scene = WorldSizes(), SceneSpec()
    parser.add_argument("--out", required=True, help="folder to create")
    parser.add_argument("--seed", type=int, default=0)
    for split in (f.name for f in fields(WorldSizes)):
        parser.add_argument(f"--{split}", type=int, default=getattr(defaults, split),
                            help=f"number of {split} images (default %(default)s)")
    parser.add_argument("--min-side", type=int, default=scene.min_side)
    parser.add_argument("--max-side", type=int, default=scene.max_side)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser.parse_args(argv)


def main(argv=None) -> str:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sizes = WorldSizes(**{f.name: getattr(args, f.name) for f in fields(WorldSizes)})
    spec = SceneSpec(min_side=args.min_side, max_side=args.max_side)
    out = write_world(args.out, args.seed, sizes, spec, overwrite=args.overwrite)
    logger.info("Wrote the toy world (seed %d, %s) to %s", args.seed, sizes, out)
    return out


if __name__ == "__main__":
    sys.exit(run_tool(main, "make_toy_world"))
