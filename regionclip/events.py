"""Scalars a model reports while it trains besides its losses, as detectron2's
``get_event_storage().put_scalar`` (``fast_rcnn/cls_accuracy``, ``roi_head/num_fg_samples``,
...). The trainer takes them after each step and logs them with the losses, as medians over the
same window, to ``metrics.json`` and TensorBoard. As in detectron2 the main process's values
are the ones logged, so a scalar needs no collective and may be put on some iterations only.
"""
from typing import Dict, Union

import torch

__all__ = ["pop_scalars", "put_scalar"]

_PENDING: Dict[str, torch.Tensor] = {}


def put_scalar(name: str, value: Union[float, torch.Tensor]) -> None:
    """Report ``value`` (a number or a one-element tensor) under ``name`` for this iteration.
    A tensor is kept on its device, so the step is not synchronised until the trainer logs."""
    _PENDING[name] = value.detach() if torch.is_tensor(value) else torch.tensor(float(value))


def pop_scalars() -> Dict[str, float]:
    """The scalars put since the last call, as floats; forgets them."""
    values = {name: float(value) for name, value in _PENDING.items()}
    _PENDING.clear()
    return values
