"""The toy world's measurements: AP50 read back from the stages' outputs, chance level, the
claims checked, and ``report.json`` / ``REPORT.md`` / loss curves.

Every number comes from a file a stage wrote (``inference/metrics.json`` of an evaluation,
``metrics.json`` of a training run); nothing here trains or runs a model.
"""
import json
import logging
import math
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic import atomic_open
from ..data.coco import load_coco_api
from ..evaluation.coco import ovd_split_ap50, run_coco_eval
from ..evaluation.results import finite_or_null
from ..modeling.text_encoder import load_embeddings

logger = logging.getLogger(__name__)

SPLITS = ("novel", "base", "all")
CLAIM_MARGIN_GT = 10.0  # the student should beat its teacher by this many AP50 points (GT boxes)


def read_ap50(output_dir: str) -> Dict[str, float]:
    """``{"novel", "base", "all"}`` AP50 (percent) of the evaluation written in ``output_dir``;
    NaN where the model made no detection at all (the evaluator then reports no split AP)."""
    path = os.path.join(output_dir, "inference", "metrics.json")
    with open(path) as f:
        results = json.load(f)
    bbox = next(iter(results.values()))["bbox"]
    values = {split: bbox.get(f"AP50_{split}") for split in SPLITS}
    return {split: math.nan if value is None else value for split, value in values.items()}


def chance_ap50(test_json: str, seed: int = 0) -> float:
    """AP50 (percent, all classes) of uniformly random scores on the test split's own boxes:
    every ground-truth box is reported once per class, each with a random score."""
    coco_gt = load_coco_api(test_json)
    rng = np.random.default_rng(seed)
    cat_ids = sorted(coco_gt.getCatIds())
    results = [{"image_id": ann["image_id"], "category_id": cat, "bbox": ann["bbox"],
                "score": float(rng.random())}
               for ann in coco_gt.dataset["annotations"] for cat in cat_ids]
    coco_eval = run_coco_eval(coco_gt, results, "bbox")
    novel = {c["id"] for c in coco_gt.dataset["categories"] if c.get("split") == "unseen"}
    return ovd_split_ap50(coco_eval, novel, set(cat_ids) - novel)["AP50_all"]


def random_class_embeddings(like: str, path: str, seed: int) -> None:
    """Gaussian class embeddings of the shape of the embedding file ``like``, written to
    ``path``: a classifier whose text carries no class information, which gives the chance level
    on a detector's own proposals (the same regions, scores unrelated to the classes)."""
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(load_embeddings(like).shape, generator=generator)
    with atomic_open(path, "wb") as f:
        torch.save(embeddings, f)


def class_name_cosine(embedding_file: str) -> float:
    """Mean cosine between the text embeddings of different classes. Near 1, the text tower
    does not tell the class names apart, and no later stage can separate those classes."""
    rows = F.normalize(load_embeddings(embedding_file), dim=1)
    if len(rows) < 2:
        raise ValueError(f"{embedding_file}: class-name cosine needs two classes, "
                         f"got {len(rows)}")
    different = ~torch.eye(len(rows), dtype=torch.bool)
    return float((rows @ rows.t())[different].mean())


def loss_curve(output_dir: str, key: str = "total_loss") -> List[List[float]]:
    """[[iteration, value], ...] of ``key`` from a training run's ``metrics.json`` lines."""
    path = os.path.join(output_dir, "metrics.json")
    points = []
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            if key in record and "iteration" in record:
                points.append([record["iteration"], record[key]])
    return points


def last_logged(output_dir: str, key: str) -> Optional[float]:
    """The last value of ``key`` in a training run's ``metrics.json``; None when the run never
    logged it (a run from before the key was logged)."""
    points = loss_curve(output_dir, key)
    return points[-1][1] if points else None


def claims(report: Dict) -> Dict[str, bool]:
    """The paper's claims as the report measures them (AP50 of all classes). Each number is
    held against the chance level on its own boxes: ground-truth boxes, or the proposals of the
    zero-shot RPN mode or of the transfer stages' evaluation."""
    zero, transfer, chance = report["zero_shot"], report["transfer"], report["chance_ap50"]
    on_proposals = report["chance_ap50_proposals"]
    detic = {}
    if "detic_box_from_teacher" in transfer:  # Detic's: weak labels of novel classes help
        novel = {run[6:]: transfer[run]["novel"] for run in transfer if run.startswith("detic_")}
        detic = {"image_labels_raise_novel": novel["image_labels_from_teacher"]
                 > novel["box_from_teacher"],
                 "captions_raise_novel": novel["captions_from_teacher"]
                 > novel["box_from_teacher"],
                 "both_best_on_novel": novel["both_from_teacher"]
                 > max(novel["image_labels_from_teacher"], novel["captions_from_teacher"])}
    return {
        "student_beats_teacher_gt_by_10": zero["gt"]["student"] - zero["gt"]["teacher"]
        >= CLAIM_MARGIN_GT,
        "student_beats_teacher_rpn": zero["rpn"]["student"] > zero["rpn"]["teacher"],
        "transfer_student_beats_teacher_novel": transfer["from_student"]["novel"]
        > transfer["from_teacher"]["novel"],
        "focal_scaling_helps_novel": transfer["from_student"]["novel"]
        > transfer["from_student_no_focal"]["novel"],
        "all_above_chance": all(v > chance for v in zero["gt"].values())
        and all(v > on_proposals["zero_shot"] for v in zero["rpn"].values())
        and all(run["all"] > on_proposals["transfer"] for run in transfer.values()),
        **detic,
    }


def measure(run: str, world: str, seed: int, seconds: Dict[str, float]) -> Dict:
    """The numbers of a seed's ``report.json`` from the output folders of its stages in
    ``run`` (``seconds``: each stage's time, in the order they ran; Detic's runs count when
    they are among them)."""
    zero_shot = {mode: {who: read_ap50(f"{run}/zero_shot_{mode}_{who}")["all"]
                        for who in ("teacher", "student")} for mode in ("gt", "rpn")}
    transfer = {name: read_ap50(f"{run}/transfer_{name}") for name in
                ("from_student", "from_teacher", "from_student_no_focal")}
    transfer.update({name: read_ap50(f"{run}/{name}") for name in seconds
                     if name.startswith("detic_")})
    report = {"zero_shot": zero_shot, "transfer": transfer,
              "chance_ap50": chance_ap50(f"{world}/detection/test.json", seed),
              "chance_ap50_proposals": {setting: read_ap50(f"{run}/chance_{setting}")["all"]
                                        for setting in ("zero_shot", "transfer")},
              "seed": seed,
              "class_name_cosine": class_name_cosine(f"{run}/concepts/classes_all.pth"),
              "pseudo_label_kept": last_logged(f"{run}/student", "pretrain/pseudo_label_kept"),
              "seconds": round(sum(seconds.values()), 1)}
    report["claims"] = claims(report)
    return report


def summarize(reports: Sequence[Dict]) -> Dict:
    """Mean and spread (half the max - min range) of every number over seeds."""
    def walk(values):
        first = values[0]
        if isinstance(first, dict):
            return {k: walk([v[k] for v in values]) for k in first}
        if isinstance(first, bool):
            return {"held": sum(values), "of": len(values)}
        array = np.asarray(values, dtype=float)
        return {"mean": float(array.mean()), "spread": float((array.max() - array.min()) / 2)}
    keys = ("zero_shot", "transfer", "chance_ap50", "chance_ap50_proposals", "class_name_cosine",
            "claims", "seconds")
    return {k: walk([r[k] for r in reports]) for k in keys}


def pick(summary, field: str):
    """The tree of ``summarize`` with each leaf replaced by its ``field`` ("mean", "spread",
    "held"); branches without such leaves (the claims, for "mean") are left out."""
    if isinstance(summary, dict) and field in summary:
        return summary[field]
    picked = {k: pick(v, field) for k, v in summary.items() if isinstance(v, dict)}
    return {k: v for k, v in picked.items() if v != {}}


def _cell(value) -> str:
    if isinstance(value, dict) and "mean" in value:
        return f"{value['mean']:.1f} ± {value['spread']:.1f}"
    return "nan" if isinstance(value, float) and math.isnan(value) else f"{value:.1f}"


def markdown_table(report: Dict) -> str:
    """The results table (one seed's numbers, or a ``summarize`` of several)."""
    zero, transfer = report["zero_shot"], report["transfer"]
    lines = ["| zero-shot AP50 (all 20 classes) | teacher | student |", "|---|---|---|"]
    for mode, label in (("gt", "ground-truth boxes"), ("rpn", "RPN proposals")):
        lines.append(f"| {label} | {_cell(zero[mode]['teacher'])} | "
                     f"{_cell(zero[mode]['student'])} |")
    lines += ["", "| transfer learning AP50 | novel | base | all |", "|---|---|---|---|"]
    for run in transfer:  # RegionCLIP's three runs, then Detic's when it ran
        cells = " | ".join(_cell(transfer[run][s]) for s in SPLITS)
        lines.append(f"| {run.replace('_', ' ')} | {cells} |")
    proposals = report["chance_ap50_proposals"]
    lines += ["", f"Chance AP50: random scores on the ground-truth boxes "
              f"{_cell(report['chance_ap50'])}; random class embeddings on the RPN proposals "
              f"{_cell(proposals['zero_shot'])} (zero-shot setting), "
              f"{_cell(proposals['transfer'])} (transfer setting)."]
    return "\n".join(lines)


def write_report(out: str, report: Dict, stage_seconds: Dict[str, float],
                 commands: Dict[str, str], curves: Dict[str, List[List[float]]]) -> None:
    """``report.json``, ``REPORT.md`` and ``loss_curves.png`` in ``out``."""
    with atomic_open(os.path.join(out, "report.json"), "w") as f:
        json.dump(finite_or_null({**report, "stage_seconds": stage_seconds, "commands": commands}),
                  f, indent=1, allow_nan=False)
    png = _plot_curves(curves, os.path.join(out, "loss_curves.png"))
    held = "\n".join(f"- {name}: {'holds' if ok else 'does NOT hold'}"
                     for name, ok in report["claims"].items())
    times = "\n".join(f"| {name} | {seconds:.0f} |" for name, seconds in stage_seconds.items())
    cmds = "\n".join(f"# {name}\n{command}\n" for name, command in commands.items())
    teacher = (f"Temperature after the teacher stage: {report['temperature']:.4g}.\n\n"
               if report.get("temperature") else "")
    if "class_name_cosine" in report:
        teacher += (f"Mean cosine between the teacher's class-name embeddings: "
                    f"{report['class_name_cosine']:.3f} (near 1: the names are not told "
                    f"apart).\n\n")
    if report.get("pseudo_label_kept") is not None:
        teacher += (f"Share of the student's sampled regions whose teacher concept passes "
                    f"CONCEPT_THRES at the end of pretraining: "
                    f"{100 * report['pseudo_label_kept']:.1f} % (near 100: the threshold "
                    f"filters nothing).\n\n")
    text = (f"# Toy world report (seed {report['seed']})\n\n{markdown_table(report)}\n\n"
            f"{teacher}"
            f"## Claims\n\n{held}\n\n## Stage times (s)\n\n| stage | seconds |\n|---|---|\n"
            f"{times}\n| total | {report['seconds']:.0f} |\n\n"
            + (f"![loss curves]({os.path.basename(png)})\n\n" if png else "")
            + f"Drawn test images: `drawings/`.\n\n## Commands\n\n```\n{cmds}```\n")
    with atomic_open(os.path.join(out, "REPORT.md"), "w") as f:
        f.write(text)


def _plot_curves(curves: Dict[str, List[List[float]]], path: str) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no loss-curve plot")
        return ""
    figure, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3), squeeze=False)
    for axis, (name, points) in zip(axes[0], curves.items()):
        if points:
            axis.plot(*zip(*points))
        axis.set_title(name)
        axis.set_xlabel("iteration")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


__all__ = ["chance_ap50", "claims", "last_logged", "loss_curve", "markdown_table", "measure",
           "pick", "random_class_embeddings", "read_ap50", "summarize", "write_report"]
