"""`Instances`: the per-image container of equally long fields (boxes, classes, scores...).

Same semantics as detectron2's class, so field names such as ``gt_boxes``, ``proposal_boxes``,
``pred_classes`` and the indexing rules carry over unchanged.
"""
import itertools
from typing import Any, Dict, List, Tuple

import torch


def _index_list(values: list, item: Any) -> list:
    """Index a Python list the way a tensor would be indexed (slice, bool mask, indices)."""
    if isinstance(item, slice):
        return values[item]
    index = torch.as_tensor(item)
    if index.dtype == torch.bool:
        if index.numel() != len(values):
            raise IndexError(f"Bool mask of length {index.numel()} for {len(values)} values")
        index = index.nonzero().flatten()
    return [values[i] for i in index.flatten().tolist()]


class Instances:
    """The instances of one image: named fields that all have the same length.

    Fields are read and written as attributes (``inst.pred_boxes = Boxes(...)``) or with
    `set`/`get`/`has`/`remove`. Values can be tensors, `Boxes`, lists or any object with
    ``__len__`` and ``__getitem__``. Indexing (``inst[inst.scores > 0.5]``) applies to every
    field and returns a new `Instances`.
    """

    def __init__(self, image_size: Tuple[int, int], **fields: Any):
        """Args: image_size: (height, width) of the image; fields: initial fields."""
        self._image_size = tuple(image_size)
        self._fields: Dict[str, Any] = {}
        for name, value in fields.items():
            self.set(name, value)

    @property
    def image_size(self) -> Tuple[int, int]:
        """(height, width)."""
        return self._image_size

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            super().__setattr__(name, value)
        else:
            self.set(name, value)

    def __getattr__(self, name: str) -> Any:
        # `_fields` is looked up here only while unpickling, before __init__ has run.
        if name == "_fields" or name not in self._fields:
            raise AttributeError(f"Cannot find field '{name}' in the given Instances!")
        return self._fields[name]

    def set(self, name: str, value: Any) -> None:
        """Set field ``name``; its length must match the fields already present."""
        if self._fields:
            reference, ref_value = next(iter(self._fields.items()))
            if len(value) != len(ref_value):
                raise ValueError(
                    f"Field '{name}' has length {len(value)} but field '{reference}' of this "
                    f"Instances has length {len(ref_value)}"
                )
        self._fields[name] = value

    def has(self, name: str) -> bool:
        return name in self._fields

    def remove(self, name: str) -> None:
        del self._fields[name]

    def get(self, name: str) -> Any:
        return self._fields[name]

    def get_fields(self) -> Dict[str, Any]:
        """The field dict itself: modifying it modifies this object."""
        return self._fields

    def to(self, *args: Any, **kwargs: Any) -> "Instances":
        """A new Instances whose fields that have ``.to`` were moved/cast with these args."""
        ret = Instances(self._image_size)
        for name, value in self._fields.items():
            ret.set(name, value.to(*args, **kwargs) if hasattr(value, "to") else value)
        return ret

    def __getitem__(self, item: Any) -> "Instances":
        """Index every field with an int, slice, bool mask [N] or index tensor [K]; an int
        keeps the dimension (the result has length 1), as in detectron2."""
        if isinstance(item, int):
            n = len(self)
            if not -n <= item < n:
                raise IndexError(f"Instances index {item} out of range for length {n}")
            item = slice(item % n, item % n + 1)
        ret = Instances(self._image_size)
        for name, value in self._fields.items():
            ret.set(name, _index_list(value, item) if isinstance(value, list) else value[item])
        return ret

    def __len__(self) -> int:
        for value in self._fields.values():
            return len(value)
        raise TypeError("Instances without fields have no length")

    def __iter__(self):
        raise TypeError("`Instances` object is not iterable")

    @staticmethod
    def cat(instance_lists: List["Instances"]) -> "Instances":
        """Concatenate Instances of the same image size and field names: tensors along dim 0,
        lists chained, other types with ``type(v).cat``."""
        if len(instance_lists) == 0:
            raise ValueError("Instances.cat needs at least one Instances")
        if len(instance_lists) == 1:
            return instance_lists[0]
        first = instance_lists[0]
        for other in instance_lists[1:]:
            if other.image_size != first.image_size:
                raise ValueError(f"Image sizes differ: {first.image_size} vs {other.image_size}")
            if other._fields.keys() != first._fields.keys():
                raise ValueError(
                    f"Fields differ: {sorted(first._fields)} vs {sorted(other._fields)}"
                )
        ret = Instances(first.image_size)
        for name, v0 in first._fields.items():
            values = [inst.get(name) for inst in instance_lists]
            if isinstance(v0, torch.Tensor):
                ret.set(name, torch.cat(values, dim=0))
            elif isinstance(v0, list):
                ret.set(name, list(itertools.chain(*values)))
            elif hasattr(type(v0), "cat"):
                ret.set(name, type(v0).cat(values))
            else:
                raise ValueError(f"Field '{name}': cannot concatenate values of {type(v0)}")
        return ret

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}: {v}" for k, v in self._fields.items())
        num = len(self) if self._fields else 0
        return (
            f"Instances(num_instances={num}, image_height={self._image_size[0]}, "
            f"image_width={self._image_size[1]}, fields=[{fields}])"
        )
