"""detectron2-compatible command line and run setup (config, output folder, logging, seed)."""
import argparse
import contextlib
import logging
import os
import random
import sys

import numpy as np
import torch

from ..config import dump_config, load_config
from .launch import get_rank, is_main_process
from .output_dir import OutputDirLock, check_previous_run, tidy


def default_argument_parser(description: str = "RegionCLIP training and evaluation"):
    """The flags users of detectron2 and of the original RegionCLIP already type."""
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Trailing KEY VALUE pairs override config keys, e.g. MODEL.WEIGHTS path.pth",
    )
    parser.add_argument("--config-file", default="", metavar="FILE", help="path to config file")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="resume from the last checkpoint in OUTPUT_DIR")
    start.add_argument("--overwrite", action="store_true",
                       help="start a new training run in an OUTPUT_DIR that holds another "
                       "one, deleting its checkpoints and metrics")
    parser.add_argument("--eval-only", action="store_true", help="only run evaluation")
    parser.add_argument("--num-gpus", type=int, default=1, help="processes per machine")
    parser.add_argument("--num-machines", type=int, default=1)
    parser.add_argument("--machine-rank", type=int, default=0, help="rank of this machine")
    parser.add_argument("--dist-url", default="auto",
                        help="initialisation URL for the process group, e.g. tcp://host:port")
    parser.add_argument("opts", default=[], nargs=argparse.REMAINDER,
                        help="KEY VALUE config overrides")
    return parser


def setup_logging(output_dir: str = "", name: str = "regionclip") -> logging.Logger:
    """Console logging on the main process; every process logs to its own file."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in logger.handlers[:]:
        handler.close()
        logger.removeHandler(handler)
    fmt = logging.Formatter("[%(asctime)s %(name)s %(levelname)s] %(message)s", "%m/%d %H:%M:%S")
    if is_main_process():
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(fmt)
        logger.addHandler(console)
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        rank = get_rank()
        filename = "log.txt" if rank == 0 else f"log.txt.rank{rank}"
        handler = logging.FileHandler(os.path.join(output_dir, filename))
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    return logger


def seed_everything(seed: int) -> int:
    """Seed python, numpy and torch; a negative seed picks one (and returns it for the log)."""
    if seed < 0:
        seed = int.from_bytes(os.urandom(2), "big")
    seed += get_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return seed


@contextlib.contextmanager
def setup(args):
    """``with setup(args) as cfg:`` the run's config, with OUTPUT_DIR held by this run for
    the block (see ``output_dir.py``), logging set up, seeds set and the config written.

    Nothing is written before the folder is held: a second run into a folder in use, or a
    new training run over a previous one (neither ``--resume`` nor ``--overwrite``), fails
    without touching it.
    """
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    owner = is_main_process() and bool(cfg.OUTPUT_DIR)
    training = not args.eval_only
    with OutputDirLock(cfg.OUTPUT_DIR) if owner else contextlib.nullcontext() as lock:
        if owner and training:
            check_previous_run(cfg.OUTPUT_DIR, args.resume, args.overwrite)
        logger = setup_logging(cfg.OUTPUT_DIR)
        logger.info("Command line: %s", " ".join(sys.argv))
        if owner:
            tidy(lock, overwrite=training and args.overwrite)
        seed = seed_everything(cfg.SEED)
        logger.info("Process rank %d, seed %d", get_rank(), seed)
        if is_main_process():
            logger.info("Config written to %s", dump_config(cfg, cfg.OUTPUT_DIR))
        yield cfg
