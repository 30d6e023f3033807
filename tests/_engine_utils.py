"""A toy model and dataset for training-loop tests: the loop, not the detector, is the subject.

The toy model returns detectron2-style loss dicts whose values are means over the images of
the batch, so one process with batch ``2B`` and two processes with batch ``B`` follow the same
trajectory. Its mapper adds noise drawn from the loader's per-item generator, so data order
and augmentation both show up in the weights.
"""
import json
import os

import numpy as np
import torch
from torch import nn

from regionclip.data.catalog import get_dataset_dicts
from regionclip.data.loader import TrainingLoader
from regionclip.data.samplers import TrainingSampler
from regionclip.engine.solver import LRMultiplier, lr_multiplier, optimizer_param_groups
from regionclip.engine.trainer import Trainer
from regionclip.structures import Boxes, Instances

IN_FEATURES = 4


class Killed(RuntimeError):
    """Stands in for a process killed in the middle of a run."""


class ToyModel(nn.Module):
    """Linear regression with a normalisation layer, a frozen layer and dropout."""

    def __init__(self, kill_at_call: int = -1):
        super().__init__()
        self.norm = nn.LayerNorm(IN_FEATURES)
        self.frozen = nn.Linear(IN_FEATURES, IN_FEATURES)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(IN_FEATURES, 1)
        self.dropout = nn.Dropout(0.2)  # consumes the torch RNG: resuming must restore it
        self.kill_at_call = kill_at_call
        self.calls = 0

    def forward(self, batch):
        if self.calls == self.kill_at_call:
            raise Killed(f"killed at call {self.calls}")
        self.calls += 1
        x = torch.stack([item["x"] for item in batch])
        y = torch.stack([item["y"] for item in batch])
        pred = self.head(self.dropout(self.norm(self.frozen(x))))
        return {"loss_mse": ((pred - y) ** 2).mean(), "loss_l1": 0.1 * (pred - y).abs().mean()}


def toy_records(num: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=IN_FEATURES).astype(np.float32),
             "y": rng.normal(size=1).astype(np.float32), "width": 4, "height": 3}
            for _ in range(num)]


def toy_mapper(record, rng):
    noise = rng.normal(scale=0.1, size=IN_FEATURES).astype(np.float32)
    return {"x": torch.from_numpy(record["x"] + noise), "y": torch.from_numpy(record["y"])}


def make_trainer(output_dir, max_iter=8, batch_size=2, checkpoint_period=0, kill_at_call=-1,
                 rank=None, world_size=None, seed=7, **options):
    """A fresh toy model, loader, SGD and warm-up + step schedule, wrapped in ``Trainer``."""
    torch.manual_seed(0)
    model = ToyModel(kill_at_call)
    sampler = TrainingSampler(len(toy_records()), seed=seed, rank=rank, world_size=world_size)
    loader = TrainingLoader(toy_records(), toy_mapper, sampler, batch_size)
    optimizer = torch.optim.SGD(optimizer_param_groups(model, 0.05, 1e-4, 0.0), lr=0.05,
                                momentum=0.9)
    schedule = lr_multiplier("WarmupMultiStepLR", max_iter, (max_iter // 2,), 0.1, 0.1, 2)
    scheduler = LRMultiplier(optimizer, schedule, max_iter)
    options.setdefault("tensorboard", False)
    return Trainer(model, loader, optimizer, scheduler, max_iter=max_iter,
                   output_dir=str(output_dir), checkpoint_period=checkpoint_period,
                   log_period=1, **options)


def record_losses(trainer):
    """A list that fills with each iteration's total loss (averaged over processes)."""
    totals = []
    run_step = trainer.run_step

    def recording_step(iteration, batch):
        losses = run_step(iteration, batch)
        totals.append(sum(losses.values()))
        return losses

    trainer.run_step = recording_step
    return totals


def read_json_lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def train_and_record(output_dir, world_batch, result_file):
    """Worker of the distributed test: train the toy model, write losses and weights."""
    from regionclip.distributed import get_rank, get_world_size

    torch.set_num_threads(1)
    trainer = make_trainer(output_dir, max_iter=6, batch_size=world_batch // get_world_size())
    trainer.module.dropout.p = 0.0  # dropout masks differ per process; the data must not
    losses = record_losses(trainer)
    trainer.train()
    if get_rank() == 0:
        state = {k: v.tolist() for k, v in trainer.module.state_dict().items()}
        with open(result_file, "w") as f:
            json.dump({"losses": losses, "state": state}, f)


class GroundTruthDetector(nn.Module):
    """Predicts each image's ground-truth boxes, shifted by an image-dependent amount so that
    the metrics are neither perfect nor trivial (inputs at the original size)."""

    def forward(self, inputs):
        outputs = []
        for item in inputs:
            gt = item["instances"]
            boxes = gt.gt_boxes.tensor + (item["image_id"] % 3) * 2.0
            scores = torch.linspace(0.9, 0.5, len(gt))
            outputs.append({"instances": Instances(
                (item["height"], item["width"]), pred_boxes=Boxes(boxes), scores=scores,
                pred_classes=gt.gt_classes)})
        return outputs


def evaluate_sharded(json_path, image_dir, result_file):
    """Worker of the distributed test: sharded inference, gathered evaluation."""
    from regionclip.data.loader import build_test_loader
    from regionclip.data.mapper import InferenceMapper
    from regionclip.distributed import get_rank
    from regionclip.evaluation import COCOEvaluator
    from regionclip.evaluation.inference import inference_on_dataset

    torch.set_num_threads(1)
    records = get_dataset_dicts(f"coco_json:{json_path}:{image_dir}")
    loader = build_test_loader(records, InferenceMapper(min_size=0, keep_annotations=True))
    results = inference_on_dataset(GroundTruthDetector(), loader, COCOEvaluator(json_path))
    if get_rank() == 0:
        with open(result_file, "w") as f:
            json.dump({"results": results, "shard": len(loader)}, f)


def distributed_checks(folder, json_path, image_dir):
    """Worker of the distributed tests (one launch for both, to start processes once). The
    one-process run is the test process itself: its thread count is restored afterwards."""
    threads = torch.get_num_threads()
    try:
        train_and_record(os.path.join(folder, "train"), 4, os.path.join(folder, "train.json"))
        evaluate_sharded(json_path, image_dir, os.path.join(folder, "eval.json"))
    finally:
        torch.set_num_threads(threads)
