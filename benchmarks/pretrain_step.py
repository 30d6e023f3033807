"""Images per second and peak memory of one RN50 region-text pretraining step at batch 2.

Setting: configs/pretrain/RegionCLIP_RN50.yaml as shipped (RN50 student and RN50 teacher, 300
offline-RPN proposals per image after NMS 0.5, 100 sampled per image, all three losses, SGD
with per-tensor gradient clipping) with the LVIS R50-FPN offline RPN
(mask_rcnn_R_50_FPN_1x.yaml), random weights and a random 4764 x 1024 concept pool (the size of
the original's COCO-nouns pool). Each step is one full training step of the real loop
(``Trainer.run_step``: offline RPN, teacher and student forward, pseudo labels, losses,
backward, clipping, SGD step) on 2 synthetic 800x1067 images (an image of CC3M's typical 4:3
shape after the 800-pixel resize) with 1-5 captions each. Median over --iters steps after
--warmup steps.

The offline RPN's norm statistics are set from its own activations on the batch: with random
weights the 50-layer backbone's activations grow to thousands and the RPN proposes nothing; so
initialised it returns its full 300 boxes and every later part works on realistic numbers.

Peak memory: on CUDA torch.cuda.max_memory_allocated over the timed steps; on the CPU the
growth of the process's peak resident set (ru_maxrss) over the model-loaded baseline.

Usage: python benchmarks/pretrain_step.py [--device cpu cuda] [--iters 3] [--amp]
"""
import tempfile
from pathlib import Path

import torch
from _common import check_devices, norms_from_inputs, step_parser, time_steps

from regionclip.config import load_config
from regionclip.engine.trainer import build_trainer
from regionclip.modeling.build import build_model
from regionclip.modeling.text_encoder import save_embeddings
from regionclip.prompts import tokenize

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
IMAGE_HW = (800, 1067)
BATCH = 2
NUM_CONCEPTS, CONCEPT_DIM = 4764, 1024
CAPTIONS = ("a dog running on the beach", "two people riding bicycles in a city street",
            "a red double decker bus", "a bowl of fruit on a wooden table", "a cat on a sofa")


def build(device: str, amp: bool, concept_file: str):
    overrides = [
        "MODEL.DEVICE", device, "OUTPUT_DIR", "", "SOLVER.AMP.ENABLED", str(amp),
        "MODEL.CLIP.OFFLINE_RPN_CONFIG",
        str(CONFIGS / "LVISv1-InstanceSegmentation" / "mask_rcnn_R_50_FPN_1x.yaml"),
        "MODEL.CLIP.CONCEPT_POOL_EMB", concept_file, "SOLVER.IMS_PER_BATCH", str(BATCH),
    ]
    cfg = load_config(str(CONFIGS / "pretrain" / "RegionCLIP_RN50.yaml"), overrides)
    model = build_model(cfg).train()
    return model, build_trainer(cfg, model, data_loader=None, tensorboard=False)


def synthetic_batch(gen: torch.Generator):
    """BATCH image-text records as the pretraining data yields them."""
    batch = []
    for i in range(BATCH):
        captions = list(CAPTIONS[:1 + (2 * i + 2) % len(CAPTIONS)])
        batch.append({"image": torch.rand(3, *IMAGE_HW, generator=gen), "height": IMAGE_HW[0],
                      "width": IMAGE_HW[1], "tokens": tokenize(captions)})
    return batch


@torch.no_grad()
def calibrate_offline_rpn(model, batch) -> int:
    """Set each offline norm layer's statistics to those of its input; returns the number of
    proposals of the first image afterwards."""
    images = [x["image"].to(model.device) for x in batch]
    with norms_from_inputs(model.offline_backbone):
        model.sample_proposals(images)
    sample_regions, model.sample_regions = model.sample_regions, 0
    count = len(model.sample_proposals(images)[0])
    model.sample_regions = sample_regions
    return count


def benchmark(device: str, iters: int, warmup: int, amp: bool) -> dict:
    gen = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        concepts = f"{folder}/concepts_{NUM_CONCEPTS}.pth"
        save_embeddings(torch.randn(NUM_CONCEPTS, CONCEPT_DIM, generator=gen), concepts)
        model, trainer = build(device, amp, concepts)
    batch = synthetic_batch(gen)
    proposals = calibrate_offline_rpn(model, batch)
    timed = time_steps(lambda it: trainer.run_step(it, batch), device, iters, warmup)
    return {"step": timed["step"], "memory": timed["memory"], "losses": timed["result"],
            "proposals": proposals}


def main(argv=None) -> None:
    parser = step_parser(__doc__)
    args = parser.parse_args(argv)
    check_devices(args.device)

    print(f"RN50 region-text pretraining step (RN50 teacher, LVIS R50-FPN offline RPN, "
          f"{NUM_CONCEPTS} concepts), batch {BATCH} of {IMAGE_HW[0]}x{IMAGE_HW[1]}, AMP "
          f"{'on' if args.amp else 'off'}; median of {args.iters} steps after {args.warmup} "
          "warm-up")
    header = ("device", "threads", "step ms", "images/s", "peak MiB", "proposals", "losses")
    print("  ".join(f"{h:>9}" for h in header))
    for device in args.device:
        r = benchmark(device, args.iters, args.warmup, args.amp)
        losses = " ".join(f"{k}={v:.3g}" for k, v in sorted(r["losses"].items()))
        row = [device, torch.get_num_threads(), f"{r['step'] * 1000:.0f}",
               f"{BATCH / r['step']:.2f}", f"{r['memory']:.0f}", r["proposals"], losses]
        print("  ".join(f"{str(v):>9}" for v in row))


if __name__ == "__main__":
    main()
