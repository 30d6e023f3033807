"""Build the COCO open-vocabulary detection split files from the COCO 2017 instances files.

Reads ``<coco-root>/annotations/instances_{train,val}2017.json`` and writes
``<coco-root>/annotations/ovd_ins_{train,val}2017_{all,b,t}.json`` (65 classes, 48 base,
17 novel), the files behind the ``coco_2017_ovd_*`` datasets.
"""

import argparse
import logging
import os

from regionclip.data.coco_ovd import iter_ovd_jsons
from regionclip.evaluation.results import write_json_atomic

logger = logging.getLogger("prepare_coco_ovd")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--coco-root",
        default=os.path.join("datasets", "coco"),
        help="folder holding annotations/instances_{train,val}2017.json (default: %(default)s)",
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        for path, content in iter_ovd_jsons(args.coco_root):
            write_json_atomic(content, path)
            logger.info(
                "wrote %s: %d categories, %d images, %d annotations", path,
                len(content["categories"]), len(content["images"]), len(content["annotations"]),
            )
    except FileNotFoundError as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
