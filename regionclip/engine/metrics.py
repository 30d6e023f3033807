"""Training metrics: smoothed scalars and three writers (console with ETA, json lines,
TensorBoard), all on the main process only.

``OUTPUT_DIR/metrics.json`` holds one json object per line, as detectron2 writes it: every
``log_period`` iterations ``{"iteration", "lr", "time", "data_time", "total_loss", "loss_*"}``
and the scalars the model put (``fast_rcnn/cls_accuracy``, ..., see ``events.py``), medians
over the last ``window`` iterations; and after each evaluation the flattened results
(``"<dataset>/<task>/<metric>"``) with their iteration.
"""
import datetime
import json
import logging
import math
import os
import statistics
from collections import deque
from typing import Dict, Mapping, Optional

import torch

from ..atomic import atomic_open
from ..distributed import is_main_process
from ..evaluation.results import finite_or_null

logger = logging.getLogger("regionclip")

METRICS_FILE = "metrics.json"
TENSORBOARD_DIR = "tensorboard"
_MiB = 1024.0 * 1024.0


class SmoothedValue:
    """A scalar's recent history (median over a window) and its running mean."""

    def __init__(self, window: int = 20):
        self.values = deque(maxlen=window)
        self.total = 0.0
        self.count = 0

    def update(self, value: float) -> None:
        self.values.append(value)
        self.total += value
        self.count += 1

    def state_dict(self) -> Dict:
        return {"values": list(self.values), "total": self.total, "count": self.count}

    def load_state_dict(self, state: Mapping) -> None:
        self.values.clear()
        self.values.extend(state["values"])
        self.total, self.count = state["total"], state["count"]

    @property
    def latest(self) -> float:
        return self.values[-1]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)


def flatten_results(results: Mapping, prefix: str = "") -> Dict[str, float]:
    """``{"coco_val": {"bbox": {"AP": 1.0}}}`` -> ``{"coco_val/bbox/AP": 1.0}``."""
    flat = {}
    for key, value in results.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_results(value, name))
        elif isinstance(value, (int, float)):
            flat[name] = float(value)
    return flat


def truncate_json_lines(path: str, start_iter: int) -> None:
    """Drop lines of iterations >= ``start_iter``: a resumed run repeats those iterations, and
    the lines a killed run wrote after its last checkpoint describe a trajectory that is gone.
    Lines that are not json objects (a line cut short by a kill) are dropped with a warning.
    """
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    iterations = [_line_iteration(line) for line in lines]
    damaged = iterations.count(None)
    if damaged:
        logger.warning("Dropped %d damaged line(s) of %s (a run killed while writing)",
                       damaged, path)
    kept = [line for line, it in zip(lines, iterations) if it is not None and it < start_iter]
    if len(kept) != len(lines):
        with atomic_open(path, "w") as f:
            f.writelines(kept)


def _line_iteration(line: str) -> Optional[float]:
    """The line's iteration (-1 without one), None for a line that is not a json object."""
    if not line.endswith("\n"):
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record.get("iteration", -1) if isinstance(record, dict) else None


class TrainingMetrics:
    """Collects per-iteration scalars and writes them every ``log_period`` iterations.

    Args:
        output_dir: folder of ``metrics.json`` and ``tensorboard/`` ("" = console only).
        max_iter: for the ETA.
        start_iter: first iteration of this run (a resumed run truncates ``metrics.json``).
        window: iterations over which losses and times are smoothed.
        tensorboard: also write TensorBoard event files.
        state: ``state_dict()`` of the run resumed from (its smoothing windows), so that a
            resumed run logs the values of an uninterrupted one.
    """

    def __init__(self, output_dir: str, max_iter: int, start_iter: int = 0, log_period: int = 20,
                 window: int = 20, tensorboard: bool = True, state: Optional[Mapping] = None):
        self.max_iter = max_iter
        self.log_period = log_period
        self.window = window
        self.history: Dict[str, SmoothedValue] = {}
        for name, value in (state or {}).items():
            self.history[name] = SmoothedValue(window)
            self.history[name].load_state_dict(value)
        self.enabled = is_main_process()
        self.json_path = os.path.join(output_dir, METRICS_FILE) if output_dir else ""
        self._tb = None
        if self.enabled and output_dir:
            os.makedirs(output_dir, exist_ok=True)
            truncate_json_lines(self.json_path, start_iter)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(output_dir, TENSORBOARD_DIR),
                                         purge_step=start_iter)

    def state_dict(self) -> Dict[str, Dict]:
        return {name: value.state_dict() for name, value in self.history.items()}

    def put(self, **scalars: float) -> None:
        for name, value in scalars.items():
            self.history.setdefault(name, SmoothedValue(self.window)).update(float(value))

    def step(self, iteration: int) -> None:
        """Call after every iteration; writes on every ``log_period``-th and the last one."""
        last = iteration + 1 == self.max_iter
        if self.enabled and ((iteration + 1) % self.log_period == 0 or last):
            self.write(iteration)

    def smoothed(self) -> Dict[str, float]:
        """Current values: lr as is, everything else the median over the window."""
        return {name: (value.latest if name == "lr" else value.median)
                for name, value in self.history.items()}

    def write(self, iteration: int) -> None:
        values = self.smoothed()
        logger.info(self._console_line(iteration, values))
        self._write_json({"iteration": iteration, **values})
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(name, value, iteration)

    def write_results(self, iteration: int, results: Mapping) -> None:
        """Log evaluation results (nested dicts of numbers) at ``iteration``."""
        flat = flatten_results(results)
        if not (self.enabled and flat):
            return
        self._write_json({"iteration": iteration, **flat})
        if self._tb is not None:
            for name, value in flat.items():
                if math.isfinite(value):
                    self._tb.add_scalar(name, value, iteration)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def _write_json(self, record: Dict) -> None:
        if self.json_path:
            with open(self.json_path, "a") as f:
                f.write(json.dumps(finite_or_null(record), sort_keys=True, allow_nan=False) + "\n")

    def _console_line(self, iteration: int, values: Dict[str, float]) -> str:
        losses = "  ".join(f"{k}: {v:.4g}" for k, v in sorted(values.items()) if "loss" in k)
        parts = [f"eta: {self._eta(iteration)}", f"iter: {iteration}", losses]
        for name, fmt in (("time", ".4f"), ("data_time", ".4f"), ("lr", ".6g")):
            if name in values:
                parts.append(f"{name}: {values[name]:{fmt}}")
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            parts.append(f"max_mem: {torch.cuda.max_memory_allocated() / _MiB:.0f}M")
        return "  ".join(p for p in parts if p)

    def _eta(self, iteration: int) -> str:
        if "time" not in self.history:
            return "N/A"
        seconds = self.history["time"].median * (self.max_iter - iteration - 1)
        return str(datetime.timedelta(seconds=int(seconds)))

