"""The one import site of torchvision's compiled detection ops, and its frozen batch norm.

torchvision's C++ ops only load when torchvision was built against the installed torch. A
mismatched pair (for example a CPU-only torch wheel next to the registry's torchvision) fails
deep inside the first call with an obscure "operator does not exist" error, so we check once
at import time and say what to do.
"""
import torch

try:
    import torchvision
    from torchvision.ops import batched_nms, box_iou, misc, nms, roi_align

    nms(torch.zeros(1, 4), torch.zeros(1), 0.5)  # forces the compiled op to load
except (ImportError, RuntimeError) as e:  # pragma: no cover - depends on the install
    raise ImportError(
        f"torchvision's compiled ops failed to load ({e}). torch {torch.__version__} and the "
        "installed torchvision do not match. Reinstall both together from the package "
        "registry: `pip install --force-reinstall torch torchvision` (CPU-only machines: add "
        "`--index-url https://download.pytorch.org/whl/cpu`; do not pin torch to a local wheel)."
    ) from e



class FrozenBatchNorm2d(misc.FrozenBatchNorm2d):
    """torchvision's frozen batch norm with bit-identical outputs, one full-size temporary
    fewer: the bias is added in place to the product. Every ResNet layer of every model runs
    through it, and on the CPU a pass over a large activation costs as much as writing fresh
    memory; 1.6-3.2x faster per call measured on 2 cores (benchmarks/frozen_bn.py)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        return (x * scale.reshape(1, -1, 1, 1)).add_(bias.reshape(1, -1, 1, 1))


__all__ = ["FrozenBatchNorm2d", "batched_nms", "box_iou", "nms", "roi_align", "torchvision"]
