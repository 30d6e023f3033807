"""What ``tools/train_net.py`` does: detectron2's command line and run setup (config, output
folder, logging, seed), evaluation of every test dataset, and training.

Training runs on ``DATASETS.TRAIN``: detection datasets (catalog names, or
``coco_json:<json>:<image_dir>``), or image-caption data for a ``PretrainFastRCNN`` config
(``DATASETS.TRAIN`` / ``FACTORY_TRAIN`` / ``PATH_TRAIN``, see ``regionclip/data/image_text.py``).
A pretraining run has no class vocabulary to check and evaluates only when ``DATASETS.TEST`` is
set: then the student is evaluated as a zero-shot detector, a ``CLIPFastRCNN`` built from the
same config (``MODEL.CLIP.TEXT_EMB_PATH`` holding the test classes' embeddings) that gets the
student trunk and offline RPN weights, as it would from a saved pretraining checkpoint.
"""
import argparse
import json
import logging
import os
import random
import sys
from typing import Callable, Dict, Optional

import numpy as np
import torch
from torch import nn

from ..config import ConfigError, dump_config, load_config
from ..data.catalog import get_dataset_dicts, get_metadata
from ..data.image_text_loader import build_image_text_loader
from ..data.loader import build_test_loader, build_train_loader
from ..data.mapper import build_inference_mapper
from ..distributed import get_rank, get_world_size, is_main_process
from ..evaluation import ProposalRecallEvaluator, build_evaluator
from ..evaluation.inference import inference_on_dataset
from ..evaluation.results import write_json_atomic
from ..modeling.build import build_model
from .solver import auto_scale_batch, auto_scale_workers
from .trainer import build_trainer, last_checkpoint_path
from .weights import load_weights

logger = logging.getLogger("regionclip")

PRETRAIN_ARCHITECTURE = "PretrainFastRCNN"
ZERO_SHOT_ARCHITECTURE = "CLIPFastRCNN"


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


def setup(args):
    """Load the config from the parsed arguments and prepare the output folder."""
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    setup_logging(cfg.OUTPUT_DIR)
    logger.info("Command line: %s", " ".join(sys.argv))
    seed = seed_everything(cfg.SEED)
    logger.info("Process rank %d, seed %d", get_rank(), seed)
    if is_main_process():
        logger.info("Config written to %s", dump_config(cfg, cfg.OUTPUT_DIR))
    return cfg


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------
def check_vocabulary(model, dataset_name: str) -> None:
    """The classifier (of the model's current mode) must score exactly the dataset's classes,
    in its order. Models without one (an RPN alone) score no classes."""
    if not hasattr(model, "roi_heads"):
        return
    num_dataset = len(get_metadata(dataset_name).thing_classes)
    num_model = model.roi_heads.box_predictor.num_classes
    if num_dataset != num_model:
        raise ValueError(
            f"The model scores {num_model} classes but {dataset_name} has {num_dataset}: set "
            "MODEL.CLIP.TEXT_EMB_PATH (or OPENSET_TEST_TEXT_EMB_PATH) to embeddings of the "
            "dataset's classes, in its category order"
        )


def test(cfg, model) -> dict:
    """Evaluate on every ``DATASETS.TEST``: COCO/LVIS metrics of a detector, or the recall of
    ground-truth boxes by the proposals of a model without ROI heads (an RPN alone); writes
    ``OUTPUT_DIR/inference/{coco,lvis}_instances_results.json`` and ``metrics.json``."""
    results = {}
    output_dir = os.path.join(cfg.OUTPUT_DIR, "inference")
    proposals_only = not hasattr(model, "roi_heads")
    mapper = build_inference_mapper(cfg, keep_annotations=proposals_only)
    model.eval()
    for name in cfg.DATASETS.TEST:
        check_vocabulary(model, name)
        records = get_dataset_dicts(name, input_dir=cfg.INPUT_DIR)
        loader = build_test_loader(records, mapper, cfg.DATALOADER.NUM_WORKERS,
                                   cfg.TEST.IMS_PER_BATCH)
        evaluator = (ProposalRecallEvaluator(output_dir) if proposals_only
                     else build_evaluator(name, output_dir))
        results[name] = inference_on_dataset(model, loader, evaluator)
        if is_main_process():
            logger.info("Results on %s: %s", name, json.dumps(results[name], indent=1))
    if is_main_process() and results:
        write_json_atomic(results, os.path.join(output_dir, "metrics.json"))
    return results


def zero_shot_eval_fn(cfg) -> Optional[Callable[[nn.Module], Dict]]:
    """``fn(pretrainer)`` -> :func:`test` of a zero-shot detector holding the pretrainer's
    current weights; None when ``DATASETS.TEST`` is empty."""
    if not cfg.DATASETS.TEST:
        return None
    if not cfg.MODEL.CLIP.TEXT_EMB_PATH:
        raise ConfigError("Evaluating during pretraining (DATASETS.TEST is set) needs "
                          "MODEL.CLIP.TEXT_EMB_PATH: embeddings of the test classes, in the "
                          "dataset's category order, with MODEL.ROI_HEADS.NUM_CLASSES rows")
    detector_cfg = cfg.clone()
    detector_cfg.defrost()
    detector_cfg.MODEL.META_ARCHITECTURE = ZERO_SHOT_ARCHITECTURE
    detector_cfg.freeze()
    detector = build_model(detector_cfg)  # built once; its weights are refreshed per evaluation

    def evaluate(pretrainer: nn.Module) -> Dict:
        # The detector's keys are a subset of the pretrainer's (official layout), except its
        # class embeddings, which come from TEXT_EMB_PATH.
        report = detector.load_state_dict(pretrainer.state_dict(), strict=False)
        missing = [key for key in report.missing_keys if not key.startswith("roi_heads.")]
        if missing:
            raise RuntimeError(f"The pretrained model lacks detector weights: {missing[:5]}")
        return test(detector_cfg, detector)

    return evaluate


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def _training_data(cfg, model):
    """(loader, evaluation function) of a detection or an image-text (pretraining) config."""
    if cfg.MODEL.META_ARCHITECTURE == PRETRAIN_ARCHITECTURE:
        return build_image_text_loader(cfg), zero_shot_eval_fn(cfg)
    for name in cfg.DATASETS.TRAIN:
        check_vocabulary(model, name)
    return build_train_loader(cfg), lambda module: test(cfg, module)


def train(cfg, model, resume: bool = False) -> dict:
    """Train ``model`` on ``DATASETS.TRAIN``; returns the last evaluation's results."""
    model.train()
    loader, eval_fn = _training_data(cfg, model)
    if not (resume and last_checkpoint_path(cfg.OUTPUT_DIR)):
        load_weights(cfg, model)
    trainer = build_trainer(cfg, model, loader, eval_fn=eval_fn)
    trainer.resume_or_start(resume)
    return trainer.train()


def main(args) -> dict:
    """``tools/train_net.py``: ``--eval-only`` evaluation, or training (``--resume``)."""
    cfg = setup(args)
    model = build_model(cfg)
    if args.eval_only:
        load_weights(cfg, model)
        return test(cfg, model)
    if cfg.SOLVER.REFERENCE_WORLD_SIZE and cfg.SOLVER.REFERENCE_IMS_PER_BATCH:
        raise ValueError("Set SOLVER.REFERENCE_WORLD_SIZE or SOLVER.REFERENCE_IMS_PER_BATCH, not "
                         "both: each rescales the LR and schedule on its own")
    cfg = auto_scale_workers(cfg, get_world_size())
    cfg = auto_scale_batch(cfg, cfg.SOLVER.REFERENCE_IMS_PER_BATCH, get_world_size())
    return train(cfg, model, resume=args.resume)
