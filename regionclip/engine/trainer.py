"""The training loop shared by fine-tuning and pretraining: one plain loop, no hooks.

Each iteration: next batch -> ``model(batch)`` (a dict of scalar losses) -> sum -> backward ->
optional gradient clipping -> optimizer step -> LR scheduler step; then metrics, periodic
checkpoints and periodic evaluation. Optional automatic mixed precision: float16 with a
gradient scaler on CUDA, bfloat16 on the CPU.

A checkpoint holds the model, optimizer, scheduler (and gradient scaler), the number of
completed iterations, the data seed, the random-number states of every process (python,
numpy, torch, CUDA) and the metrics' smoothing windows. The data order is a function of the
seed and the iteration (see ``regionclip/data/samplers.py``), so a run resumed from a
checkpoint continues exactly the trajectory, and the ``metrics.json``, of an uninterrupted one.
The files of the output folder are described in ``output_dir.py``.
"""
import inspect
import logging
import math
import os
import time
from typing import Callable, Dict, Iterable, Iterator, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..atomic import atomic_open
from ..checkpoint import read_checkpoint, save_checkpoint
from ..distributed import all_gather, get_local_rank, get_rank, get_world_size, is_main_process
from ..events import pop_scalars
from .metrics import TrainingMetrics
from .output_dir import (
    FINAL_CHECKPOINT,
    LAST_CHECKPOINT_FILE,
    LAST_EVALUATION_FILE,
    is_periodic_checkpoint,
    last_checkpoint_path,
    last_evaluation,
)
from .process_state import (
    HEAP_RELEASE_MIN_STEP_S,
    capture_rng_state,
    preserved_rng_state,
    release_freed_heap,
    restore_rng_state,
)
from .solver import build_gradient_clipper, build_lr_scheduler, build_optimizer

logger = logging.getLogger("regionclip")


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def wrap_distributed(model: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
    """DistributedDataParallel when several processes train, else ``model`` itself."""
    if get_world_size() == 1:
        return model
    device_ids = [get_local_rank()] if next(model.parameters()).is_cuda else None
    ddp = nn.parallel.DistributedDataParallel
    # Buffers (frozen BN statistics, pixel means) are equal on every process: skip their
    # per-forward broadcast. The keyword was renamed in recent torch releases.
    no_buffer_sync = ({"forward_sync_buffers": False}
                      if "forward_sync_buffers" in inspect.signature(ddp).parameters
                      else {"broadcast_buffers": False})
    return ddp(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters,
               **no_buffer_sync)


def reduce_losses(loss_dict: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Loss values averaged over processes (every process gets the same numbers)."""
    names = sorted(loss_dict)
    values = torch.stack([loss_dict[name].detach().float() for name in names])
    if get_world_size() > 1:
        values = values.to(_collective_device())
        dist.all_reduce(values)
        values /= get_world_size()
    return dict(zip(names, values.cpu().tolist()))


def _collective_device() -> torch.device:
    backend = dist.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else \
        torch.device("cpu")


def check_losses(loss_dict, iteration: int) -> None:
    if not isinstance(loss_dict, dict) or not loss_dict:
        raise TypeError(f"In training mode the model must return a non-empty dict of scalar "
                        f"losses, got {type(loss_dict).__name__}")
    bad = [name for name, value in loss_dict.items()
           if not (torch.is_tensor(value) and value.numel() == 1)]
    if bad:
        raise TypeError(f"Losses must be scalar tensors; not so at iteration {iteration}: {bad}")


# ---------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------
class Trainer:
    """Runs iterations ``start_iter .. max_iter - 1`` of a training.

    Args:
        model: returns a dict of scalar losses in training mode (wrapped in DDP here when
            several processes train).
        data_loader: yields lists of input dicts; with ``iter_from(iteration)`` and
            ``state_dict``/``load_state_dict`` (``TrainingLoader``) resuming is exact.
        optimizer, scheduler: the scheduler is stepped once per iteration.
        max_iter: iterations in the whole run.
        output_dir: checkpoints, ``metrics.json``, TensorBoard files ("" = none).
        checkpoint_period: save ``model_{iteration:07d}.pth`` every that many iterations
            (0 = only ``model_final.pth``); the newest ``keep_checkpoints`` are kept.
        eval_period, eval_fn: call ``eval_fn(model)`` (unwrapped, in eval mode, on every
            process) every ``eval_period`` iterations (0 = never periodically) and after the
            last one; it returns a dict of results (possibly empty on non-main processes).
        clip_gradients: ``fn(parameters)`` clipping gradients in place, or None.
        amp, amp_dtype: mixed precision; the dtype defaults to float16 on CUDA (with a
            gradient scaler) and bfloat16 on the CPU.
        log_period: iterations between console / json lines.
    """

    def __init__(self, model: nn.Module, data_loader: Iterable, optimizer, scheduler, *,
                 max_iter: int, output_dir: str = "", checkpoint_period: int = 0,
                 keep_checkpoints: int = 3, eval_period: int = 0,
                 eval_fn: Optional[Callable[[nn.Module], Dict]] = None,
                 clip_gradients: Optional[Callable] = None, amp: bool = False,
                 amp_dtype: Optional[torch.dtype] = None, log_period: int = 20,
                 tensorboard: bool = True, find_unused_parameters: bool = False):
        if keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be at least 1, got {keep_checkpoints}")
        self.module = model
        self.model = wrap_distributed(model, find_unused_parameters)
        self.data_loader = data_loader
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.max_iter = max_iter
        self.output_dir = output_dir
        self.checkpoint_period = checkpoint_period
        self.keep_checkpoints = keep_checkpoints
        self.eval_period = eval_period
        self.eval_fn = eval_fn
        self.clip_gradients = clip_gradients
        self.log_period = log_period
        self.tensorboard = tensorboard
        self.start_iter = 0
        self.eval_results: Dict = {}
        self.metrics: Optional[TrainingMetrics] = None  # while training
        self._metrics_state: Optional[Dict] = None  # from the checkpoint resumed from
        self.device_type = next(model.parameters()).device.type
        self.amp = amp
        self.amp_dtype = amp_dtype or (torch.float16 if self.device_type == "cuda"
                                       else torch.bfloat16)
        use_scaler = amp and self.device_type == "cuda" and self.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None

    # ---- resume ---------------------------------------------------------------------------
    def resume_or_start(self, resume: bool = True) -> bool:
        """Load the last checkpoint of ``output_dir`` when ``resume`` and one exists.

        Returns whether a checkpoint was loaded (``start_iter`` is then its iteration).
        """
        path = last_checkpoint_path(self.output_dir) if resume and self.output_dir else ""
        if not path:
            if resume:
                logger.info("No checkpoint in %r: training from the start", self.output_dir)
            self.start_iter = 0
            return False
        self.load(path)
        return True

    def load(self, path: str) -> None:
        state = read_checkpoint(path)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])
        if "data" in state and hasattr(self.data_loader, "load_state_dict"):
            self.data_loader.load_state_dict(state["data"])
        self.start_iter = int(state["iteration"])
        self._metrics_state = state.get("metrics")
        self._restore_rng(state.get("rng", []))
        logger.info("Resumed from %s at iteration %d", path, self.start_iter)

    def _restore_rng(self, states: List[Dict]) -> None:
        if len(states) == get_world_size():
            restore_rng_state(states[get_rank()])
        else:
            logger.warning("The checkpoint holds random states of %d processes but %d are "
                           "running: random streams restart, the trajectory will differ",
                           len(states), get_world_size())

    # ---- loop -----------------------------------------------------------------------------
    def train(self) -> Dict:
        """Train to ``max_iter``; returns the results of the last evaluation.

        A resumed run first redoes the evaluation after its checkpoint when the interrupted
        run did not finish it (e.g. killed during the final evaluation).
        """
        self.metrics = TrainingMetrics(self.output_dir, self.max_iter, self.start_iter,
                                       self.log_period, tensorboard=self.tensorboard,
                                       state=self._metrics_state)
        try:
            if self._evaluation_unfinished():
                logger.info("Redoing the evaluation of iteration %d, which the interrupted "
                            "run did not finish", self.start_iter - 1)
                self.evaluate(self.start_iter - 1, self.metrics)
            if self.start_iter >= self.max_iter:
                logger.info("Training already complete (%d iterations)", self.max_iter)
                return self.eval_results
            logger.info("Starting training from iteration %d", self.start_iter)
            self.model.train()
            pop_scalars()  # what a model reported outside this loop is not this run's
            data = self._data_iterator()
            for iteration in range(self.start_iter, self.max_iter):
                self._iteration(iteration, data, self.metrics)
        finally:
            self.metrics.close()
            self.metrics = None
        return self.eval_results

    def _evaluation_due(self, done: int) -> bool:
        """Whether an evaluation follows the iteration that completes ``done`` iterations."""
        periodic = bool(self.eval_period) and done % self.eval_period == 0
        return self.eval_fn is not None and (periodic or done == self.max_iter)

    def _evaluation_unfinished(self) -> bool:
        """The main process's answer (the same on every process, which all evaluate)."""
        done = self.start_iter
        if not (self.output_dir and 0 < done <= self.max_iter and self._evaluation_due(done)):
            return False
        return all_gather(last_evaluation(self.output_dir) < done - 1)[0]

    def _data_iterator(self) -> Iterator:
        if hasattr(self.data_loader, "iter_from"):
            return self.data_loader.iter_from(self.start_iter)
        if self.start_iter:
            logger.warning("The data loader cannot restart at an iteration; data restarts")
        return iter(self.data_loader)

    def _iteration(self, iteration: int, data: Iterator, metrics: TrainingMetrics) -> None:
        start = time.perf_counter()
        batch = next(data)
        data_time = time.perf_counter() - start
        lr = self._main_lr()
        losses = self.run_step(iteration, batch)
        if self.device_type == "cpu" and time.perf_counter() - start > HEAP_RELEASE_MIN_STEP_S:
            release_freed_heap()
        self.scheduler.step()
        metrics.put(time=time.perf_counter() - start, data_time=data_time, lr=lr,
                    total_loss=sum(losses.values()), **losses, **pop_scalars())
        metrics.step(iteration)
        self._after_step(iteration, metrics)

    def run_step(self, iteration: int, batch) -> Dict[str, float]:
        """One optimisation step; returns the losses averaged over processes."""
        with torch.autocast(self.device_type, dtype=self.amp_dtype, enabled=self.amp):
            loss_dict = self.model(batch)
        check_losses(loss_dict, iteration)
        reduced = reduce_losses(loss_dict)
        total = sum(reduced.values())
        if not all(math.isfinite(v) for v in [total, *reduced.values()]):
            values = ", ".join(f"{k}={v}" for k, v in reduced.items())
            raise FloatingPointError(
                f"Loss became non-finite at iteration {iteration}: total_loss={total}, {values}")
        loss = sum(loss_dict.values())
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            self._clip()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self._clip()
            self.optimizer.step()
        return reduced

    def _clip(self) -> None:
        if self.clip_gradients is not None:
            self.clip_gradients([p for g in self.optimizer.param_groups for p in g["params"]])

    def _main_lr(self) -> float:
        """LR of the largest parameter group (the one to report)."""
        group = max(self.optimizer.param_groups, key=lambda g: len(g["params"]))
        return group["lr"]

    def _after_step(self, iteration: int, metrics: TrainingMetrics) -> None:
        done = iteration + 1
        last = done == self.max_iter
        if last:
            self.save(FINAL_CHECKPOINT, done)
        elif self.checkpoint_period and done % self.checkpoint_period == 0:
            self.save(f"model_{iteration:07d}.pth", done)
        if self._evaluation_due(done):
            self.evaluate(iteration, metrics)

    def evaluate(self, iteration: int, metrics: TrainingMetrics) -> Dict:
        self.module.eval()
        with preserved_rng_state():
            self.eval_results = self.eval_fn(self.module) or {}
        self.module.train()
        metrics.write_results(iteration, self.eval_results)
        if is_main_process() and self.output_dir:
            with atomic_open(os.path.join(self.output_dir, LAST_EVALUATION_FILE), "w") as f:
                f.write(str(iteration))
        return self.eval_results

    # ---- checkpoints ----------------------------------------------------------------------
    def save(self, name: str, iteration: int) -> None:
        """Write checkpoint ``name`` (all processes call this: it gathers their RNG states)."""
        rng = all_gather(capture_rng_state())
        if not (is_main_process() and self.output_dir):
            return
        extra = {"optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "iteration": iteration, "rng": rng}
        if hasattr(self.data_loader, "state_dict"):
            extra["data"] = self.data_loader.state_dict()
        if self.scaler is not None:
            extra["grad_scaler"] = self.scaler.state_dict()
        if self.metrics is not None:
            extra["metrics"] = self.metrics.state_dict()
        save_checkpoint(os.path.join(self.output_dir, name), self.module.state_dict(), **extra)
        with atomic_open(os.path.join(self.output_dir, LAST_CHECKPOINT_FILE), "w") as f:
            f.write(name)
        logger.info("Saved checkpoint %s (iteration %d)", name, iteration)
        self._remove_old_checkpoints()

    def _remove_old_checkpoints(self) -> None:
        periodic = sorted(filter(is_periodic_checkpoint, os.listdir(self.output_dir)))
        for name in periodic[:max(len(periodic) - self.keep_checkpoints, 0)]:
            os.remove(os.path.join(self.output_dir, name))


def build_trainer(cfg, model: nn.Module, data_loader, eval_fn=None, **options) -> Trainer:
    """A :class:`Trainer` with the optimizer, schedule, clipping and periods of ``cfg``;
    ``options`` override or add :class:`Trainer` keyword arguments (e.g. ``amp_dtype``)."""
    optimizer = build_optimizer(cfg, model)
    kwargs = dict(
        max_iter=cfg.SOLVER.MAX_ITER,
        output_dir=cfg.OUTPUT_DIR,
        checkpoint_period=cfg.SOLVER.CHECKPOINT_PERIOD,
        eval_period=cfg.TEST.EVAL_PERIOD,
        eval_fn=eval_fn,
        clip_gradients=build_gradient_clipper(cfg),
        # Detic's FP16: mixed precision with a gradient scaler, on CUDA only
        amp=cfg.SOLVER.AMP.ENABLED or (cfg.FP16 and next(model.parameters()).is_cuda),
    )
    kwargs.update(options)
    return Trainer(model, data_loader, optimizer, build_lr_scheduler(cfg, optimizer), **kwargs)
