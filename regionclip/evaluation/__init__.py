"""Evaluators (COCO, LVIS, proposal recall) and conversion of predictions to COCO-format results."""
from regionclip.data.catalog import get_metadata
from regionclip.evaluation.coco import COCOEvaluator
from regionclip.evaluation.lvis import LVISEvaluator
from regionclip.evaluation.proposals import ProposalRecallEvaluator
from regionclip.evaluation.results import instances_to_coco_json, write_json_atomic

__all__ = [
    "COCOEvaluator",
    "LVISEvaluator",
    "ProposalRecallEvaluator",
    "build_evaluator",
    "instances_to_coco_json",
    "write_json_atomic",
]


def build_evaluator(dataset_name, output_dir):
    """The evaluator of a catalog dataset.

    ``output_dir`` receives the results json; pass ``os.path.join(cfg.OUTPUT_DIR,
    "inference")`` to get the original's ``inference/*_instances_results.json`` paths.
    """
    meta = get_metadata(dataset_name)
    if meta.evaluator_type == "coco":
        return COCOEvaluator(
            meta.json_file, output_dir, meta.contiguous_id_to_dataset_id,
            novel_dataset_ids=meta.novel_dataset_ids, base_dataset_ids=meta.base_dataset_ids,
        )
    if meta.evaluator_type == "lvis":
        return LVISEvaluator(
            meta.json_file, output_dir, meta.contiguous_id_to_dataset_id,
            run_evaluation=meta.evaluate,
        )
    raise ValueError(f"dataset {dataset_name!r} has no evaluator")
