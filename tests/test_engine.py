"""The training loop (checkpoints, resume, metrics, reported scalars, non-finite losses, AMP)
on a toy model; the solver's parts are in test_solver.py."""
import json
import math
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _data_utils import make_coco_dataset
from _engine_utils import ToyModel, make_trainer, read_json_lines, record_losses
from _tool_utils import run_train_net

from regionclip.checkpoint import read_checkpoint
from regionclip.engine.process_state import capture_rng_state, release_freed_heap, restore_rng_state
from regionclip.engine.trainer import last_checkpoint_path
from regionclip.events import put_scalar

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    # tiny tensors: thread start-up costs more than the arithmetic on a shared CI machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _NaNAt(ToyModel):
    def forward(self, batch):
        losses = super().forward(batch)
        if self.calls == 4:
            losses["loss_mse"] = losses["loss_mse"] * float("nan")
        return losses


def test_non_finite_loss_names_iteration_and_losses(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.module.__class__ = _NaNAt
    weights = {k: v.clone() for k, v in trainer.module.state_dict().items()}
    with pytest.raises(FloatingPointError, match=r"iteration 3: total_loss=nan.*loss_mse=nan"):
        trainer.train()
    trainer_weights = trainer.module.state_dict()
    assert not all(torch.equal(weights[k], trainer_weights[k]) for k in weights)
    assert all(torch.isfinite(v).all() for v in trainer_weights.values())  # no NaN step taken


class _Predicting(ToyModel):
    def forward(self, batch):
        return [{"instances": None} for _ in batch]


def test_model_must_return_loss_dict(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.module.__class__ = _Predicting
    with pytest.raises(TypeError, match="dict of scalar losses"):
        trainer.train()


def test_metrics_json_tensorboard_and_evaluation(tmp_path):
    calls = []

    def evaluate(model):
        calls.append(model.training)
        return {"toy_val": {"bbox": {"AP": 50.0 + len(calls)}}}

    trainer = make_trainer(tmp_path, max_iter=5, eval_period=2, eval_fn=evaluate,
                           tensorboard=True)
    results = trainer.train()
    assert calls == [False, False, False]  # iterations 2, 4 and the end; in eval mode
    assert results == {"toy_val": {"bbox": {"AP": 53.0}}}
    assert trainer.module.training
    lines = read_json_lines(tmp_path / "metrics.json")
    train_lines = [line for line in lines if "total_loss" in line]
    assert [line["iteration"] for line in train_lines] == [0, 1, 2, 3, 4]
    for line in train_lines:
        assert {"lr", "time", "data_time", "loss_mse", "loss_l1"} <= set(line)
        assert line["total_loss"] > 0
    eval_lines = [line for line in lines if "toy_val/bbox/AP" in line]
    assert [(line["iteration"], line["toy_val/bbox/AP"]) for line in eval_lines] == \
        [(1, 51.0), (3, 52.0), (4, 53.0)]
    events = os.listdir(tmp_path / "tensorboard")
    assert any(name.startswith("events.out.tfevents") for name in events)


class _Reporting(ToyModel):
    def forward(self, batch):
        put_scalar("toy/calls", torch.tensor(self.calls + 1.0))
        return super().forward(batch)


def test_scalars_a_model_puts_are_logged_with_the_losses(tmp_path):
    trainer = make_trainer(tmp_path, max_iter=4)
    trainer.module.__class__ = _Reporting
    put_scalar("stale", 1.0)  # put before the run: not one of its iterations
    trainer.train()
    lines = [line for line in read_json_lines(tmp_path / "metrics.json") if "total_loss" in line]
    # the median over the window of the calls so far (log period 1)
    assert [line["toy/calls"] for line in lines] == [1.0, 1.5, 2.0, 2.5]
    assert not any("stale" in line for line in lines)


def test_checkpoints_are_periodic_bounded_and_complete(tmp_path):
    trainer = make_trainer(tmp_path, max_iter=8, checkpoint_period=2, keep_checkpoints=2)
    trainer.train()
    names = sorted(n for n in os.listdir(tmp_path) if n.endswith(".pth"))
    assert names == ["model_0000003.pth", "model_0000005.pth", "model_final.pth"]
    assert last_checkpoint_path(str(tmp_path)) == str(tmp_path / "model_final.pth")
    state = read_checkpoint(str(tmp_path / "model_0000005.pth"))  # weights_only load
    assert state["iteration"] == 6
    assert {"model", "optimizer", "scheduler", "rng", "data"} <= set(state)
    assert state["scheduler"] == {"base_lrs": [0.05, 0.05], "last_epoch": 6}
    assert len(state["rng"]) == 1 and {"python", "numpy", "torch"} <= set(state["rng"][0])
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def _eval_consuming_rng(model):
    torch.rand(5)  # evaluation must not shift the training's random stream
    return {}


def test_kill_and_resume_equals_uninterrupted_run(tmp_path):
    straight = make_trainer(tmp_path / "straight", max_iter=9, checkpoint_period=3,
                            eval_period=2, eval_fn=_eval_consuming_rng)
    straight_losses = record_losses(straight)
    straight.train()

    killed = make_trainer(tmp_path / "resumed", max_iter=9, checkpoint_period=3,
                          kill_at_call=5, eval_period=2, eval_fn=_eval_consuming_rng)
    with pytest.raises(RuntimeError, match="killed"):
        killed.train()
    torch.manual_seed(123)  # a new process starts with other random states
    resumed = make_trainer(tmp_path / "resumed", max_iter=9, checkpoint_period=3,
                           eval_period=2, eval_fn=_eval_consuming_rng, seed=999)
    assert resumed.resume_or_start(resume=True)
    assert resumed.start_iter == 3
    assert resumed.data_loader.sampler.seed == 7  # the data seed comes from the checkpoint
    resumed_losses = record_losses(resumed)
    resumed.train()

    assert resumed_losses == pytest.approx(straight_losses[3:], rel=1e-6)
    for key, value in straight.module.state_dict().items():
        torch.testing.assert_close(resumed.module.state_dict()[key], value)
    iterations = [line["iteration"] for line in
                  read_json_lines(tmp_path / "resumed" / "metrics.json")]
    assert iterations == list(range(9))  # the killed run's lines after the checkpoint are gone


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    trainer = make_trainer(tmp_path)
    assert not trainer.resume_or_start(resume=True)
    assert trainer.start_iter == 0


def test_amp_bfloat16_on_cpu(tmp_path):
    dtypes = []

    class Recording(ToyModel):
        def forward(self, batch):
            dtypes.append(self.head(torch.zeros(1, 4)).dtype)
            return super().forward(batch)

    trainer = make_trainer(tmp_path, max_iter=3, amp=True)
    trainer.module.__class__ = Recording
    losses = record_losses(trainer)
    trainer.train()
    assert dtypes == [torch.bfloat16] * 3
    assert all(math.isfinite(v) for v in losses)
    assert trainer.scaler is None  # no loss scaling for bfloat16
    assert trainer.module.head.weight.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# tools/train_net.py with the tiny detector
# ---------------------------------------------------------------------------------------------
def test_train_net_trains_evaluates_and_resumes(tmp_path):
    json_path, image_dir = make_coco_dataset(tmp_path / "data", num_images=6, image_size=(48, 64))
    dataset = f'("coco_json:{json_path}:{image_dir}",)'

    def run(output_dir, max_iter, *flags):
        return run_train_net([
            *flags, "--config-file", str(REPO / "configs" / "tests" / "tiny.yaml"),
            "DATASETS.TRAIN", dataset, "DATASETS.TEST", dataset, "OUTPUT_DIR", str(output_dir),
            "SOLVER.MAX_ITER", str(max_iter), "SOLVER.CHECKPOINT_PERIOD", "2",
            "INPUT.MIN_SIZE_TRAIN", "(40, 48, 56)", "SOLVER.BASE_LR", "0.01",
        ])

    straight = run(tmp_path / "straight", 4)
    run(tmp_path / "resumed", 2)
    resumed = run(tmp_path / "resumed", 4, "--resume")
    assert set(straight) == {f"coco_json:{json_path}:{image_dir}"}
    assert resumed == straight
    final = {name: read_checkpoint(str(tmp_path / name / "model_final.pth"))
             for name in ("straight", "resumed")}
    assert final["resumed"]["iteration"] == 4
    for key, value in final["straight"]["model"].items():
        torch.testing.assert_close(final["resumed"]["model"][key], value)
    with open(tmp_path / "resumed" / "log.txt") as f:
        assert "Resumed from" in f.read()
    lines = read_json_lines(tmp_path / "straight" / "metrics.json")
    assert {"loss_cls", "loss_box_reg"} <= set(lines[0])
    evaluated = run_train_net(["--eval-only", "--config-file",
                           str(REPO / "configs" / "tests" / "tiny.yaml"),
                           "MODEL.WEIGHTS", str(tmp_path / "straight" / "model_final.pth"),
                           "DATASETS.TEST", dataset, "OUTPUT_DIR", str(tmp_path / "eval")])
    assert evaluated == straight


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap")
def test_release_freed_heap_returns_fragmented_pages_to_the_os():
    """Freed tensors below glibc's mmap threshold stay resident while live ones sit between
    them; the trainer's per-step release hands those pages back."""
    def resident_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    freed, pinned = [], []
    for i in range(1600):  # 1600 x ~60 KB = ~94 MB
        freed.append(torch.ones(15 * 1024 + i))
        pinned.append(torch.ones(16))
    del freed
    before = resident_mb()
    release_freed_heap()
    assert before - resident_mb() > 50, "fewer than 50 of the ~94 MB freed were returned"


def test_eval_only_keeps_each_test_datasets_results_and_writes_strict_json(tmp_path):
    """Two test datasets: each keeps its own results file (a subfolder each), and metrics.json
    holds both, NaN metrics as null (strict json)."""
    names = []
    for num_images, folder in ((2, "first"), (3, "second")):
        json_path, image_dir = make_coco_dataset(tmp_path / folder, num_images=num_images,
                                                 image_size=(48, 64))
        names.append(f"coco_json:{json_path}:{image_dir}")
    run_train_net(["--eval-only", "--config-file", str(REPO / "configs" / "tests" / "tiny.yaml"),
                   "DATASETS.TEST", str(tuple(names)), "OUTPUT_DIR", str(tmp_path / "eval"),
                   "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"])
    inference = tmp_path / "eval" / "inference"
    assert not (inference / "coco_instances_results.json").exists()
    for folder, num_images in (("first", 2), ("second", 3)):
        [results] = inference.glob(f"*_{folder}_images/coco_instances_results.json")
        assert len({r["image_id"] for r in json.loads(results.read_text())}) == num_images

    def refuse(constant):
        raise ValueError(f"{constant} is not json")
    metrics = json.loads((inference / "metrics.json").read_text(), parse_constant=refuse)
    assert set(metrics) == set(names)
    assert None in metrics[names[0]]["bbox"].values()  # an area range without objects


def test_cudnn_benchmark_applies_to_training(tmp_path, monkeypatch):
    json_path, image_dir = make_coco_dataset(tmp_path / "data", num_images=2, image_size=(48, 64))
    dataset = f'("coco_json:{json_path}:{image_dir}",)'
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # restored after the test
    run_train_net(["--config-file", str(REPO / "configs" / "tests" / "tiny.yaml"),
                   "DATASETS.TRAIN", dataset, "DATASETS.TEST", "()", "SOLVER.MAX_ITER", "1",
                   "CUDNN_BENCHMARK", "True", "OUTPUT_DIR", str(tmp_path / "out")])
    assert torch.backends.cudnn.benchmark


def test_rng_state_round_trips_and_resumes_on_fewer_gpus(monkeypatch):
    state = capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1))
    restore_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
    restored = []  # a checkpoint of two GPUs resumed where one is visible
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.extend)
    restore_rng_state({**state, "cuda": ["gpu 0", "gpu 1"]})
    assert restored == ["gpu 0"]
