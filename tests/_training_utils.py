"""Shapes data, random initialisation, training and metrics for the training tests.

The data are `_data_utils` images of coloured rectangles, five categories told apart by colour
only, drawn at 48 x 64 and fed at 192 x 256 so that objects span 24-128 px (1.5-8 cells of a
stride-16 feature map). `trained_rpn` trains the tiny R50-C4 RPN once per test session; the
detector test uses its checkpoint as the offline RPN, as a user would. Both train with the
shared `regionclip.engine.trainer`.
"""
import contextlib
import functools
import os
import tempfile
from dataclasses import dataclass
from typing import Dict, Iterator, List

import torch
from _data_utils import make_coco_dataset
from _rpn_utils import CONFIGS, randomize_

from regionclip.checkpoint import save_checkpoint
from regionclip.config import load_config
from regionclip.data.catalog import get_dataset_dicts
from regionclip.data.mapper import InferenceMapper
from regionclip.engine.trainer import build_trainer
from regionclip.evaluation import COCOEvaluator
from regionclip.evaluation.inference import inference_on_dataset
from regionclip.modeling.build import build_model
from regionclip.structures import pairwise_iou

NUM_CLASSES = 5
CATEGORIES = tuple({"id": i + 1, "name": f"shape{i}"} for i in range(NUM_CLASSES))
DRAWN_SIZE = (48, 64)
INPUT_SIZE = 192  # short side fed to the models
NUM_TRAIN, NUM_TEST = 100, 30
# The test RPN: tiny R50-C4 with anchors sized for these objects, 100 proposals per image.
RPN_CONFIG = f"""_BASE_: "{CONFIGS / 'tests' / 'tiny_rpn_c4.yaml'}"
MODEL:
  META_ARCHITECTURE: "ProposalNetwork"
  DEVICE: "cpu"
  ANCHOR_GENERATOR:
    SIZES: [[32, 64, 128]]
  RPN:
    PRE_NMS_TOPK_TEST: 300
    POST_NMS_TOPK_TEST: 100
"""
RPN_STEPS = dict(iterations=300, batch_size=4, lr=0.1)


@dataclass(frozen=True)
class Split:
    json_file: str
    image_dir: str

    def inputs(self, image_format: str) -> List[Dict]:
        """Model inputs with ``instances`` at the input size (``height``/``width`` original)."""
        records = get_dataset_dicts(f"coco_json:{self.json_file}:{self.image_dir}")
        mapper = InferenceMapper(INPUT_SIZE, 2 * INPUT_SIZE, image_format, keep_annotations=True)
        return [mapper(r) for r in records]


@functools.lru_cache(maxsize=None)
def _session_folder() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="regionclip_training_")


def workspace() -> str:
    """A folder that lives as long as the test session (removed when Python exits)."""
    return _session_folder().name


@functools.lru_cache(maxsize=None)
def shapes_dataset():
    """(train, test) splits: disjoint random images, 3 objects each."""
    splits = []
    for name, count, seed in (("train", NUM_TRAIN, 1), ("test", NUM_TEST, 2)):
        json_file, image_dir = make_coco_dataset(
            os.path.join(workspace(), name), num_images=count, categories=CATEGORIES,
            image_size=DRAWN_SIZE, boxes_per_image=3, seed=seed)
        splits.append(Split(json_file, image_dir))
    return tuple(splits)


def rpn_config_file() -> str:
    path = os.path.join(workspace(), "rpn.yaml")
    with open(path, "w") as f:
        f.write(RPN_CONFIG)
    return path


def calibrated_random_init_(module: torch.nn.Module, forward, batch: torch.Tensor, seed=0):
    """Random conv weights, and frozen-BN statistics set from ``forward(batch)``.

    Frozen BN with default statistics would leave a random deep network unnormalised, and
    open_clip's zero-initialised ``bn3`` would keep every CLIP residual branch at zero.
    """
    class Runner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.module = module

        def forward(self, x):
            return forward(x)

    randomize_(Runner(), seed=seed, calibration_input=batch)
    return module


@contextlib.contextmanager
def single_thread():
    """Run torch on one thread: these models are so small that a second intra-op thread only
    adds synchronisation, and on a busy 2-core machine it slows training down several times."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _batches(inputs: List[Dict], batch_size: int, seed: int) -> Iterator[List[Dict]]:
    order = torch.Generator().manual_seed(seed)
    while True:
        yield [inputs[i] for i in torch.randint(len(inputs), (batch_size,), generator=order)]


@single_thread()
def train(model, cfg, inputs: List[Dict], iterations: int, batch_size: int, lr: float,
          seed: int = 0) -> None:
    """The shared trainer: SGD (momentum 0.9, weight decay 1e-4), 20-iteration linear warm-up,
    full-model gradient-norm clipping at 5, no checkpoints; leaves the model in eval mode."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.merge_from_list([
        "SOLVER.BASE_LR", lr, "SOLVER.MAX_ITER", iterations, "SOLVER.STEPS", (),
        "SOLVER.WARMUP_ITERS", 20, "SOLVER.IMS_PER_BATCH", batch_size,
        "SOLVER.CLIP_GRADIENTS.ENABLED", True, "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "full_model",
        "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", 5.0,
    ])
    torch.manual_seed(seed)
    build_trainer(cfg, model, _batches(inputs, batch_size, seed), output_dir="",
                  tensorboard=False, log_period=iterations).train()
    model.eval()


@single_thread()
@torch.no_grad()
def proposal_recall(model, inputs: List[Dict], iou: float, top_k: int = 100) -> float:
    """Share of ground-truth boxes that one of the top ``top_k`` proposals covers at ``iou``."""
    model.eval()
    covered = total = 0
    for x in inputs:
        height, width = x["image"].shape[-2:]
        proposals = model([{**x, "height": height, "width": width}])[0]["proposals"][:top_k]
        quality = pairwise_iou(x["instances"].gt_boxes, proposals.proposal_boxes)
        covered += int((quality.max(dim=1).values >= iou).sum())
        total += len(quality)
    return covered / total


@single_thread()
def detection_ap50(model, inputs: List[Dict], json_file: str) -> float:
    """COCO AP50 (percent) of the model's detections on ``inputs``."""
    metrics = inference_on_dataset(model, [[x] for x in inputs], COCOEvaluator(json_file, ""))
    return metrics["bbox"]["AP50"]


def build_rpn():
    """(the test RPN from random init, with norm statistics calibrated on training images;
    its config)."""
    torch.manual_seed(0)
    cfg = load_config(rpn_config_file())
    model = build_model(cfg)
    train_split, _ = shapes_dataset()
    batch = model.preprocess(train_split.inputs("BGR")[:16]).tensor
    calibrated_random_init_(model.backbone, model.backbone, batch)
    return model, cfg


@functools.lru_cache(maxsize=None)
def trained_rpn():
    """(checkpoint path, held-out recall@100 at IoU 0.5, at IoU 0.7) of the test RPN."""
    train_split, test = shapes_dataset()
    model, cfg = build_rpn()
    train(model, cfg, train_split.inputs("BGR"), **RPN_STEPS)
    path = os.path.join(workspace(), "rpn_final.pth")
    save_checkpoint(path, model.state_dict())
    held_out = test.inputs("BGR")
    return path, proposal_recall(model, held_out, 0.5), proposal_recall(model, held_out, 0.7)
