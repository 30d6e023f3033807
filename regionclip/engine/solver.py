"""Optimizer, learning-rate schedule, gradient clipping and batch-size scaling (detectron2 rules).

- Parameter groups: only trainable parameters; normalisation layers get ``WEIGHT_DECAY_NORM``,
  biases ``BASE_LR * BIAS_LR_FACTOR`` and ``WEIGHT_DECAY_BIAS`` (detectron2 v0.4, which the
  original forked: a norm layer's bias counts as a norm parameter).
- Schedule: fvcore's multi-step or cosine ``ParamScheduler`` behind a linear or constant warm-up,
  evaluated at ``iteration / MAX_ITER`` and multiplied into each group's base LR.
- Clipping: ``value`` (each element), ``norm`` (each parameter tensor's norm separately, as the
  original's pretraining used) or ``full_model`` (one norm over all parameters).
"""
import logging
from typing import Callable, Dict, Iterable, List, Optional

import torch
from fvcore.common.param_scheduler import (
    CompositeParamScheduler,
    ConstantParamScheduler,
    CosineParamScheduler,
    LinearParamScheduler,
    MultiStepParamScheduler,
    ParamScheduler,
)
from torch import nn

logger = logging.getLogger("regionclip")

NORM_TYPES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm, nn.LocalResponseNorm,
)
OPTIMIZERS = ("SGD", "ADAMW")
LR_SCHEDULERS = ("WarmupMultiStepLR", "WarmupCosineLR")
WARMUP_METHODS = ("linear", "constant")
CLIP_TYPES = ("value", "norm", "full_model")


# ---------------------------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------------------------
def optimizer_param_groups(model: nn.Module, base_lr: float, weight_decay: float,
                           weight_decay_norm: float, bias_lr_factor: float = 1.0,
                           weight_decay_bias: Optional[float] = None) -> List[Dict]:
    """Trainable parameters of ``model`` grouped by (lr, weight_decay), in module order.

    Shared parameters appear once. ``weight_decay_bias`` None means ``weight_decay``. As in
    detectron2, the bias settings apply to every parameter named ``bias``, a norm layer's too
    (they are applied after the norm layers' weight decay).
    """
    if weight_decay_bias is None:
        weight_decay_bias = weight_decay
    groups: Dict[tuple, List[nn.Parameter]] = {}
    seen = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            key = (base_lr, weight_decay_norm if isinstance(module, NORM_TYPES) else weight_decay)
            if name == "bias":
                key = (base_lr * bias_lr_factor, weight_decay_bias)
            groups.setdefault(key, []).append(param)
    return [{"params": params, "lr": lr, "weight_decay": wd}
            for (lr, wd), params in groups.items()]


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """``SOLVER.OPTIMIZER`` over the trainable parameters: SGD with momentum, or AdamW."""
    solver = cfg.SOLVER
    if solver.OPTIMIZER not in OPTIMIZERS:
        raise ValueError(f"SOLVER.OPTIMIZER {solver.OPTIMIZER!r} is not supported; valid: "
                         f"{list(OPTIMIZERS)}")
    groups = optimizer_param_groups(
        model, solver.BASE_LR, solver.WEIGHT_DECAY, solver.WEIGHT_DECAY_NORM,
        solver.BIAS_LR_FACTOR, solver.WEIGHT_DECAY_BIAS,
    )
    if not groups:
        raise ValueError("The model has no trainable parameters (check MODEL.BACKBONE.FREEZE_AT)")
    num = sum(p.numel() for group in groups for p in group["params"])
    logger.info("Optimizing %d trainable parameters in %d groups", num, len(groups))
    if solver.OPTIMIZER == "ADAMW":  # each group's weight_decay is AdamW's decoupled decay
        return torch.optim.AdamW(groups, lr=solver.BASE_LR)
    return torch.optim.SGD(groups, lr=solver.BASE_LR, momentum=solver.MOMENTUM,
                           nesterov=solver.NESTEROV)


# ---------------------------------------------------------------------------------------------
# Learning-rate schedule
# ---------------------------------------------------------------------------------------------
class WarmupParamScheduler(CompositeParamScheduler):
    """``scheduler`` preceded by a warm-up over the first ``warmup_length`` of training.

    The warm-up starts at ``warmup_factor * scheduler(0)``; "linear" ramps to the value the
    main schedule has where the warm-up ends, "constant" holds the start value. The main
    schedule keeps its own time axis (it is not shifted by the warm-up).
    """

    def __init__(self, scheduler: ParamScheduler, warmup_factor: float, warmup_length: float,
                 warmup_method: str = "linear"):
        if warmup_method not in WARMUP_METHODS:
            raise ValueError(f"warm-up method must be one of {WARMUP_METHODS}, "
                             f"got {warmup_method!r}")
        start = warmup_factor * scheduler(0.0)
        if warmup_method == "linear":
            warmup = LinearParamScheduler(start, scheduler(warmup_length))
        else:
            warmup = ConstantParamScheduler(start)
        super().__init__([warmup, scheduler], interval_scaling=["rescaled", "fixed"],
                         lengths=[warmup_length, 1.0 - warmup_length])


class LRMultiplier(torch.optim.lr_scheduler.LRScheduler):
    """Sets every group's LR to ``base_lr * multiplier(iteration / max_iter)``.

    ``step()`` once per iteration, after ``optimizer.step()``; the LR used at iteration ``t``
    is then ``base_lr * multiplier(t / max_iter)``. The state is two plain values, so
    checkpoints hold no pickled scheduler objects.
    """

    def __init__(self, optimizer, multiplier: ParamScheduler, max_iter: int,
                 last_iter: int = -1):
        if max_iter <= 0:
            raise ValueError(f"max_iter must be positive, got {max_iter}")
        self._multiplier = multiplier
        self._max_iter = max_iter
        super().__init__(optimizer, last_epoch=last_iter)

    def state_dict(self) -> Dict:
        return {"base_lrs": list(self.base_lrs), "last_epoch": self.last_epoch}

    def get_lr(self) -> List[float]:
        factor = self._multiplier(min(self.last_epoch / self._max_iter, 1.0))
        return [base_lr * factor for base_lr in self.base_lrs]


def lr_multiplier(name: str, max_iter: int, steps=(), gamma: float = 0.1,
                  warmup_factor: float = 0.001, warmup_iters: int = 0,
                  warmup_method: str = "linear") -> ParamScheduler:
    """The LR factor as a function of training progress in [0, 1]."""
    if name == "WarmupMultiStepLR":
        kept = [s for s in steps if s < max_iter]  # a step at MAX_ITER would change no LR used
        if len(kept) != len(steps):
            logger.warning("SOLVER.STEPS %s has values at or beyond SOLVER.MAX_ITER %d; they are "
                           "ignored", tuple(steps), max_iter)
        schedule = MultiStepParamScheduler(
            values=[gamma ** k for k in range(len(kept) + 1)], milestones=kept,
            num_updates=max_iter,
        )
    elif name == "WarmupCosineLR":
        schedule = CosineParamScheduler(1.0, 0.0)
    else:
        raise ValueError(f"SOLVER.LR_SCHEDULER_NAME {name!r} is not available; valid names: "
                         f"{LR_SCHEDULERS}")
    return WarmupParamScheduler(schedule, warmup_factor, min(warmup_iters / max_iter, 1.0),
                                warmup_method)


def build_lr_scheduler(cfg, optimizer) -> LRMultiplier:
    solver = cfg.SOLVER
    multiplier = lr_multiplier(
        solver.LR_SCHEDULER_NAME, solver.MAX_ITER, tuple(solver.STEPS), solver.GAMMA,
        solver.WARMUP_FACTOR, solver.WARMUP_ITERS, solver.WARMUP_METHOD,
    )
    return LRMultiplier(optimizer, multiplier, solver.MAX_ITER)


# ---------------------------------------------------------------------------------------------
# Gradient clipping
# ---------------------------------------------------------------------------------------------
def gradient_clipper(clip_type: str, clip_value: float,
                     norm_type: float = 2.0) -> Callable[[Iterable[nn.Parameter]], None]:
    """A function that clips the gradients of the parameters it is given, in place."""
    if clip_type == "value":
        return lambda params: torch.nn.utils.clip_grad_value_(list(params), clip_value)
    if clip_type == "norm":
        def clip_each(params):
            for param in params:
                if param.grad is not None:
                    torch.nn.utils.clip_grad_norm_(param, clip_value, norm_type)
        return clip_each
    if clip_type == "full_model":
        return lambda params: torch.nn.utils.clip_grad_norm_(list(params), clip_value, norm_type)
    raise ValueError(f"SOLVER.CLIP_GRADIENTS.CLIP_TYPE {clip_type!r} is not available; valid "
                     f"types: {CLIP_TYPES}")


def build_gradient_clipper(cfg) -> Optional[Callable[[Iterable[nn.Parameter]], None]]:
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if not clip.ENABLED:
        return None
    return gradient_clipper(clip.CLIP_TYPE, clip.CLIP_VALUE, clip.NORM_TYPE)


# ---------------------------------------------------------------------------------------------
# Batch-size scaling
# ---------------------------------------------------------------------------------------------
def scale_schedule(cfg, scale: float):
    """A copy of ``cfg`` for a total batch ``scale`` times the one its schedule was written for.

    The linear scaling rule: LR times ``scale``; iterations, warm-up, LR steps and the
    checkpoint and evaluation periods divided by it, so the run sees the same number of images
    per LR phase. ``SOLVER.IMS_PER_BATCH`` is left as it is.
    """
    cfg = cfg.clone()
    frozen = cfg.is_frozen()
    cfg.defrost()
    solver = cfg.SOLVER
    solver.BASE_LR = solver.BASE_LR * scale
    solver.MAX_ITER = int(round(solver.MAX_ITER / scale))
    solver.WARMUP_ITERS = int(round(solver.WARMUP_ITERS / scale))
    solver.STEPS = tuple(int(round(s / scale)) for s in solver.STEPS)
    solver.CHECKPOINT_PERIOD = int(round(solver.CHECKPOINT_PERIOD / scale))
    cfg.TEST.EVAL_PERIOD = int(round(cfg.TEST.EVAL_PERIOD / scale))
    if frozen:
        cfg.freeze()
    return cfg


def auto_scale_batch(cfg, reference_batch: int, world_size: int = 1):
    """Scale LR and schedule when ``SOLVER.IMS_PER_BATCH`` differs from ``reference_batch``,
    the total batch the config's schedule was written for (0 = no reference, no change).

    For users who change the batch to fit their GPUs: keeping the LR of a 4x larger batch is
    the classic way to not reproduce a paper. Logs the resulting schedule.
    """
    batch = cfg.SOLVER.IMS_PER_BATCH
    if reference_batch and reference_batch != batch:
        logger.info("SOLVER.IMS_PER_BATCH %d differs from the reference batch %d: scaling the "
                    "LR by %g and the schedule by %g", batch, reference_batch,
                    batch / reference_batch, reference_batch / batch)
        cfg = scale_schedule(cfg, batch / reference_batch)
    log_schedule(cfg, world_size)
    return cfg


def auto_scale_workers(cfg, world_size: int):
    """detectron2's rule: ``SOLVER.IMS_PER_BATCH`` and the schedule were written for
    ``SOLVER.REFERENCE_WORLD_SIZE`` processes; with another number of processes the per-process
    batch stays the same and the total batch, LR and schedule scale with it.

    ``REFERENCE_WORLD_SIZE 0`` switches this off. Every call logs the resulting schedule, so
    a run's log always states the batch and LR it used.
    """
    reference = cfg.SOLVER.REFERENCE_WORLD_SIZE
    if reference and reference != world_size:
        if cfg.SOLVER.IMS_PER_BATCH % reference:
            raise ValueError(f"SOLVER.IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH} is not divisible "
                             f"by SOLVER.REFERENCE_WORLD_SIZE {reference}")
        scale = world_size / reference
        logger.info("Scaling batch and LR by %g: SOLVER.REFERENCE_WORLD_SIZE is %d, running %d "
                    "processes", scale, reference, world_size)
        cfg = scale_schedule(cfg, scale)
        frozen = cfg.is_frozen()
        cfg.defrost()
        cfg.SOLVER.IMS_PER_BATCH = int(round(cfg.SOLVER.IMS_PER_BATCH * scale))
        cfg.SOLVER.REFERENCE_WORLD_SIZE = world_size
        if frozen:
            cfg.freeze()
    log_schedule(cfg, world_size)
    return cfg


def log_schedule(cfg, world_size: int) -> None:
    solver = cfg.SOLVER
    logger.info(
        "Schedule: total batch %d (%s per process x %d processes), base LR %g, %d iterations, "
        "LR steps %s, warm-up %d iterations, checkpoint every %d, evaluation every %s",
        solver.IMS_PER_BATCH, _per_process(solver.IMS_PER_BATCH, world_size), world_size,
        solver.BASE_LR, solver.MAX_ITER, tuple(solver.STEPS), solver.WARMUP_ITERS,
        solver.CHECKPOINT_PERIOD, cfg.TEST.EVAL_PERIOD or "(end only)",
    )


def _per_process(total: int, world_size: int) -> str:
    return str(total // world_size) if total % world_size == 0 else f"{total}/{world_size}"
