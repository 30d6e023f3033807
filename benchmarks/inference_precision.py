"""The seed zero-shot command end to end: exact fp32 path vs fast paths vs the GEMM floor.

Setting (test_zeroshot_inference.sh, RN50 RPN COCO): CLIP_fast_rcnn_R_50_C4_ovd_zsinf.yaml, the
LVIS R50-FPN offline RPN (NMS 0.9, 1000 proposals), 65 classes, MULTIPLY_RPN_SCORE True, one
800x1333 image; official-shaped generated weights (tests/_e2e_utils.py, frozen-BN statistics
from the image so that features stay finite and vary from region to region). Each run is
``CLIPFastRCNN.inference`` on the image (RPN, trunk, regions, post-processing); medians of
--repeats runs after a warm-up, exact and fast runs interleaved so that load from other
programs hits both alike.

Generated RPN weights give every proposal a positive objectness logit, so no region is skipped
by the fused-score bound; --low-objectness F gives a fraction F of the proposals a
negative logit (a trained RPN's low-objectness tail, by a shift of all logits) to show what
skipping saves.

Columns: ``wall s`` / ``cpu s`` (process CPU time, all threads: unlike wall time it does not
grow when other programs share the cores); ``TFLOP`` (fvcore, multiply-adds x 2, of the work
done); ``floor`` = TFLOP / the fp32 GEMM rate of torch.matmul at the job's dominant shapes,
timed in this run (CPU-seconds; seconds on a GPU); ``x floor`` = cpu s / floor; ``x fp32`` =
speed-up over the exact path at the same F (CPU time; wall time on a GPU); ``matched`` = fp32
detections matched by this path (same class, IoU >= 0.9, |score difference| <= 0.02; issue
14's fast-path criterion).

Usage: python benchmarks/inference_precision.py [--precisions fp32 fp32-fast bf16]
       [--low-objectness 0 0.5] [--repeats 3] [--device cpu]
"""
import statistics
import sys
import time
from pathlib import Path

import torch
from fvcore.nn import FlopCountAnalysis

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from _agreement import matched_fraction  # noqa: E402
from _common import benchmark_parser, norms_from_inputs  # noqa: E402
from _e2e_utils import module_state_shapes, rectangles_image, sane_state_dict  # noqa: E402

from regionclip.config import load_config  # noqa: E402
from regionclip.modeling.build import build_model  # noqa: E402
from regionclip.modeling.clip_resnet import pool_regions  # noqa: E402
from regionclip.structures import ImageList  # noqa: E402

CONFIG = REPO / "configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_ovd_zsinf.yaml"
RPN_CONFIG = REPO / "configs/LVISv1-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"
IMAGE_HW = (800, 1333)
NUM_CLASSES = 65
CHUNK = 128  # regions per res5 pass (clip_resnet.INFERENCE_CHUNK)
# (M, K, N) of the dominant GEMMs: res5's 3x3 conv, its 1x1 convs, attention-pool projections.
GEMM_SHAPES = ((CHUNK * 196, 4608, 512), (CHUNK * 49, 512, 2048), (CHUNK * 50, 2048, 2048))


def build(device: str, inputs):
    """The seed model with generated weights whose frozen-BN statistics are taken from
    ``inputs`` (see `norms_from_inputs`): finite, varied region embeddings and proposals."""
    cfg = load_config(str(CONFIG), [
        "MODEL.DEVICE", device, "MODEL.CLIP.CROP_REGION_TYPE", "RPN",
        "MODEL.CLIP.MULTIPLY_RPN_SCORE", "True", "MODEL.CLIP.OFFLINE_RPN_CONFIG", str(RPN_CONFIG)])
    model = build_model(cfg).eval().requires_grad_(False)
    model.load_state_dict(sane_state_dict(module_state_shapes(model, ""), full=True),
                          strict=False)
    gen = torch.Generator().manual_seed(0)
    model.roi_heads.box_predictor.set_test_embeddings(torch.randn(NUM_CLASSES, 1024,
                                                                  generator=gen))
    model.to(device)
    regions = torch.tensor([[0, 0, 600, 500], [300, 200, 900, 700], [100, 400, 1300, 790.0]])
    with torch.no_grad(), norms_from_inputs(model):
        model.get_proposals(inputs)
        model.embed_regions(inputs, [regions])
    return model


def with_low_objectness(model, fraction: float):
    """Make ``model.get_proposals`` shift the objectness logits so that a ``fraction`` of the
    proposals falls below zero (a monotone shift: ranks, and so the proposals, are kept)."""
    original = model.get_proposals

    def get_proposals(batched_inputs):
        proposals = original(batched_inputs)
        for p in proposals:
            p.objectness_logits = p.objectness_logits - torch.quantile(p.objectness_logits,
                                                                       fraction)
        return proposals
    if fraction > 0:
        model.get_proposals = get_proposals


def gemm_rate(device: str, repeats: int = 3) -> float:
    """Best fp32 torch.matmul rate over GEMM_SHAPES, in FLOP per CPU-second (CPU) or per
    second (CUDA), median of ``repeats``."""
    rates = []
    for m, k, n in GEMM_SHAPES:
        a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
        torch.matmul(a, b)
        times = []
        for _ in range(repeats):
            times.append(_timed(lambda: torch.matmul(a, b), device)[1 if device == "cpu" else 0])
        rates.append(2 * m * k * n / statistics.median(times))
    return max(rates)


def _timed(fn, device: str):
    """(wall s, cpu s, result) of ``fn()``."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def _flops(fn, *inputs) -> float:
    class Wrapped(torch.nn.Module):
        def forward(self, *args):
            return fn(*args)
    analysis = FlopCountAnalysis(Wrapped(), inputs)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    return 2.0 * analysis.total()


@torch.no_grad()
def job_flops(model, inputs, regions: int) -> float:
    """FLOPs of the run: offline RPN, trunk to res4, res5 + attention pool per region."""
    image = inputs[0]["image"].to(model.device)
    rpn_input = ImageList.from_tensors([model.offline_input.normalize(image)],
                                       model.offline_backbone.size_divisibility).tensor
    features = model.offline_backbone(rpn_input)
    head = model.offline_proposal_generator.rpn_head
    trunk = model.trunk()
    boxes = torch.tensor([[100.0, 100.0, 300.0, 300.0]] * 4, device=model.device)
    sample = pool_regions(trunk(model.preprocess(inputs).tensor)["res4"], [boxes], 14)
    return (_flops(lambda x: list(model.offline_backbone(x).values()), rpn_input)
            + _flops(lambda *f: head(list(f)), *features.values())
            + _flops(lambda x: trunk(x)["res4"], model.preprocess(inputs).tensor)
            + _flops(lambda x: trunk.attnpool(trunk.layer4(x)), sample) * regions / 4)


def run(model, inputs, precision: str, device: str):
    model.precision = precision
    regions = []
    embed = model.backbone.embed_regions.__func__

    def counting(trunk, res4, boxes, resolution):
        regions.append(sum(len(b) for b in boxes))
        return embed(trunk, res4, boxes, resolution)
    type(model.backbone).embed_regions = counting
    try:
        wall, cpu, out = _timed(lambda: model.inference(inputs)[0]["instances"], device)
    finally:
        type(model.backbone).embed_regions = embed
    return wall, cpu, out, regions[0]


def main(argv=None) -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "fp32-fast"])
    parser.add_argument("--low-objectness", nargs="+", type=float, default=[0.0, 0.5])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    image = torch.from_numpy(rectangles_image(*IMAGE_HW, seed=0)).permute(2, 0, 1).float()
    inputs = [{"image": image, "height": IMAGE_HW[0], "width": IMAGE_HW[1]}]
    model = build(args.device, inputs)
    rate = gemm_rate(args.device)
    unit = "CPU-s" if args.device == "cpu" else "s"
    print(f"RN50 zero-shot, 1 image {IMAGE_HW[0]}x{IMAGE_HW[1]}, {NUM_CLASSES} classes, fused "
          f"RPN scores; {args.device}, {torch.get_num_threads()} threads; fp32 GEMM rate "
          f"{rate / 1e9:.0f} GFLOP per {unit}; median of {args.repeats} runs")
    header = ("precision", "low obj.", "regions", "wall s", "cpu s", "TFLOP", "floor",
              "x floor", "x fp32", "matched")
    print("  ".join(f"{h:>9}" for h in header))
    for fraction in args.low_objectness:
        model.__dict__.pop("get_proposals", None)
        with_low_objectness(model, fraction)
        for precision in args.precisions:  # warm-up: allocator, thread pools, fast copies
            run(model, inputs, precision, args.device)
        runs = {p: [] for p in args.precisions}
        for _ in range(args.repeats):
            for precision in args.precisions:
                runs[precision].append(run(model, inputs, precision, args.device))
        reference = runs[args.precisions[0]][-1][2]
        spent = 1 if args.device == "cpu" else 0  # CPU time on the CPU, wall time on a GPU
        base = statistics.median(r[spent] for r in runs[args.precisions[0]])
        for precision, results in runs.items():
            model.precision = precision
            wall, cpu = (statistics.median(r[i] for r in results) for i in (0, 1))
            out, regions = results[-1][2], results[-1][3]
            flops = job_flops(model, inputs, regions)
            floor = flops / rate
            matched, total = matched_fraction(
                [(reference.pred_boxes.tensor, reference.scores, reference.pred_classes)],
                [(out.pred_boxes.tensor, out.scores, out.pred_classes)])
            row = (precision, fraction, regions, f"{wall:.1f}", f"{cpu:.1f}",
                   f"{flops / 1e12:.2f}", f"{floor:.1f}", f"{(wall, cpu)[spent] / floor:.2f}",
                   f"{base / (wall, cpu)[spent]:.2f}", f"{matched}/{total}")
            print("  ".join(f"{str(v):>9}" for v in row), flush=True)


if __name__ == "__main__":
    main()
