#!/usr/bin/env python3
"""Class / concept names -> an embedding file in the original's format ([C, D] float tensor).

The original's command line works unchanged (names from ``INPUT_DIR/concepts.txt``, output
``OUTPUT_DIR/concept_embeds.pth``); ``--names`` also takes a COCO/LVIS json (its categories).
"""
import os
import sys

import torch

from regionclip.commands import check_writable
from regionclip.config import load_config, resolve_clip_variant
from regionclip.data.coco import class_names_from_file
from regionclip.engine.defaults import default_argument_parser, run_tool, setup_logging
from regionclip.engine.preflight import Input, check_inputs
from regionclip.modeling.text_encoder import save_embeddings
from regionclip.vocabulary import ClassNameEncoder


def main(argv=None) -> str:
    parser = default_argument_parser(__doc__, training=False)
    parser.add_argument("--names", default="",
                        help="txt (one name per line) or COCO/LVIS json; default "
                        "INPUT_DIR/concepts.txt")
    parser.add_argument("--output", default="", help="default OUTPUT_DIR/concept_embeds.pth")
    args = parser.parse_args(argv)
    cfg = load_config(args.config_file, args.opts)
    logger = setup_logging()
    names_file = args.names or os.path.join(cfg.INPUT_DIR, "concepts.txt")
    output = args.output or os.path.join(cfg.OUTPUT_DIR, "concept_embeds.pth")
    check_inputs([Input(names_file, "class / concept names (--names or INPUT_DIR/concepts.txt)"),
                  Input(cfg.MODEL.WEIGHTS, "checkpoint with the text tower (MODEL.WEIGHTS)")])
    check_writable(output, os.path.dirname(os.path.abspath(output)), "--output")
    names = class_names_from_file(names_file)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    encoder = ClassNameEncoder(cfg.MODEL.WEIGHTS, resolve_clip_variant(cfg), device, cache_dir="")
    embeddings = encoder(names)
    save_embeddings(embeddings, output)
    logger.info("Wrote %s embeddings of %d names to %s", list(embeddings.shape), len(names),
                output)
    return output


if __name__ == "__main__":
    sys.exit(run_tool(main, "extract_concept_features"))
