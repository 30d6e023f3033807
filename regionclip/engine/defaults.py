"""What ``tools/train_net.py`` does: detectron2's command line and run setup (config, output
folder, logging, seed), evaluation of every test dataset, and training.

Training runs on ``DATASETS.TRAIN``: detection datasets (catalog names, or
``coco_json:<json>:<image_dir>``), or image-caption data for a ``PretrainFastRCNN`` config
(``DATASETS.TRAIN`` / ``FACTORY_TRAIN`` / ``PATH_TRAIN``, see ``regionclip/data/image_text.py``).
A pretraining run has no class vocabulary to check and evaluates only when ``DATASETS.TEST`` is
set: then the student is evaluated as a zero-shot detector, a ``CLIPFastRCNN`` built from the
same config (``MODEL.CLIP.TEXT_EMB_PATH`` holding the test classes' embeddings) that gets the
student trunk and offline RPN weights, as it would from a saved pretraining checkpoint.

Bad input (a file, key or value) reaches the command line as one line, printed once, and exit
status 1; ``REGIONCLIP_DEBUG=1`` shows its traceback instead.
"""
import argparse
import contextlib
import json
import logging
import os
import random
import re
import sys
import time
from typing import Callable, Dict, NoReturn, Optional

import numpy as np
import torch
from torch import nn
from torch.multiprocessing import ProcessExitedException

from ..checkpoint import CheckpointError
from ..config import ConfigError, dump_config, load_config
from ..data.catalog import get_dataset_dicts, get_metadata
from ..data.image_text_loader import build_image_text_loader
from ..data.loader import build_test_loader, build_train_loader, check_same_classes
from ..data.mapper import build_inference_mapper
from ..distributed import get_rank, get_world_size, is_main_process, launch
from ..evaluation import ProposalRecallEvaluator, build_evaluator
from ..evaluation.inference import inference_on_dataset
from ..evaluation.results import finite_or_null, write_json_atomic
from ..modeling.build import build_model
from ..modeling.detic.build import test_classifier
from .output_dir import OutputDirLock, check_previous_run, tidy
from .preflight import MissingInputsError, check_inputs, config_inputs
from .solver import auto_scale_batch, auto_scale_workers
from .trainer import build_trainer, last_checkpoint_path
from .weights import load_weights

logger = logging.getLogger("regionclip")

# Trained on image-caption pairs: RegionCLIP pretraining, and a CLIP trained from scratch.
IMAGE_TEXT_ARCHITECTURES = ("PretrainFastRCNN", "CLIP")
# The detector that evaluates a pretraining run: what every zero-shot config sets, where a
# pretraining config leaves detectron2's defaults.
ZERO_SHOT_DETECTOR = ["MODEL.META_ARCHITECTURE", "CLIPFastRCNN",
                      "MODEL.CLIP.USE_TEXT_EMB_CLASSIFIER", True,
                      "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", True]
DEBUG_ENV = "REGIONCLIP_DEBUG"
USER_ERRORS = (OSError, ValueError, CheckpointError)  # bad input, not bugs: no traceback
USER_ERROR_STATUS = 1
# How long a process other than the main one waits before printing its error: an error that
# every process meets is printed by the main one, and the launcher stops the others meanwhile.
_WORKER_ERROR_DELAY_S = 5.0


def default_argument_parser(description: str = "RegionCLIP training and evaluation",
                            training: bool = True):
    """The flags users of detectron2 and of the original RegionCLIP already type. A tool that
    neither trains nor launches processes (``training`` False) accepts the training and launch
    flags, as the original's did, and says in ``--help`` that they change nothing."""
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Trailing KEY VALUE pairs override config keys, e.g. MODEL.WEIGHTS path.pth",
    )

    def explain(text: Optional[str]) -> str:
        return text if training else "no effect here (one process, nothing trained)"

    parser.add_argument("--config-file", default="", metavar="FILE", help="path to config file")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help=explain("resume from the last checkpoint in OUTPUT_DIR"))
    start.add_argument("--overwrite", action="store_true",
                       help=explain("start a new training run in an OUTPUT_DIR that holds "
                                    "another one, deleting its checkpoints and metrics"))
    parser.add_argument("--eval-only", action="store_true", help=explain("only run evaluation"))
    parser.add_argument("--num-gpus", type=int, default=1, help=explain("processes per machine"))
    parser.add_argument("--num-machines", type=int, default=1, help=explain(None))
    parser.add_argument("--machine-rank", type=int, default=0,
                        help=explain("rank of this machine"))
    parser.add_argument("--dist-url", default="auto",
                        help=explain("initialisation URL for the process group, e.g. "
                                     "tcp://host:port"))
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


@contextlib.contextmanager
def setup(args):
    """``with setup(args) as cfg:`` the run's config, with OUTPUT_DIR held by this run for
    the block (see ``output_dir.py``), logging set up, seeds set and the config written.

    Nothing is written before the folder is held: a second run into a folder in use, or a
    new training run over a previous one (neither ``--resume`` nor ``--overwrite``), fails
    without touching it. Before that, every input the config names is checked (all missing
    ones are reported at once, see ``preflight.py``).
    """
    cfg = load_config(args.config_file, args.opts)
    cfg.OUTPUT_DIR = auto_output_dir(cfg.OUTPUT_DIR, args.config_file)
    cfg.freeze()
    owner = is_main_process() and bool(cfg.OUTPUT_DIR)
    training = not args.eval_only
    resuming = training and args.resume and bool(last_checkpoint_path(cfg.OUTPUT_DIR))
    check_inputs(config_inputs(cfg, training, weights=not resuming))
    with OutputDirLock(cfg.OUTPUT_DIR) if owner else contextlib.nullcontext() as lock:
        if owner and training:
            check_previous_run(cfg.OUTPUT_DIR, args.resume, args.overwrite)
        setup_logging(cfg.OUTPUT_DIR)
        logger.info("Command line: %s", " ".join(sys.argv))
        if owner:
            tidy(lock, overwrite=training and args.overwrite)
        seed = seed_everything(cfg.SEED)
        logger.info("Process rank %d, seed %d", get_rank(), seed)
        if training:  # as detectron2: autotuned convolutions are not bit-reproducible
            torch.backends.cudnn.benchmark = cfg.CUDNN_BENCHMARK
        if is_main_process():
            logger.info("Config written to %s", dump_config(cfg, cfg.OUTPUT_DIR))
        yield cfg


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


def dataset_results_dir(output_dir: str, dataset: str, num_datasets: int) -> str:
    """Where one test dataset's results file goes: ``output_dir`` itself when it is the only
    one (detectron2's layout), else a subfolder named after it, so that no dataset's results
    file replaces another's (Detic's ``RESET_CLS_TESTS`` runs test on several)."""
    if num_datasets == 1:
        return output_dir
    return os.path.join(output_dir, re.sub(r"[^\w.-]+", "_", dataset).strip("_"))


def test(cfg, model) -> dict:
    """Evaluate on every ``DATASETS.TEST``: COCO/LVIS metrics of a detector, or the recall of
    ground-truth boxes by the proposals of a model without ROI heads (an RPN alone); writes
    ``OUTPUT_DIR/inference/{coco,lvis}_instances_results.json`` (with several test datasets,
    one subfolder each: :func:`dataset_results_dir`) and ``metrics.json`` (all datasets)."""
    results = {}
    output_dir = os.path.join(cfg.OUTPUT_DIR, "inference")
    proposals_only = not hasattr(model, "roi_heads")
    mapper = build_inference_mapper(cfg, keep_annotations=proposals_only)
    model.eval()
    for index, name in enumerate(cfg.DATASETS.TEST):
        if cfg.MODEL.RESET_CLS_TESTS:  # Detic: one classifier per test dataset
            model.set_test_classifier(test_classifier(cfg, index))
        check_vocabulary(model, name)
        records = get_dataset_dicts(name, input_dir=cfg.INPUT_DIR)
        loader = build_test_loader(records, mapper, cfg.DATALOADER.NUM_WORKERS,
                                   cfg.TEST.IMS_PER_BATCH)
        results_dir = dataset_results_dir(output_dir, name, len(cfg.DATASETS.TEST))
        evaluator = (ProposalRecallEvaluator(results_dir) if proposals_only
                     else build_evaluator(name, results_dir))
        results[name] = inference_on_dataset(model, loader, evaluator)
        if is_main_process():
            logger.info("Results on %s: %s", name, json.dumps(results[name], indent=1))
    if is_main_process() and results:
        write_json_atomic(finite_or_null(results), os.path.join(output_dir, "metrics.json"))
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
    detector_cfg.merge_from_list(ZERO_SHOT_DETECTOR)
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
    if cfg.MODEL.META_ARCHITECTURE in IMAGE_TEXT_ARCHITECTURES:
        return build_image_text_loader(cfg), zero_shot_eval_fn(cfg)
    check_same_classes(cfg.DATASETS.TRAIN)
    check_vocabulary(model, cfg.DATASETS.TRAIN[0])  # one class list for all of them
    return build_train_loader(cfg), lambda module: test(cfg, module)


def train(cfg, model, resume: bool = False) -> dict:
    """Train ``model`` on ``DATASETS.TRAIN``; returns the last evaluation's results."""
    model.train()
    loader, eval_fn = _training_data(cfg, model)
    if not (resume and last_checkpoint_path(cfg.OUTPUT_DIR)):
        load_weights(cfg, model, training=True)
    trainer = build_trainer(cfg, model, loader, eval_fn=eval_fn)
    trainer.resume_or_start(resume)
    return trainer.train()


def main(args) -> dict:
    """``tools/train_net.py``: ``--eval-only`` evaluation, or training (``--resume``, or
    ``--overwrite`` to replace a previous run in OUTPUT_DIR)."""
    with setup(args) as cfg:
        model = build_model(cfg)
        if args.eval_only:
            load_weights(cfg, model)
            return test(cfg, model)
        if cfg.SOLVER.REFERENCE_WORLD_SIZE and cfg.SOLVER.REFERENCE_IMS_PER_BATCH:
            raise ValueError("Set SOLVER.REFERENCE_WORLD_SIZE or SOLVER.REFERENCE_IMS_PER_BATCH, "
                             "not both: each rescales the LR and schedule on its own")
        cfg = auto_scale_workers(cfg, get_world_size())
        cfg = auto_scale_batch(cfg, cfg.SOLVER.REFERENCE_IMS_PER_BATCH, get_world_size())
        return train(cfg, model, resume=args.resume)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is bad input to report as one line (never with ``REGIONCLIP_DEBUG=1``)."""
    return isinstance(err, USER_ERRORS) and os.environ.get(DEBUG_ENV, "0") in ("", "0")


def user_error_line(command: str, err: BaseException) -> str:
    """``err`` as one line: its message's lines joined (a list of missing inputs keeps its
    one line per input)."""
    if isinstance(err, MissingInputsError):
        return f"{command}: error: {err}"
    return f"{command}: error: " + " ".join(part.strip() for part in str(err).splitlines())


def run_tool(main: Callable[[], object], command: str) -> int:
    """A one-process tool's ``main`` with bad input reported as one line; the exit status."""
    try:
        main()
    except Exception as err:
        if not is_user_error(err):
            raise
        print(user_error_line(command, err), file=sys.stderr, flush=True)
        return USER_ERROR_STATUS
    return 0


def run(args) -> int:
    """``tools/train_net.py``: :func:`main` in one process per GPU; returns the exit status."""
    try:
        launch(_main_reporting_user_errors, args.num_gpus, args.num_machines, args.machine_rank,
               args.dist_url, (args,))
    except ProcessExitedException as err:  # a worker printed its user error and exited
        if err.exit_code != USER_ERROR_STATUS:
            raise
        return USER_ERROR_STATUS
    return 0


def _main_reporting_user_errors(args) -> None:
    try:
        main(args)
    except Exception as err:
        if not is_user_error(err):
            raise
        _exit_reporting(err)


def _exit_reporting(err: BaseException) -> NoReturn:
    """Print ``err`` as one line, once over all processes, and end this one with status 1."""
    if get_rank() > 0:
        time.sleep(_WORKER_ERROR_DELAY_S)
    print(user_error_line("train_net", err), file=sys.stderr, flush=True)
    if get_world_size() == 1:
        raise SystemExit(USER_ERROR_STATUS)
    # Leave at once: ending the process group would wait for the other processes, and the
    # launcher stops them only once this one is gone.
    logging.shutdown()
    sys.stdout.flush()
    os._exit(USER_ERROR_STATUS)
