#!/usr/bin/env python3
"""Train and evaluate RegionCLIP detectors, with detectron2's command line.

    python3 tools/train_net.py --num-gpus 1 --config-file CONFIG [--resume] [KEY VALUE ...]
    python3 tools/train_net.py --eval-only --num-gpus 1 --config-file CONFIG [KEY VALUE ...]
    torchrun --nproc_per_node 8 tools/train_net.py --config-file CONFIG [KEY VALUE ...]

Both load ``MODEL.WEIGHTS``, then (with RPN proposals) the offline RPN weights of
``MODEL.CLIP.BB_RPN_WEIGHTS``. Training runs on ``DATASETS.TRAIN`` (catalog names, or
``coco_json:<json>:<image_dir>`` for a COCO-format dataset of your own; image-caption data
for ``PretrainFastRCNN`` configs), writes checkpoints, ``metrics.json`` and TensorBoard files to
``OUTPUT_DIR`` and evaluates every ``TEST.EVAL_PERIOD`` iterations and at the end; ``--resume``
continues from the last checkpoint in ``OUTPUT_DIR`` instead of loading the initial weights.
Evaluation runs inference on every dataset of ``DATASETS.TEST`` and writes
``OUTPUT_DIR/inference/{coco,lvis}_instances_results.json`` plus the metrics; an RPN alone
(``META_ARCHITECTURE ProposalNetwork``) is evaluated by the recall of the ground-truth boxes by
its proposals (AR@100, AR@1000, R@k_IoU0.5/0.7). The steps are in
``regionclip/engine/defaults.py``.
"""
import sys

from regionclip.engine.defaults import default_argument_parser, main, run

__all__ = ["default_argument_parser", "main", "run"]  # main: what the tests run in-process

if __name__ == "__main__":
    sys.exit(run(default_argument_parser().parse_args()))
