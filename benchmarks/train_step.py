"""Iterations per second and peak memory of RN50 open-vocabulary fine-tuning at batch 2.

Setting: the COCO OVD fine-tuning config (CLIP_fast_rcnn_R_50_C4_ovd.yaml: RN50 trunk frozen up
to res2, 48 base classes, 512 sampled RoIs per image, focal-scaled loss) with its R50-C4 offline
RPN (mask_rcnn_R_50_C4_1x_ovd_FSD.yaml), random weights and random class embeddings. Each
iteration is one full training step of the real loop (``Trainer.run_step``: forward with the
frozen RPN, losses, backward, SGD step) on 2 synthetic 800x1067 images (COCO's typical size
after the 800-pixel resize) with 4 ground-truth boxes each. Median over --iters steps after
--warmup steps.

Peak memory: on CUDA torch.cuda.max_memory_allocated over the timed steps; on the CPU the
growth of the process's peak resident set (ru_maxrss) over the model-loaded baseline.

``--channels-last`` adds a row per device with ``MODEL.CHANNELS_LAST True`` and its speed-up
over the default layout, the two models' steps interleaved (peak memory then not measured).

Usage: python benchmarks/train_step.py [--device cpu cuda] [--iters 3] [--amp] [--channels-last]
"""
from pathlib import Path

import torch
from _common import check_devices, step_parser, time_interleaved

from regionclip.config import load_config
from regionclip.engine.trainer import build_trainer
from regionclip.modeling.build import build_model
from regionclip.structures import Boxes, Instances

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "COCO-InstanceSegmentation"
IMAGE_HW = (800, 1067)
BATCH = 2
BOXES_PER_IMAGE = 4
NUM_CLASSES = 48


def build(device: str, amp: bool, channels_last: bool):
    overrides = [
        "MODEL.DEVICE", device, "OUTPUT_DIR", "", "SOLVER.AMP.ENABLED", str(amp),
        "MODEL.CHANNELS_LAST", str(channels_last),
        "MODEL.CLIP.OFFLINE_RPN_CONFIG", str(CONFIGS / "mask_rcnn_R_50_C4_1x_ovd_FSD.yaml"),
    ]
    cfg = load_config(str(CONFIGS / "CLIP_fast_rcnn_R_50_C4_ovd.yaml"), overrides)
    model = build_model(cfg).train()
    return build_trainer(cfg, model, data_loader=None, tensorboard=False)


def synthetic_batch(gen: torch.Generator, device: str):
    """BATCH images with BOXES_PER_IMAGE random boxes of 64..400 pixels each."""
    h, w = IMAGE_HW
    batch = []
    for _ in range(BATCH):
        size = 64 + torch.rand(BOXES_PER_IMAGE, 2, generator=gen) * 336
        corner = torch.rand(BOXES_PER_IMAGE, 2, generator=gen) * (torch.tensor([w, h]) - size)
        boxes = torch.cat([corner, corner + size], dim=1)
        classes = torch.randint(NUM_CLASSES, (BOXES_PER_IMAGE,), generator=gen)
        image = torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8).float()
        batch.append({"image": image.to(device), "height": h, "width": w,
                      "instances": Instances(IMAGE_HW, gt_boxes=Boxes(boxes),
                                             gt_classes=classes)})
    return batch


def benchmark(device: str, iters: int, warmup: int, amp: bool, layouts) -> list:
    """One result per layout (False: default, True: channels-last), timed interleaved."""
    gen = torch.Generator().manual_seed(0)
    batch = synthetic_batch(gen, device)
    steps = []
    for channels_last in layouts:
        torch.manual_seed(0)  # the same random weights in every layout
        trainer = build(device, amp, channels_last)
        steps.append(lambda it, trainer=trainer: trainer.run_step(it, batch))
    return time_interleaved(steps, device, iters, warmup)


def main(argv=None) -> None:
    parser = step_parser(__doc__)
    parser.add_argument("--channels-last", action="store_true",
                        help="also time MODEL.CHANNELS_LAST True against the default layout")
    args = parser.parse_args(argv)
    check_devices(args.device)

    print(f"RN50 COCO OVD fine-tuning step, batch {BATCH} of {IMAGE_HW[0]}x{IMAGE_HW[1]}, "
          f"AMP {'on' if args.amp else 'off'}; median of {args.iters} steps after "
          f"{args.warmup} warm-up")
    header = ("device", "layout", "threads", "step ms", "iter/s", "x default", "peak MiB",
              "losses")
    print("  ".join(f"{h:>9}" for h in header))
    layouts = (False, True) if args.channels_last else (False,)
    for device in args.device:
        results = benchmark(device, args.iters, args.warmup, args.amp, layouts)
        for channels_last, r in zip(layouts, results):
            memory = "n/a" if r["memory"] is None else f"{r['memory']:.0f}"
            losses = " ".join(f"{k}={v:.3g}" for k, v in sorted(r["result"].items()))
            row = [device, "chan-last" if channels_last else "default", torch.get_num_threads(),
                   f"{r['step'] * 1000:.0f}", f"{1 / r['step']:.2f}",
                   f"{results[0]['step'] / r['step']:.2f}", memory, losses]
            print("  ".join(f"{str(v):>9}" for v in row), flush=True)


if __name__ == "__main__":
    main()
