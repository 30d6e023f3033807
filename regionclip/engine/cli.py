"""detectron2-compatible command line and run setup (config, output folder, logging, seed)."""
import argparse
import logging
import os
import random
import sys

import numpy as np
import torch

from ..config import dump_config, load_config
from .launch import get_rank, is_main_process


def default_argument_parser(description: str = "RegionCLIP training and evaluation"):
    """The flags users of detectron2 and of the original RegionCLIP already type."""
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Trailing KEY VALUE pairs override config keys, e.g. MODEL.WEIGHTS path.pth",
    )
    parser.add_argument("--config-file", default="", metavar="FILE", help="path to config file")
    parser.add_argument("--resume", action="store_true",
                        help="resume from the last checkpoint in OUTPUT_DIR")
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


def auto_output_dir(output_dir: str, config_file: str) -> str:
    """Detic's convention: a path component ``auto`` becomes the config file's name, so that
    configs sharing a base write to different folders."""
    name = os.path.splitext(os.path.basename(config_file))[0]
    return "/".join(name if part == "auto" else part for part in output_dir.split("/"))


def setup(args):
    """Load the config from the parsed arguments and prepare the output folder."""
    cfg = load_config(args.config_file, args.opts)
    cfg.OUTPUT_DIR = auto_output_dir(cfg.OUTPUT_DIR, args.config_file)
    cfg.freeze()
    logger = setup_logging(cfg.OUTPUT_DIR)
    logger.info("Command line: %s", " ".join(sys.argv))
    seed = seed_everything(cfg.SEED)
    logger.info("Process rank %d, seed %d", get_rank(), seed)
    if is_main_process():
        logger.info("Config written to %s", dump_config(cfg, cfg.OUTPUT_DIR))
    return cfg
