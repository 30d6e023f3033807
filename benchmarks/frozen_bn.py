"""Time regionclip's FrozenBatchNorm2d against torchvision's, at activation shapes of our models.

Every ResNet layer of the CLIP trunks and the offline RPN normalises through a frozen batch
norm. torchvision's writes two full-size tensors per call (the product, then the sum);
``regionclip.ops.FrozenBatchNorm2d`` adds the bias in place to the product. The script checks
that the outputs are bit-identical and prints the median time of each (interleaved, so other
load affects both alike) and the ratio.

Shapes: res2 and res4 of an 800x1333 image (zero-shot inference), res2 of a 32-image toy
pretraining batch (416x480 padded), 1000 RoIs at res5 (the region head).

Usage: python benchmarks/frozen_bn.py [--repeats 7] [--device cpu]
"""
import statistics
import time

import torch
import torchvision
from _common import benchmark_parser

from regionclip.ops import FrozenBatchNorm2d

SHAPES = {
    "res2, 800x1333 image": (1, 256, 200, 334),
    "res4, 800x1333 image": (1, 1024, 50, 84),
    "res2, toy batch 32": (32, 64, 104, 120),
    "res5, 1000 RoIs": (1000, 512, 7, 7),
}


def pair(channels: int, device: str):
    reference = torchvision.ops.misc.FrozenBatchNorm2d(channels)
    for buffer in reference.buffers():
        buffer.uniform_(0.3, 2.0)
    ours = FrozenBatchNorm2d(channels)
    ours.load_state_dict(reference.state_dict())
    return reference.to(device), ours.to(device)


def timed(module, x, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    module(x)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


@torch.no_grad()
def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(f"FrozenBatchNorm2d, {args.device}, {torch.get_num_threads()} threads, median of "
          f"{args.repeats} interleaved calls after a warm-up")
    print(f"{'activation':>24} {'torchvision ms':>15} {'regionclip ms':>14} {'speed-up':>9} "
          f"{'bit-identical':>14}")
    for name, shape in SHAPES.items():
        reference, ours = pair(shape[1], args.device)
        x = torch.randn(shape, device=args.device)
        same = torch.equal(reference(x), ours(x))  # also the warm-up
        times = {reference: [], ours: []}
        for _ in range(args.repeats):
            for module in times:
                times[module].append(timed(module, x, args.device))
        ref_ms, our_ms = (1e3 * statistics.median(times[m]) for m in (reference, ours))
        print(f"{name:>24} {ref_ms:15.1f} {our_ms:14.1f} {ref_ms / our_ms:8.2f}x {str(same):>14}")


if __name__ == "__main__":
    main()
