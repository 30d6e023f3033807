#!/usr/bin/env python3
"""Train and evaluate RegionCLIP detectors, with detectron2's command line.

    python3 tools/train_net.py --num-gpus 1 --config-file CONFIG [--resume] [KEY VALUE ...]
    python3 tools/train_net.py --eval-only --num-gpus 1 --config-file CONFIG [KEY VALUE ...]
    torchrun --nproc_per_node 8 tools/train_net.py --config-file CONFIG [KEY VALUE ...]

Both load ``MODEL.WEIGHTS``, then (with RPN proposals) the offline RPN weights of
``MODEL.CLIP.BB_RPN_WEIGHTS``. Training runs on ``DATASETS.TRAIN`` (catalog names, or
``coco_json:<json>:<image_dir>`` for a COCO-format dataset of your own; image-caption data
for ``PretrainFastRCNN`` configs, see ``regionclip/engine/pretraining.py``), writes checkpoints,
``metrics.json`` and TensorBoard files to ``OUTPUT_DIR`` and evaluates every
``TEST.EVAL_PERIOD`` iterations and at the end; ``--resume`` continues from the last checkpoint
in ``OUTPUT_DIR`` instead of loading the initial weights. Evaluation runs inference on every
dataset of ``DATASETS.TEST`` and writes ``OUTPUT_DIR/inference/{coco,lvis}_instances_results.json``
plus the metrics; an RPN alone (``META_ARCHITECTURE ProposalNetwork``) is evaluated by the recall
of the ground-truth boxes by its proposals (AR@100, AR@1000, R@k_IoU0.5/0.7).
"""
import json
import logging
import os

from regionclip.checkpoint import VOCABULARY_KEYS, load_checkpoint
from regionclip.data.catalog import get_dataset_dicts, get_metadata
from regionclip.data.loader import build_test_loader, build_train_loader
from regionclip.data.mapper import build_inference_mapper
from regionclip.engine.cli import default_argument_parser, setup
from regionclip.engine.launch import get_world_size, is_main_process, launch
from regionclip.engine.pretraining import build_pretrain_loader, is_pretraining, zero_shot_eval_fn
from regionclip.engine.solver import auto_scale_batch, auto_scale_workers
from regionclip.engine.trainer import build_trainer, last_checkpoint_path
from regionclip.evaluation import ProposalRecallEvaluator, build_evaluator
from regionclip.evaluation.inference import inference_on_dataset
from regionclip.evaluation.results import write_json_atomic
from regionclip.modeling.build import build_model
from regionclip.modeling.detic.build import test_classifier
from regionclip.modeling.detic.zero_shot_classifier import ZS_WEIGHT_KEY

logger = logging.getLogger("regionclip")


def load_weights(cfg, model) -> None:
    """``MODEL.WEIGHTS`` first, then the offline RPN file, as the original did.

    Vocabulary embeddings given as files win over the ones a fine-tuned checkpoint stores
    (the original let the checkpoint silently override a same-sized vocabulary).
    """
    clip = cfg.MODEL.CLIP
    protected = [key for key, path in zip(VOCABULARY_KEYS,
                                          (clip.TEXT_EMB_PATH, clip.OPENSET_TEST_TEXT_EMB_PATH))
                 if path]
    if cfg.MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH:
        protected.append(ZS_WEIGHT_KEY)
    if cfg.MODEL.WEIGHTS:
        load_checkpoint(model, cfg.MODEL.WEIGHTS, skip_prefixes=protected)
    if cfg.MODEL.WITH_CAPTION and cfg.MODEL.CAPTION_TEXT_WEIGHTS:  # Detic: the text tower only
        parts = {key.split(".")[0] for key in model.state_dict()} - {"text_encoder"}
        load_checkpoint(model, cfg.MODEL.CAPTION_TEXT_WEIGHTS, skip_prefixes=sorted(parts))
    if clip.BB_RPN_WEIGHTS and clip.CROP_REGION_TYPE == "RPN":
        load_checkpoint(model, clip.BB_RPN_WEIGHTS, offline_rpn=True)


def check_vocabulary(model, dataset_name: str) -> None:
    """The classifier (of the model's current mode) must score exactly the dataset's classes,
    in its order. Models without one (an RPN alone) score no classes."""
    if not hasattr(model, "roi_heads"):
        return
    num_dataset = len(get_metadata(dataset_name).thing_classes)
    num_model = model.roi_heads.box_predictor.num_classes
    if num_dataset != num_model:
        raise ValueError(
            f"The model scores {num_model} classes but {dataset_name} has {num_dataset}: set "
            "MODEL.CLIP.TEXT_EMB_PATH (or OPENSET_TEST_TEXT_EMB_PATH) to embeddings of the "
            "dataset's classes, in its category order"
        )


def test(cfg, model) -> dict:
    """Evaluate on every ``DATASETS.TEST``: COCO/LVIS metrics of a detector, or the recall of
    ground-truth boxes by the proposals of a model without ROI heads (an RPN alone)."""
    results = {}
    output_dir = os.path.join(cfg.OUTPUT_DIR, "inference")
    proposals_only = not hasattr(model, "roi_heads")
    mapper = build_inference_mapper(cfg, keep_annotations=proposals_only)
    model.eval()
    for index, name in enumerate(cfg.DATASETS.TEST):
        if cfg.MODEL.RESET_CLS_TESTS:  # Detic: one classifier per test dataset
            model.set_test_classifier(test_classifier(cfg, index))
        check_vocabulary(model, name)
        records = get_dataset_dicts(name, input_dir=cfg.INPUT_DIR)
        loader = build_test_loader(records, mapper, cfg.DATALOADER.NUM_WORKERS)
        evaluator = (ProposalRecallEvaluator(output_dir) if proposals_only
                     else build_evaluator(name, output_dir))
        results[name] = inference_on_dataset(model, loader, evaluator)
        if is_main_process():
            logger.info("Results on %s: %s", name, json.dumps(results[name], indent=1))
    if is_main_process() and results:
        write_json_atomic(results, os.path.join(output_dir, "metrics.json"))
    return results


def train(cfg, model, resume: bool = False) -> dict:
    """Train ``model`` on ``DATASETS.TRAIN``; returns the last evaluation's results."""
    model.train()
    if is_pretraining(cfg):
        loader, eval_fn = build_pretrain_loader(cfg), zero_shot_eval_fn(cfg, test)
    else:
        for name in cfg.DATASETS.TRAIN:
            check_vocabulary(model, name)
        loader, eval_fn = build_train_loader(cfg), lambda module: test(cfg, module)
    if not (resume and last_checkpoint_path(cfg.OUTPUT_DIR)):
        load_weights(cfg, model)
    trainer = build_trainer(cfg, model, loader, eval_fn=eval_fn)
    trainer.resume_or_start(resume)
    return trainer.train()


def main(args):
    cfg = setup(args)
    model = build_model(cfg)
    if args.eval_only:
        load_weights(cfg, model)
        return test(cfg, model)
    if cfg.SOLVER.REFERENCE_WORLD_SIZE and cfg.SOLVER.REFERENCE_IMS_PER_BATCH:
        raise ValueError("Set SOLVER.REFERENCE_WORLD_SIZE or SOLVER.REFERENCE_IMS_PER_BATCH, not "
                         "both: each rescales the LR and schedule on its own")
    cfg = auto_scale_workers(cfg, get_world_size())
    cfg = auto_scale_batch(cfg, cfg.SOLVER.REFERENCE_IMS_PER_BATCH, get_world_size())
    return train(cfg, model, resume=args.resume)


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(main, args.num_gpus, args.num_machines, args.machine_rank, args.dist_url, (args,))
