"""Solver: parameter groups, LR schedules, gradient clipping, batch and worker scaling."""
import logging
import math

import pytest
import torch
from torch import nn

from regionclip.config import get_cfg
from regionclip.engine.solver import (
    LRMultiplier,
    auto_scale_batch,
    auto_scale_workers,
    build_gradient_clipper,
    build_lr_scheduler,
    build_optimizer,
    gradient_clipper,
    lr_multiplier,
    optimizer_param_groups,
)


def _lrs(name, max_iter, steps=(), warmup_iters=0, warmup_method="linear", base_lr=0.1,
         warmup_factor=0.001):
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base_lr)
    multiplier = lr_multiplier(name, max_iter, steps, 0.1, warmup_factor, warmup_iters,
                               warmup_method)
    scheduler = LRMultiplier(optimizer, multiplier, max_iter)
    lrs = []
    for _ in range(max_iter):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_warmup_multistep_schedule():
    lrs = _lrs("WarmupMultiStepLR", 20, steps=(10, 15), warmup_iters=5)
    expected = [0.1 * (0.001 + 0.999 * t / 5) if t < 5 else
                0.1 if t < 10 else 0.01 if t < 15 else 0.001 for t in range(20)]
    assert lrs == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_constant_warmup_and_steps_beyond_max_iter(caplog):
    with caplog.at_level(logging.WARNING, logger="regionclip"):
        lrs = _lrs("WarmupMultiStepLR", 10, steps=(6, 50), warmup_iters=3,
                   warmup_method="constant")
    assert "ignored" in caplog.text
    expected = [1e-4] * 3 + [0.1] * 3 + [0.01] * 4
    assert lrs == pytest.approx(expected, rel=1e-9)


def test_a_step_at_max_iter_is_ignored(caplog):
    """fvcore refuses a milestone equal to the number of updates; such a step changes no LR."""
    with caplog.at_level(logging.WARNING, logger="regionclip"):
        lrs = _lrs("WarmupMultiStepLR", 10, steps=(5, 10))
    assert "at or beyond SOLVER.MAX_ITER" in caplog.text
    assert lrs == pytest.approx([0.1] * 5 + [0.01] * 5, rel=1e-9)


def test_warmup_cosine_schedule():
    lrs = _lrs("WarmupCosineLR", 20, warmup_iters=4, warmup_factor=0.01)

    def cosine(t):
        return 0.5 * (1 + math.cos(math.pi * t / 20))

    expected = [0.1 * (0.01 + (cosine(4) - 0.01) * t / 4) if t < 4 else 0.1 * cosine(t)
                for t in range(20)]
    assert lrs == pytest.approx(expected, rel=1e-9)


def test_unknown_scheduler_and_clip_type():
    with pytest.raises(ValueError, match="WarmupCosineLR"):
        lr_multiplier("Poly", 10)
    with pytest.raises(ValueError, match="full_model"):
        gradient_clipper("l1", 1.0)


class _NormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)
        self.shared = self.fc  # a module reachable twice: its parameters are grouped once


def _hyper(groups):
    return {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}


def test_param_groups_no_decay_on_norms_and_bias_factors():
    net = _NormNet()
    hyper = _hyper(optimizer_param_groups(net, 0.1, 1e-4, 0.0, bias_lr_factor=2.0,
                                          weight_decay_bias=3e-4))
    assert hyper[id(net.conv.weight)] == (0.1, 1e-4)
    assert hyper[id(net.fc.weight)] == (0.1, 1e-4)
    assert hyper[id(net.conv.bias)] == (0.2, 3e-4)
    assert hyper[id(net.bn.weight)] == (0.1, 0.0)
    # detectron2 applies the bias settings after the norm rule: a norm layer's bias too
    assert hyper[id(net.bn.bias)] == (0.2, 3e-4)
    assert id(net.frozen.weight) not in hyper and id(net.frozen.bias) not in hyper
    assert len(hyper) == 6


def test_build_optimizer_from_config():
    cfg = get_cfg()
    cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY, cfg.SOLVER.MOMENTUM = 0.02, 5e-4, 0.8
    net = _NormNet()
    optimizer = build_optimizer(cfg, net)
    hyper = _hyper(optimizer.param_groups)
    assert hyper[id(net.bn.weight)] == (0.02, 0.0)
    assert hyper[id(net.fc.bias)] == (0.02, cfg.SOLVER.WEIGHT_DECAY_BIAS)
    assert all(g["momentum"] == 0.8 for g in optimizer.param_groups)
    cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.WARMUP_FACTOR = 10, 0.5
    build_lr_scheduler(cfg, optimizer)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)


def _params_with_grads(*grads):
    params = [nn.Parameter(torch.zeros(len(g))) for g in grads]
    for param, grad in zip(params, grads):
        param.grad = torch.tensor(grad)
    return params


def test_clip_by_value():
    params = _params_with_grads([3.0, -0.2], [-4.0])
    gradient_clipper("value", 1.0)(params)
    assert params[0].grad.tolist() == pytest.approx([1.0, -0.2])
    assert params[1].grad.tolist() == [-1.0]


def test_clip_each_parameter_norm_separately():
    params = _params_with_grads([3.0, 4.0], [0.3, 0.4])  # norms 5 and 0.5
    gradient_clipper("norm", 1.0)(params)
    assert params[0].grad.tolist() == pytest.approx([0.6, 0.8], rel=1e-5)
    assert params[1].grad.tolist() == pytest.approx([0.3, 0.4])  # under the limit: unchanged


def test_clip_full_model_norm():
    params = _params_with_grads([3.0, 4.0], [12.0])  # total norm 13
    gradient_clipper("full_model", 1.0)(params)
    assert params[0].grad.tolist() == pytest.approx([3 / 13, 4 / 13], rel=1e-5)
    assert params[1].grad.tolist() == pytest.approx([12 / 13], rel=1e-5)


def test_build_gradient_clipper_from_config():
    cfg = get_cfg()
    assert build_gradient_clipper(cfg) is None
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE, cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = "norm", 5.0
    params = _params_with_grads([30.0, 40.0])
    build_gradient_clipper(cfg)(params)
    assert params[0].grad.tolist() == pytest.approx([3.0, 4.0], rel=1e-5)


def test_auto_scale_workers_linear_rule(caplog):
    cfg = get_cfg()
    cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_ITER = 16, 0.02, 90000
    cfg.SOLVER.STEPS, cfg.SOLVER.WARMUP_ITERS = (60000, 80000), 5000
    cfg.SOLVER.CHECKPOINT_PERIOD, cfg.TEST.EVAL_PERIOD = 5000, 25000
    cfg.SOLVER.REFERENCE_WORLD_SIZE = 8
    cfg.freeze()
    with caplog.at_level(logging.INFO, logger="regionclip"):
        scaled = auto_scale_workers(cfg, 2)
    solver = scaled.SOLVER
    assert (solver.IMS_PER_BATCH, solver.MAX_ITER, solver.WARMUP_ITERS) == (4, 360000, 20000)
    assert solver.BASE_LR == pytest.approx(0.005)
    assert tuple(solver.STEPS) == (240000, 320000)
    assert (solver.CHECKPOINT_PERIOD, scaled.TEST.EVAL_PERIOD) == (20000, 100000)
    assert solver.REFERENCE_WORLD_SIZE == 2 and scaled.is_frozen()
    assert cfg.SOLVER.IMS_PER_BATCH == 16  # the input is not modified
    assert "Scaling batch and LR by 0.25" in caplog.text
    assert "total batch 4 (2 per process x 2 processes), base LR 0.005" in caplog.text


def test_auto_scale_batch_to_a_reference_batch(caplog):
    cfg = get_cfg()
    cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_ITER = 4, 0.002, 90000
    cfg.SOLVER.STEPS, cfg.SOLVER.WARMUP_ITERS = (60000, 80000), 5000
    with caplog.at_level(logging.INFO, logger="regionclip"):
        scaled = auto_scale_batch(cfg, reference_batch=16)
    solver = scaled.SOLVER
    assert solver.IMS_PER_BATCH == 4 and solver.BASE_LR == pytest.approx(0.0005)
    assert (solver.MAX_ITER, solver.WARMUP_ITERS, tuple(solver.STEPS)) == \
        (360000, 20000, (240000, 320000))
    assert "differs from the reference batch 16" in caplog.text
    assert auto_scale_batch(cfg, reference_batch=0).SOLVER.BASE_LR == 0.002


def test_auto_scale_workers_off_keeps_config(caplog):
    cfg = get_cfg()
    with caplog.at_level(logging.INFO, logger="regionclip"):
        same = auto_scale_workers(cfg, 4)
    assert same.SOLVER.BASE_LR == cfg.SOLVER.BASE_LR
    assert same.SOLVER.MAX_ITER == cfg.SOLVER.MAX_ITER
    assert "total batch 16 (4 per process x 4 processes)" in caplog.text
