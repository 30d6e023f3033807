"""Axis-aligned boxes: the `Boxes` container, `BoxMode` conversions and pairwise IoU.

Semantics follow detectron2 so that code and checkpoints written against it behave the same:
boxes are float32 ``(x1, y1, x2, y2)`` in absolute pixels, width is ``x2 - x1`` (no ``+1``).
"""
from enum import IntEnum, unique
from typing import Iterator, List, Sequence, Tuple, Union

import numpy as np
import torch

from regionclip import ops

RawBox = Union[List[float], Tuple[float, ...], torch.Tensor, np.ndarray]


@unique
class BoxMode(IntEnum):
    """Layout of a box's four numbers; the int values are detectron2's (dataset dicts store
    ``bbox_mode`` as an int)."""

    XYXY_ABS = 0  # (x1, y1, x2, y2) in pixels
    XYWH_ABS = 1  # (x1, y1, width, height) in pixels, as in COCO json

    @staticmethod
    def convert(box: RawBox, from_mode: "BoxMode", to_mode: "BoxMode") -> RawBox:
        """A 4-element list/tuple or a tensor / numpy array [..., 4] in ``to_mode``, as the same
        container type; the input is never modified. Modes may be given as ints."""
        from_mode, to_mode = BoxMode(from_mode), BoxMode(to_mode)
        if from_mode == to_mode:
            return box
        if isinstance(box, (list, tuple)):
            if len(box) != 4:
                raise ValueError(f"A single box needs 4 numbers, got {len(box)}: {box}")
            out = BoxMode.convert(torch.tensor([box]), from_mode, to_mode)
            return type(box)(out[0].tolist())
        if isinstance(box, np.ndarray):
            return BoxMode.convert(torch.from_numpy(box), from_mode, to_mode).numpy()
        if box.shape[-1] != 4:
            raise ValueError(f"Boxes must have shape [..., 4], got {tuple(box.shape)}")
        out = box.clone()
        if to_mode == BoxMode.XYXY_ABS:
            out[..., 2:] += box[..., :2]
        else:
            out[..., 2:] -= box[..., :2]
        return out


class Boxes:
    """A list of N boxes stored as a float32 tensor of shape [N, 4], rows ``(x1, y1, x2, y2)``.

    Behaves like a tensor for indexing, ``len``, iteration and ``to(device)``.
    """

    def __init__(self, tensor: Union[torch.Tensor, Sequence, np.ndarray]):
        """Args: tensor: [N, 4] (anything `torch.as_tensor` accepts); empty input -> [0, 4]."""
        device = tensor.device if isinstance(tensor, torch.Tensor) else torch.device("cpu")
        tensor = torch.as_tensor(tensor, dtype=torch.float32, device=device)
        if tensor.numel() == 0:
            tensor = tensor.reshape(0, 4)
        if tensor.dim() != 2 or tensor.shape[-1] != 4:
            raise ValueError(f"Boxes need a tensor of shape [N, 4], got {tuple(tensor.shape)}")
        self.tensor = tensor

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    def __len__(self) -> int:
        return self.tensor.shape[0]

    def __repr__(self) -> str:
        return f"Boxes({self.tensor})"

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Yield each box as a tensor of shape [4]."""
        yield from self.tensor

    def __getitem__(self, item) -> "Boxes":
        """Index with an int (-> one-row Boxes), a slice, a bool mask [N] or an index tensor;
        the result may share storage with this object (PyTorch indexing rules)."""
        if isinstance(item, int):
            return Boxes(self.tensor[item].view(1, -1))
        selected = self.tensor[item]
        if selected.dim() != 2:
            raise IndexError(f"Indexing Boxes with {item!r} did not give an [N, 4] matrix")
        return Boxes(selected)

    def clone(self) -> "Boxes":
        return Boxes(self.tensor.clone())

    def to(self, *args, **kwargs) -> "Boxes":
        """``Tensor.to`` on the boxes (e.g. a device); the result is cast back to float32."""
        return Boxes(self.tensor.to(*args, **kwargs))

    def area(self) -> torch.Tensor:
        """Returns: [N] areas ``(x2 - x1) * (y2 - y1)``."""
        box = self.tensor
        return (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])

    def clip(self, box_size: Tuple[int, int]) -> None:
        """Clamp in place: x to [0, width], y to [0, height]. ``box_size`` is (height, width)."""
        if not torch.isfinite(self.tensor).all():
            raise ValueError("Box tensor contains infinite or NaN values; cannot clip")
        h, w = box_size
        self.tensor[:, 0::2].clamp_(min=0, max=w)
        self.tensor[:, 1::2].clamp_(min=0, max=h)

    def nonempty(self, threshold: float = 0.0) -> torch.Tensor:
        """Returns: [N] bool, True where both sides are strictly larger than ``threshold``."""
        box = self.tensor
        widths = box[:, 2] - box[:, 0]
        heights = box[:, 3] - box[:, 1]
        return (widths > threshold) & (heights > threshold)

    def scale(self, scale_x: float, scale_y: float) -> None:
        """Scale in place: x coordinates by ``scale_x``, y coordinates by ``scale_y``."""
        self.tensor[:, 0::2] *= scale_x
        self.tensor[:, 1::2] *= scale_y

    def get_centers(self) -> torch.Tensor:
        """Returns: [N, 2] box centres (x, y)."""
        return (self.tensor[:, :2] + self.tensor[:, 2:]) / 2

    @classmethod
    def cat(cls, boxes_list: Sequence["Boxes"]) -> "Boxes":
        """Concatenate into new storage; an empty list gives an empty Boxes."""
        if len(boxes_list) == 0:
            return cls(torch.empty(0, 4))
        if not all(isinstance(b, Boxes) for b in boxes_list):
            raise TypeError("Boxes.cat expects a list of Boxes")
        return cls(torch.cat([b.tensor for b in boxes_list], dim=0))


def pairwise_iou(boxes1: Boxes, boxes2: Boxes) -> torch.Tensor:
    """[N, M] IoU of N ``boxes1`` and M ``boxes2``. As in detectron2, pairs that do not
    intersect get 0 even when both boxes are degenerate (torchvision gives 0/0 = NaN there)."""
    iou = ops.box_iou(boxes1.tensor, boxes2.tensor)
    return iou.nan_to_num_(nan=0.0)
