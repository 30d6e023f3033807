"""The regionclip command: detect named classes in images, or embed given regions.

examples:
  regionclip detect photos/ street.jpg --classes "cat,traffic cone" \\
      --weights pretrained_ckpt/regionclip/regionclip_pretrained-cc_rn50.pth \\
      --out results.json --vis drawn/
  regionclip embed street.jpg --boxes "10,20,200,180;0,0,50,50" \\
      --weights pretrained_ckpt/regionclip/regionclip_pretrained-cc_rn50.pth --out regions.pth

Every input is checked before the model is loaded (all missing files are named at once, with
where to get them), and so is that the outputs can be written; a failed run leaves no partial
results. Bad input is reported as one line with exit status 1 (REGIONCLIP_DEBUG=1 shows the
traceback). Progress bars and log lines go to stderr; --quiet leaves warnings and errors only.
"""
import argparse
import logging
import sys
from typing import Sequence

logger = logging.getLogger("regionclip")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model (defaults follow the checkpoint, see MODEL_ZOO.md)")
    group.add_argument("--weights", required=True, help="RegionCLIP checkpoint (.pth)")
    group.add_argument("--rpn-weights", help="offline RPN checkpoint (default: the one stored in "
                       "--weights, or the official one beside it)")
    group.add_argument("--variant", help="CLIP variant: RN50, RN50x4, ... (default: from weights)")
    group.add_argument("--config", help="YAML config replacing the checkpoint's official one")
    group.add_argument("--rpn-config", help="YAML config of the offline RPN")
    group.add_argument("--text-weights", help="file with the text tower, for fine-tuned weights")
    group.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: a GPU if present)")
    # A literal: importing regionclip.modeling.precision would load torch before --help.
    group.add_argument("--precision", choices=("fp32", "fp32-fast", "tf32", "bf16"),
                       help="fp32 (default, exact) or a fast path with the same detections up to "
                       "rounding (see README)")
    group.add_argument("--quiet", action="store_true",
                       help="no progress bars; log warnings and errors only")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regionclip", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    detect = commands.add_parser("detect", help="detect named classes in images",
                                 description="Detect named classes in images; write a "
                                 "COCO-style results json (image ids from 1, in the order of "
                                 "the images; category ids from 1, in vocabulary order).")
    detect.add_argument("images", nargs="+", help="image files and/or folders of images")
    names = detect.add_mutually_exclusive_group(required=True)
    names.add_argument("--classes", help='comma-separated class names, e.g. "cat,traffic cone"')
    names.add_argument("--vocabulary", help="class names: a text file (one per line) or a "
                       "COCO/LVIS json")
    detect.add_argument("--embeddings", help="precomputed [C, D] class embeddings for the names")
    detect.add_argument("--out", required=True, help="results json (COCO style)")
    detect.add_argument("--vis", default="", help="folder for the images with drawn detections")
    detect.add_argument("--score-threshold", type=float, help="replaces the config's threshold")
    detect.add_argument("--vis-threshold", type=float, default=0.05,
                        help="minimum score of a drawn detection")
    detect.add_argument("--batch-size", type=_positive_int, default=1,
                        help="images per forward pass")
    _model_arguments(detect)
    embed = commands.add_parser("embed", help="region embeddings of given boxes in an image",
                                description="Region embeddings (unit norm) of given boxes in "
                                "an image, comparable with CLIP text embeddings.")
    embed.add_argument("image")
    boxes = embed.add_mutually_exclusive_group(required=True)
    boxes.add_argument("--boxes", help='"x0,y0,x1,y1;x0,y0,x1,y1" in image pixels')
    boxes.add_argument("--boxes-json", help="json file: [[x0, y0, x1, y1], ...]")
    embed.add_argument("--out", required=True, help=".pth file: {'boxes', 'embeddings'}")
    _model_arguments(embed)
    return parser


def _setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(levelname)s] %(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


def main(argv: Sequence[str] = None) -> int:
    """Parse ``argv``, run the command; returns the exit status."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.quiet)
    # Imported only now: torch and the models take seconds to import, which --help, and a
    # mistyped option, should not wait for.
    from .commands import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
