"""Time `batched_soft_nms` on one LVIS-sized image: 1000 proposals x 1203 classes.

Inference replicates each class-agnostic box per class and keeps (box, class) pairs whose
score exceeds SCORE_THRESH_TEST (0.02 in the LVIS configs) before soft-NMS; the number of
surviving pairs drives the cost, so the script prints it next to the time. Score models:
  softmax  class probabilities of a CLIP-style cosine classifier (temperature 0.01)
  rpn      sqrt(probability * raw RPN objectness logit), the MULTIPLY_RPN_SCORE path
  uniform  uniform random scores (stress case: almost every pair survives)

Usage: python benchmarks/soft_nms.py [--scores softmax rpn] [--device cpu]
"""
import time

import torch
from _common import benchmark_parser

from regionclip.modeling.box_predictor import batched_soft_nms

IMAGE_HW = (800, 1333)
NUM_OBJECTS = 30  # proposal clusters: RPN boxes crowd around objects
EMBED_DIM = 1024
TEMPERATURE = 0.01


def proposals(num_boxes: int, gen: torch.Generator) -> torch.Tensor:
    """[num_boxes, 4] xyxy boxes jittered around a few object boxes."""
    h, w = IMAGE_HW
    centres = torch.rand(NUM_OBJECTS, 2, generator=gen) * torch.tensor([w, h])
    sizes = 32 + torch.rand(NUM_OBJECTS, 2, generator=gen) * 300
    owner = torch.randint(NUM_OBJECTS, (num_boxes,), generator=gen)
    ctr = centres[owner] + torch.randn(num_boxes, 2, generator=gen) * sizes[owner] * 0.15
    size = sizes[owner] * torch.exp(torch.randn(num_boxes, 2, generator=gen) * 0.2)
    boxes = torch.cat([ctr - size / 2, ctr + size / 2], dim=1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    return boxes


def class_scores(kind: str, num_boxes: int, num_classes: int, gen: torch.Generator):
    """[num_boxes, num_classes] scores under the chosen score model."""
    if kind == "uniform":
        return torch.rand(num_boxes, num_classes, generator=gen)
    regions = torch.nn.functional.normalize(torch.randn(num_boxes, EMBED_DIM, generator=gen), dim=1)
    concepts = torch.nn.functional.normalize(
        torch.randn(num_classes, EMBED_DIM, generator=gen), dim=1
    )
    logits = torch.cat([regions @ concepts.T, torch.zeros(num_boxes, 1)], dim=1) / TEMPERATURE
    probs = logits.softmax(dim=1)[:, :-1]
    if kind == "softmax":
        return probs
    objectness = torch.randn(num_boxes, 1, generator=gen) * 3
    return torch.sqrt(probs * objectness)  # NaN for negative logits, dropped below


def candidates(boxes, scores, threshold):
    """The per-class replication and score filter of Fast R-CNN inference."""
    keep = torch.isfinite(scores) & (scores > threshold)
    box_idx, cls_idx = keep.nonzero(as_tuple=True)
    return boxes[box_idx], scores[box_idx, cls_idx], cls_idx


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--boxes", type=int, default=1000)
    parser.add_argument("--classes", type=int, default=1203)
    parser.add_argument("--threshold", type=float, default=0.02)
    parser.add_argument(
        "--scores", nargs="+", default=["softmax", "rpn"], choices=["softmax", "rpn", "uniform"]
    )
    parser.add_argument("--method", default="gaussian", choices=["gaussian", "linear", "hard"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(0)
    boxes = proposals(args.boxes, gen)
    for kind in args.scores:
        scores = class_scores(kind, args.boxes, args.classes, gen)
        b, s, c = (t.to(args.device) for t in candidates(boxes, scores, args.threshold))
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            keep, _ = batched_soft_nms(b, s, c, method=args.method)
            if b.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        per_class = torch.bincount(c).max().item() if len(c) else 0
        print(
            f"{kind:8s} {args.method} {args.boxes} boxes x {args.classes} classes, "
            f"score > {args.threshold}: {len(s)} pairs (max {per_class} in one class), "
            f"{len(keep)} kept; best of {args.repeat}: {min(times) * 1000:.1f} ms "
            f"on {args.device} ({torch.get_num_threads()} threads)"
        )


if __name__ == "__main__":
    main()
