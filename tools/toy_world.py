#!/usr/bin/env python3
"""Run every stage of RegionCLIP in the toy world and measure the paper's claims.

    python tools/toy_world.py --out output/toyworld                # one seed
    python tools/toy_world.py --out output/toyworld --seeds 0 1 2  # mean ± spread over seeds
    python tools/toy_world.py --out output/toyworld_quick --budget quick   # a 2-3 minute smoke run
    python tools/toy_world.py --out output/toyworld --detic        # + Detic's comparison

Each stage is the command a user runs on real data (``tools/make_toy_world.py``,
``tools/train_net.py`` with a config of ``configs/toyworld/``, ``tools/build_concept_nouns.py``,
``tools/extract_concept_features.py``, ``tools/visualize_json_results.py``), started as its own
process; REPORT.md lists them. A stage that finished (marked in ``seed_<s>/.done/``) is not run
again (delete its marker to run it again), a training stage cut short resumes from its last
checkpoint (one every 100 iterations), and a world cut short is written anew, so an interrupted
run continues where it stopped; ``--overwrite`` starts over. Writes per seed
``OUT/seed_<s>/{report.json,REPORT.md,loss_curves.png,drawings/}`` and, over all seeds,
``OUT/report.json`` and ``OUT/REPORT.md``. See docs/TOYWORLD.md.

Temperatures: RegionCLIP's 0.01 (``MODEL.CLIP.CLSS_TEMP`` and the teacher's pseudo-label
temperature) is OpenAI CLIP's learnt one, 1 / exp(logit_scale). ``--temperature teacher`` (the
default) uses the toy teacher's own learnt temperature in its place for every stage after the
teacher; ``--temperature paper`` keeps 0.01.
"""
import argparse
import functools
import glob
import hashlib
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

from tqdm import tqdm

from regionclip.atomic import atomic_open
from regionclip.checkpoint import read_state_dict
from regionclip.evaluation.results import finite_or_null
from regionclip.toyworld import WorldSizes
from regionclip.toyworld.report import (
    loss_curve,
    markdown_table,
    measure,
    pick,
    random_class_embeddings,
    summarize,
    write_report,
)
from regionclip.toyworld.writer import ALL_CATEGORIES_TRAIN, IMAGE_LABELS_FILE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs", "toyworld")
RANDOM_CLASSES = "classes_random.pth"  # under concepts/: the chance stages' class embeddings


@dataclass(frozen=True)
class Budget:
    """World sizes, batch sizes and training iterations of one run; a batch size left None is
    the config's."""

    world: WorldSizes
    teacher_batch: int
    teacher_iters: int
    rpn_iters: int
    pretrain_iters: int
    transfer_iters: int
    rpn_batch: Optional[int] = None
    pretrain_batch: Optional[int] = None
    transfer_batch: Optional[int] = None


BUDGETS = {
    "full": Budget(WorldSizes(1200, 200, 300, 4000, 4000), teacher_batch=256,
                   teacher_iters=1000, rpn_iters=300, pretrain_iters=200, transfer_iters=200),
    "quick": Budget(WorldSizes(40, 8, 12, 128, 128), teacher_batch=32, teacher_iters=10,
                    rpn_iters=10, pretrain_iters=3, transfer_iters=3, rpn_batch=4,
                    pretrain_batch=8, transfer_batch=4),
}


# Detic's comparison (--detic): run name -> (config under configs/toyworld, initialisation).
DETIC_RUNS = {"box_from_teacher": ("detic_box", "teacher"),
              "image_labels_from_teacher": ("detic_image_labels", "teacher"),
              "captions_from_teacher": ("detic_captions", "teacher"),
              "both_from_teacher": ("detic_both", "teacher"),
              "image_labels_from_student": ("detic_image_labels", "student")}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the world, runs and reports")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="full")
    parser.add_argument("--temperature", choices=("teacher", "paper"), default="teacher",
                        help="the teacher's learnt temperature, or the paper's 0.01")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete a previous run in --out and start over")
    parser.add_argument("--detic", action="store_true",
                        help="also Detic's comparison: box-only vs image labels vs captions "
                             "vs both from the teacher, image labels from the student (about "
                             "an hour more at the full budget; can be added to a finished run)")
    parser.add_argument("--teacher-crop-context", type=float, default=0.0, metavar="X",
                        help="the pretraining teacher labels each region from a crop X times "
                             "its box (MODEL.CLIP.TEACHER_CROP_CONTEXT; not in the original, "
                             "see docs/TOYWORLD.md); 0 = RoIAlign, as the original")
    return parser.parse_args(argv)


def _tuple(*items: str) -> str:
    return "(" + "".join(f"'{item}'," for item in items) + ")"


# A checkpoint every this many iterations, so that a training stage cut short resumes near
# where it stopped (an hour-long teacher otherwise starts over); the quick stages save none.
CHECKPOINT_EVERY = 100


def _iters(count: int) -> List[str]:
    return ["SOLVER.MAX_ITER", str(count), "SOLVER.WARMUP_ITERS", str(max(1, count // 10)),
            "SOLVER.CHECKPOINT_PERIOD", str(CHECKPOINT_EVERY)]


def _batch(size: Optional[int]) -> List[str]:
    return [] if size is None else ["SOLVER.IMS_PER_BATCH", str(size)]


def teacher_temperature(weights: str) -> float:
    """1 / exp(logit_scale) of a CLIP checkpoint: the temperature its training learnt."""
    state_dict, _ = read_state_dict(weights)
    return 1.0 / math.exp(float(state_dict["logit_scale"]))


def stages(run: str, world: str, budget: Budget, seed: int, temperature: float = 0.01,
           detic: bool = False, teacher_crop_context: float = 0.0) -> Dict[str, List[str]]:
    """Stage name -> command line (after ``python``), in the order they run; ``temperature``
    is given to every stage after the teacher; ``detic`` adds Detic's comparison;
    ``teacher_crop_context`` > 0 makes the pretraining teacher label crops."""
    train_net = [os.path.join(ROOT, "tools", "train_net.py")]
    det = {s: f"coco_json:{world}/detection/{s}.json:{world}/detection/{s}" for s in
           ("train", "test")}
    pairs = ["DATASETS.PATH_TRAIN", _tuple(f"{world}/pretrain"), "SEED", str(seed)]
    teacher, student = f"{run}/teacher/model_final.pth", f"{run}/student/model_final.pth"
    rpn, concepts = f"{run}/rpn/model_final.pth", f"{run}/concepts"
    temp = ["MODEL.CLIP.CLSS_TEMP", f"{temperature:.6g}", "MODEL.CLIP.TEACHER_TEMP",
            f"{temperature:.6g}"]
    commands = {
        # a world without its stage's marker was cut short: written anew
        "world": [os.path.join(ROOT, "tools", "make_toy_world.py"), "--out", world, "--overwrite",
                  "--seed", str(seed)] + sum(([f"--{k}", str(n)] for k, n in
                                    asdict(budget.world).items()), []),
        "teacher": train_net + ["--config-file", f"{CONFIGS}/clip_teacher.yaml",
                                "DATASETS.PATH_TRAIN", _tuple(f"{world}/web"), "SEED", str(seed),
                                "SOLVER.IMS_PER_BATCH", str(budget.teacher_batch),
                                *_iters(budget.teacher_iters), "OUTPUT_DIR", f"{run}/teacher"],
        "rpn": train_net + ["--config-file", f"{CONFIGS}/rpn.yaml", "DATASETS.TRAIN",
                            _tuple(det["train"]), "DATASETS.TEST", _tuple(det["test"]),
                            *_iters(budget.rpn_iters), *_batch(budget.rpn_batch),
                            "SEED", str(seed),
                            "OUTPUT_DIR", f"{run}/rpn"],
        "concept_nouns": [os.path.join(ROOT, "tools", "build_concept_nouns.py"), "--captions",
                          f"{world}/pretrain", "--vocabulary", f"{world}/vocabulary.txt",
                          "--min-count", "5", "--parser", "none", "--output",
                          f"{concepts}/nouns.txt"],
    }
    extract = [os.path.join(ROOT, "tools", "extract_concept_features.py"), "--config-file",
               f"{CONFIGS}/zero_shot.yaml"]
    for name, names in (("pool", f"{concepts}/nouns.txt"),
                        ("classes_all", f"{world}/detection/test.json"),
                        ("classes_base", f"{world}/detection/train.json")):
        commands[f"concepts_{name}"] = extract + ["--names", names, "--output",
                                                  f"{concepts}/{name}.pth",
                                                  "MODEL.WEIGHTS", teacher]
    commands["student"] = train_net + [
        "--config-file", f"{CONFIGS}/pretrain.yaml", *pairs, *_iters(budget.pretrain_iters),
        *_batch(budget.pretrain_batch),
        "MODEL.WEIGHTS", teacher, "MODEL.CLIP.BB_RPN_WEIGHTS", rpn,
        "MODEL.CLIP.CONCEPT_POOL_EMB", f"{concepts}/pool.pth", *temp,
        *(["MODEL.CLIP.TEACHER_CROP_CONTEXT", f"{teacher_crop_context:g}"]
          if teacher_crop_context else []),
        "OUTPUT_DIR", f"{run}/student"]
    evaluate = train_net + ["--eval-only", "--config-file", f"{CONFIGS}/zero_shot.yaml",
                            "DATASETS.TEST", _tuple(det["test"]), "MODEL.CLIP.BB_RPN_WEIGHTS",
                            rpn, *temp]
    for who, weights in (("teacher", teacher), ("student", student)):
        for mode, region, fuse in (("gt", "GT", "False"), ("rpn", "RPN", "True")):
            commands[f"zero_shot_{mode}_{who}"] = evaluate + [
                "MODEL.CLIP.TEXT_EMB_PATH", f"{concepts}/classes_all.pth",
                "MODEL.WEIGHTS", weights, "MODEL.CLIP.CROP_REGION_TYPE", region,
                "MODEL.CLIP.MULTIPLY_RPN_SCORE", fuse,
                "OUTPUT_DIR", f"{run}/zero_shot_{mode}_{who}"]
    # Chance on the detectors' own proposals: the teacher's regions against random class
    # embeddings, as the zero-shot RPN mode evaluates (fused with objectness) and as the
    # transfer stages do (no fusion, the RPN config's NMS).
    for setting, settings in (("zero_shot", ["MODEL.CLIP.MULTIPLY_RPN_SCORE", "True"]),
                              ("transfer", ["MODEL.CLIP.MULTIPLY_RPN_SCORE", "False",
                                            "MODEL.CLIP.OFFLINE_RPN_NMS_THRESH", "0.0"])):
        commands[f"chance_{setting}"] = evaluate + [
            "MODEL.CLIP.TEXT_EMB_PATH", f"{concepts}/{RANDOM_CLASSES}", "MODEL.WEIGHTS", teacher,
            "MODEL.CLIP.CROP_REGION_TYPE", "RPN", *settings, "OUTPUT_DIR",
            f"{run}/chance_{setting}"]
    for name, weights, focal in (("from_student", student, "0.5"),
                                 ("from_teacher", teacher, "0.5"),
                                 ("from_student_no_focal", student, "0.0")):
        commands[f"transfer_{name}"] = train_net + [
            "--config-file", f"{CONFIGS}/transfer.yaml", "DATASETS.TRAIN", _tuple(det["train"]),
            "DATASETS.TEST", _tuple(det["test"]), *_iters(budget.transfer_iters),
            *_batch(budget.transfer_batch), "MODEL.WEIGHTS", weights,
            "MODEL.CLIP.BB_RPN_WEIGHTS", rpn,
            "MODEL.CLIP.TEXT_EMB_PATH", f"{concepts}/classes_base.pth",
            "MODEL.CLIP.OPENSET_TEST_TEXT_EMB_PATH", f"{concepts}/classes_all.pth",
            "MODEL.CLIP.FOCAL_SCALED_LOSS", focal, "SEED", str(seed), *temp,
            "OUTPUT_DIR", f"{run}/transfer_{name}"]
    if detic:
        commands.update(_detic_stages(train_net, run, world, det["test"], budget, seed, temp))
    commands["drawings"] = [
        os.path.join(ROOT, "tools", "visualize_json_results.py"), "--input",
        f"{run}/zero_shot_rpn_student/inference/coco_instances_results.json", "--output",
        f"{run}/drawings", "--dataset", det["test"], "--conf-threshold", "0.3", "--max-images",
        "6"]
    return commands


def _detic_stages(train_net, run, world, test, budget, seed, temp) -> Dict[str, List[str]]:
    """Detic's comparison on the RegionCLIP detector: one classifier over all 20 classes, base
    boxes only, then with the pretraining images' caption-derived image labels, their captions,
    or both; the weakly supervised runs take twice the iterations, half of them box batches."""
    box = f"coco_json:{world}/{ALL_CATEGORIES_TRAIN}:{world}/detection/train"
    labels = f"image_labels:{world}/pretrain/{IMAGE_LABELS_FILE}:{world}/pretrain"
    commands = {}
    for name, (config, who) in DETIC_RUNS.items():
        weak = config != "detic_box"
        commands[f"detic_{name}"] = train_net + [
            "--config-file", f"{CONFIGS}/{config}.yaml",
            "DATASETS.TRAIN", _tuple(box, labels) if weak else _tuple(box),
            "DATASETS.TEST", _tuple(test),
            *_iters(budget.transfer_iters * (2 if weak else 1)),
            "MODEL.WEIGHTS", f"{run}/{who}/model_final.pth",
            "MODEL.CLIP.BB_RPN_WEIGHTS", f"{run}/rpn/model_final.pth",
            "MODEL.CLIP.TEXT_EMB_PATH", f"{run}/concepts/classes_all.pth", "SEED", str(seed),
            *temp, "OUTPUT_DIR", f"{run}/detic_{name}"]
    return commands


# Relative cost of each stage for the ETA of the bar: minutes measured at the full budget on
# 2 cores (seed 1's run and the Detic runs, docs/TOYWORLD.md, Time), since the bar extrapolates
# from the stages done to the ones left.
WEIGHTS = {"world": 1.0, "teacher": 46.5, "rpn": 5.1, "concept": 0.1, "concepts": 0.1,
           "student": 16.3, "zero": 0.4, "chance": 0.4, "transfer": 9.8, "detic": 12,
           "drawings": 0.1}


def _done_marker(run: str, name: str) -> str:
    return os.path.join(run, ".done", name)


def resumed(argv: List[str]) -> List[str]:
    """``argv`` with ``--resume`` if it trains with train_net into a folder that an interrupted
    attempt left behind (train_net refuses such a folder otherwise): the stage continues from
    its last checkpoint, or starts over when it has none. Other commands are returned as is."""
    training = argv[0].endswith("train_net.py") and "--eval-only" not in argv
    if training and os.path.isdir(argv[argv.index("OUTPUT_DIR") + 1]):
        return [argv[0], "--resume", *argv[1:]]
    return argv


def run_stage(name: str, argv: List[str], run: str) -> float:
    """Run one stage (unless it already finished); returns its seconds."""
    marker = _done_marker(run, name)
    if os.path.exists(marker):
        with open(marker) as f:
            return float(f.read())
    os.makedirs(os.path.join(run, "logs"), exist_ok=True)
    log = os.path.join(run, "logs", f"{name}.log")
    start = time.time()
    with open(log, "w") as f:
        code = subprocess.call([sys.executable, *resumed(argv)], cwd=ROOT, stdout=f,
                               stderr=subprocess.STDOUT)
    if code:
        with open(log) as f:
            tail = f.read().strip().splitlines()[-1:] or ["(no output)"]
        raise SystemExit(f"toy_world: stage {name} failed (exit {code}): {tail[0]} "
                         f"-- full log: {log}")
    seconds = round(time.time() - start, 1)  # as the marker keeps it, so resumed runs agree
    os.makedirs(os.path.dirname(marker), exist_ok=True)
    with open(marker, "w") as f:
        f.write(f"{seconds:.1f}")
    return seconds


def configs_fingerprint() -> str:
    """A hash of the YAML files the stages read, so that a run folder trained with other configs
    (an older checkout, an edited config) is not silently continued."""
    digest = hashlib.sha256()
    for path in sorted(glob.glob(f"{CONFIGS}/*.yaml")) + [f"{ROOT}/configs/Base-RCNN-C4.yaml"]:
        digest.update(os.path.relpath(path, ROOT).encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def check_run_folder(run: str, budget_name: str, seed: int, temperature: str,
                     overwrite: bool, teacher_crop_context: float = 0.0) -> None:
    """Refuse to mix runs: ``run`` must be new, or hold a run of the same settings and configs."""
    identity = {"budget": budget_name, "seed": seed, "temperature": temperature,
                "teacher_crop_context": teacher_crop_context,
                "sizes": asdict(BUDGETS[budget_name]), "configs": configs_fingerprint()}
    path = os.path.join(run, "pipeline.json")
    if overwrite and os.path.exists(run):
        shutil.rmtree(run)
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        if previous != identity:
            raise SystemExit(f"toy_world: {run} holds a run with {previous}, not {identity}; "
                             "choose another --out or pass --overwrite")
        return
    if os.path.exists(run) and os.listdir(run):
        raise SystemExit(f"toy_world: {run} exists and is not a toy-world run; choose another "
                         "--out or pass --overwrite")
    os.makedirs(run, exist_ok=True)
    with open(path, "w") as f:
        json.dump(identity, f)


def run_seed(out: str, budget_name: str, seed: int, temperature_mode: str,
             overwrite: bool, detic: bool = False, teacher_crop_context: float = 0.0) -> Dict:
    run = os.path.join(out, f"seed_{seed}")
    check_run_folder(run, budget_name, seed, temperature_mode, overwrite, teacher_crop_context)
    world = os.path.join(run, "world")
    build = functools.partial(stages, run, world, BUDGETS[budget_name], seed, detic=detic,
                              teacher_crop_context=teacher_crop_context)
    commands = build()
    weights = {name: WEIGHTS[name.split("_")[0]] for name in commands}
    seconds, temperature = {}, None
    random_classes = f"{run}/concepts/{RANDOM_CLASSES}"  # written before the chance stages
    with tqdm(total=sum(weights.values()), desc=f"toy world seed {seed}",
              bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}] {postfix}",
              file=sys.stdout) as bar:
        for name in list(commands):
            if name not in ("world", "teacher") and temperature is None:  # the teacher has run
                temperature = (teacher_temperature(f"{run}/teacher/model_final.pth")
                               if temperature_mode == "teacher" else 0.01)
                commands = build(temperature)
            bar.set_postfix_str(name)
            if name.startswith("chance_") and not os.path.exists(random_classes):
                random_class_embeddings(f"{run}/concepts/classes_all.pth", random_classes, seed)
            seconds[name] = run_stage(name, commands[name], run)
            bar.update(weights[name])
    report = measure(run, world, seed, seconds)
    report.update(temperature=temperature, teacher_crop_context=teacher_crop_context)
    write_report(run, report, seconds, {k: "python " + shlex.join(v) for k, v in commands.items()},
                 {stage: loss_curve(f"{run}/{stage}") for stage in ("teacher", "rpn", "student",
                                                                    "transfer_from_student")})
    return report


def main(argv=None) -> Dict:
    args = parse_args(argv)
    out = os.path.abspath(args.out)
    reports = [run_seed(out, args.budget, seed, args.temperature, args.overwrite, args.detic,
                        args.teacher_crop_context) for seed in args.seeds]
    summary = summarize(reports)
    with atomic_open(os.path.join(out, "report.json"), "w") as f:
        json.dump(finite_or_null({**pick(summary, "mean"), "spread": pick(summary, "spread"),
                                  "claims_held": pick(summary["claims"], "held"),
                                  "seed": args.seeds[0], "seeds": args.seeds,
                                  "budget": args.budget, "per_seed": reports}),
                  f, indent=1, allow_nan=False)
    table = markdown_table(summary)
    held = "\n".join(f"- {name}: held on {v['held']} of {v['of']} seeds"
                     for name, v in summary["claims"].items())
    with atomic_open(os.path.join(out, "REPORT.md"), "w") as f:
        crops = (f", teacher crops {args.teacher_crop_context:g}x" if args.teacher_crop_context
                 else "")
        f.write(f"# Toy world, seeds {args.seeds} ({args.budget} budget{crops})\n\n{table}\n\n"
                f"## Claims\n\n{held}\n")
    print(table)
    print(held)
    return summary


if __name__ == "__main__":
    main()
