"""Latency and peak memory of zero-shot inference on one LVIS-sized image.

Setting: the LVIS zero-shot config (CLIP_fast_rcnn_R_50_C4_zsinf.yaml) with the LVIS R50-FPN
offline RPN, random weights, one 800x1333 image (no resizing), 1203 classes and exactly 1000
regions (--regions: fewer, as MODEL.CLIP.OFFLINE_RPN_POST_NMS_TOPK_TEST gives). The parts are
timed separately, median over --repeats runs after one warm-up:

  rpn       offline RPN proposals with the config's settings (NMS 0.9, top --regions; the count
            it returned is printed)
  backbone  the CLIP trunk up to res4
  head      the region head on 1000 given boxes: RoIAlign, res5 and attention pool per region,
            the 1203-way classifier, RPN-score fusion, per-class NMS and top-k
  total     rpn + backbone + head; "cpu s" is the process CPU time of one run (all threads),
            which, unlike wall time, does not grow when other programs share the cores

Peak memory: on CUDA torch.cuda.max_memory_allocated over the runs; on the CPU the growth of
the process's peak resident set (ru_maxrss) over the model-loaded baseline.

Usage: python benchmarks/zero_shot_inference.py [--device cpu cuda] [--repeats 3] [--variant RN50]
       [--regions 1000]
"""
import statistics
import sys
import time
from pathlib import Path

import torch
from _common import benchmark_parser, norms_from_inputs, peak_memory_mib, peak_rss_mib, sync

from regionclip.config import load_config
from regionclip.modeling.build import build_model
from regionclip.structures import Boxes, Instances

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "LVISv1-InstanceSegmentation"
IMAGE_HW = (800, 1333)
NUM_REGIONS = 1000
PARTS = ("rpn", "backbone", "head")


def build(variant: str, device: str, regions: int):
    overrides = [
        "MODEL.CLIP.VARIANT", variant, "MODEL.DEVICE", device,
        "MODEL.CLIP.CROP_REGION_TYPE", "RPN",
        "MODEL.CLIP.OFFLINE_RPN_CONFIG", str(CONFIGS / "mask_rcnn_R_50_FPN_1x.yaml"),
        "MODEL.CLIP.OFFLINE_RPN_POST_NMS_TOPK_TEST", str(regions),
    ]
    cfg = load_config(str(CONFIGS / "CLIP_fast_rcnn_R_50_C4_zsinf.yaml"), overrides)
    return build_model(cfg).eval()


def given_regions(gen: torch.Generator, device, count: int) -> Instances:
    """``count`` boxes of 32..400 px inside the image, with positive objectness logits
    (negative ones would be dropped by the RPN-score fusion and make the head cheaper)."""
    h, w = IMAGE_HW
    size = 32 + torch.rand(count, 2, generator=gen) * 368
    corner = torch.rand(count, 2, generator=gen) * (torch.tensor([w, h]) - size)
    boxes = torch.cat([corner, corner + size], dim=1)
    logits = torch.randn(count, generator=gen).abs() * 3
    return Instances(IMAGE_HW, proposal_boxes=Boxes(boxes.to(device)),
                     objectness_logits=logits.to(device))


@torch.no_grad()
def run_once(model, inputs, regions, device):
    """(wall seconds per part, CPU seconds, proposals from the RPN, detections from the head)."""
    times, cpu_start = [], time.process_time()
    start = time.perf_counter()
    proposals = model.get_proposals(inputs)
    sync(device)
    times.append(time.perf_counter() - start)
    start = time.perf_counter()
    res4 = model.res4(inputs)
    sync(device)
    times.append(time.perf_counter() - start)
    start = time.perf_counter()
    embeddings = model.embed_regions(inputs, [regions.proposal_boxes.tensor], res4)
    results = model.roi_heads.predict(embeddings, [regions], res4, model.backbone)
    sync(device)
    times.append(time.perf_counter() - start)
    return times, time.process_time() - cpu_start, len(proposals[0]), len(results[0])


def benchmark(variant: str, device: str, repeats: int, regions: int = NUM_REGIONS) -> dict:
    gen = torch.Generator().manual_seed(0)
    model = build(variant, device, regions)
    image = torch.randint(0, 256, (3, *IMAGE_HW), generator=gen, dtype=torch.uint8).float()
    inputs = [{"image": image.to(device), "height": IMAGE_HW[0], "width": IMAGE_HW[1]}]
    regions = given_regions(gen, device, regions)
    with norms_from_inputs(model.offline_backbone):  # random weights: see norms_from_inputs
        model.get_proposals(inputs)
    baseline = peak_rss_mib()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    run_once(model, inputs, regions, device)  # warm-up: allocator, kernels, thread pools
    runs = [run_once(model, inputs, regions, device) for _ in range(repeats)]
    per_part = {part: statistics.median(r[0][i] for r in runs) for i, part in enumerate(PARTS)}
    return {**per_part, "total": sum(per_part.values()),
            "memory": peak_memory_mib(device, baseline),
            "cpu": statistics.median(r[1] for r in runs), "proposals": runs[-1][2],
            "detections": runs[-1][3]}


def main(argv=None) -> None:
    parser = benchmark_parser(__doc__)
    default_devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    parser.add_argument("--device", nargs="+", default=default_devices)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variant", default="RN50", help="CLIP variant, e.g. RN50 or RN50x4")
    parser.add_argument("--regions", type=int, default=NUM_REGIONS,
                        help="regions per image (the RPN's top-k)")
    args = parser.parse_args(argv)
    if any(d.startswith("cuda") for d in args.device) and not torch.cuda.is_available():
        sys.exit("--device cuda was asked for but no GPU is available")

    print(f"{args.variant} zero-shot inference: one {IMAGE_HW[0]}x{IMAGE_HW[1]} image, "
          f"{args.regions} regions, 1203 classes; median of {args.repeats} runs after a warm-up")
    header = ("device", "threads", "rpn ms", "backbone ms", "head ms", "total ms", "cpu s",
              "peak MiB", "proposals", "detections")
    print("  ".join(f"{h:>11}" for h in header))
    for device in args.device:
        r = benchmark(args.variant, device, args.repeats, args.regions)
        row = [device, torch.get_num_threads(), *(f"{r[p] * 1000:.0f}" for p in PARTS),
               f"{r['total'] * 1000:.0f}", f"{r['cpu']:.1f}", f"{r['memory']:.0f}",
               r["proposals"], r["detections"]]
        print("  ".join(f"{str(v):>11}" for v in row))


if __name__ == "__main__":
    main()
