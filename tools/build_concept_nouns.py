#!/usr/bin/env python3
"""Captions -> a concept-pool nouns list (one name per line, most frequent first).

Making a concept pool for pretraining takes two steps:

1. This tool counts how many captions mention each candidate name and keeps the names
   mentioned at least ``--min-count`` times::

       python tools/build_concept_nouns.py --captions datasets/cc3m \\
           --lvis-json datasets/lvis/lvis_v1_val.json --min-count 5 --output nouns.txt

   ``--captions`` takes any pretraining data form (a TSV folder or text TSV, a webdataset
   folder / brace pattern / shard list, a jsonl folder or file) or a txt file with one caption
   per line; images are not read. The candidates (``--vocabulary default``) are the COCO 80
   names plus the LVIS 1203 names of ``--lvis-json`` (LVIS names are not shipped; without the
   json only the COCO names are used, which include the 65 COCO OVD names); ``--vocabulary``
   also takes a txt (one name per line) or a COCO/LVIS json. Matching is whole-word and
   case-insensitive, multi-word names match as phrases, plurals count (see
   ``regionclip/data/nouns.py``). When spaCy or nltk is installed with its English data, a
   noun parser also proposes frequent nouns outside the vocabulary (``--parser none`` turns
   this off).

2. ``tools/extract_concept_features.py`` embeds the names with a CLIP text tower into the file
   that ``MODEL.CLIP.CONCEPT_POOL_EMB`` (and ``TEACHER_CONCEPT_POOL_EMB``) read::

       python tools/extract_concept_features.py \\
           --config-file configs/pretrain/RegionCLIP_RN50.yaml --names nouns.txt \\
           --output pretrained_ckpt/concept_emb/my_nouns_emb.pth \\
           MODEL.WEIGHTS <OpenAI CLIP or pretrained RegionCLIP weights holding the text tower>

   (use the RN50x4 config and weights for an RN50x4 pool).
"""
import argparse
import logging
import os
import sys

from regionclip.atomic import atomic_open
from regionclip.data.coco import class_names_from_file
from regionclip.data.nouns import (
    CAPTION_FORMATS,
    build_concept_nouns,
    default_vocabulary,
    iter_caption_texts,
    load_noun_parser,
)
from regionclip.engine.defaults import run_tool

logger = logging.getLogger("regionclip.nouns")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", required=True, help="dataset or caption txt path")
    parser.add_argument("--format", default="auto", choices=CAPTION_FORMATS,
                        help="form of --captions (auto: from its name and contents)")
    parser.add_argument("--vocabulary", default="default",
                        help="'default' (COCO + LVIS names), or a txt / COCO or LVIS json")
    parser.add_argument("--lvis-json", default="", help="LVIS json adding its names to default")
    parser.add_argument("--min-count", type=int, default=5,
                        help="keep names mentioned in at least this many captions")
    parser.add_argument("--parser", default="auto", choices=("auto", "spacy", "nltk", "none"),
                        help="noun parser proposing names outside the vocabulary")
    parser.add_argument("--output", required=True, help="nouns txt to write")
    return parser.parse_args(argv)


def main(argv=None) -> str:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.vocabulary == "default":
        vocabulary = default_vocabulary(args.lvis_json or None)
    else:
        vocabulary = class_names_from_file(args.vocabulary)
    nouns = build_concept_nouns(iter_caption_texts(args.captions, args.format), vocabulary,
                                args.min_count, load_noun_parser(args.parser))
    if not nouns:
        raise SystemExit(f"no name is mentioned {args.min_count} times in {args.captions}")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with atomic_open(args.output, "w", encoding="utf-8") as f:
        f.writelines(f"{name}\n" for name, _ in nouns)
    logger.info("Wrote %d nouns (of %d candidates) to %s; most frequent: %s", len(nouns),
                len(vocabulary), args.output, ", ".join(f"{n} ({c})" for n, c in nouns[:10]))
    return args.output


if __name__ == "__main__":
    sys.exit(run_tool(main, "build_concept_nouns"))
