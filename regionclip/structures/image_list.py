"""`ImageList`: a batch of differently sized images padded into one tensor."""
from typing import List, Sequence, Tuple, Union

import torch


class ImageList:
    """Images padded right/bottom to a common size: ``tensor`` [N, ..., H, W] and
    ``image_sizes``, the N un-padded sizes (h, w)."""

    def __init__(self, tensor: torch.Tensor, image_sizes: List[Tuple[int, int]]):
        self.tensor = tensor
        self.image_sizes = image_sizes

    def __len__(self) -> int:
        return len(self.image_sizes)

    def __getitem__(self, idx: int) -> torch.Tensor:
        """Returns: image ``idx`` without its padding, shape [..., h, w]."""
        h, w = self.image_sizes[idx]
        return self.tensor[idx, ..., :h, :w]

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    def to(self, *args, **kwargs) -> "ImageList":
        return ImageList(self.tensor.to(*args, **kwargs), self.image_sizes)

    @staticmethod
    def from_tensors(
        tensors: Sequence[torch.Tensor],
        size_divisibility: int = 0,
        pad_value: Union[float, int] = 0.0,
    ) -> "ImageList":
        """Pad images [..., Hi, Wi] (same leading dims) with ``pad_value`` to the largest H and
        W of the batch, rounded up to a multiple of ``size_divisibility`` if > 0 (backbones
        whose strides must divide the input size need this), and stack them."""
        if not isinstance(tensors, (list, tuple)) or len(tensors) == 0:
            raise ValueError("ImageList.from_tensors needs a non-empty list of tensors")
        lead = tensors[0].shape[:-2]
        for t in tensors:
            if t.dim() < 2 or t.shape[:-2] != lead:
                raise ValueError(
                    f"All images need shape [..., H, W] with leading dims {tuple(lead)}, "
                    f"got {tuple(t.shape)}"
                )
        image_sizes = [(int(t.shape[-2]), int(t.shape[-1])) for t in tensors]
        max_h = max(h for h, _ in image_sizes)
        max_w = max(w for _, w in image_sizes)
        if size_divisibility > 0:
            max_h = -(-max_h // size_divisibility) * size_divisibility
            max_w = -(-max_w // size_divisibility) * size_divisibility
        batch = tensors[0].new_full((len(tensors), *lead, max_h, max_w), pad_value)
        for img, slot in zip(tensors, batch):
            slot[..., : img.shape[-2], : img.shape[-1]].copy_(img)
        return ImageList(batch, image_sizes)
