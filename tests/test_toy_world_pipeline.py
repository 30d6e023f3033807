"""``tools/toy_world.py`` end to end at the quick budget: every stage runs as the user's command,
the report holds every number of the issue's format, and a second call resumes instead of
training again. The quick budget trains for a few iterations only, so its numbers say nothing
about the paper's claims (docs/TOYWORLD.md); the full budget measures them."""
import json
import os
import shlex
import subprocess
import sys

import pytest
from _tool_utils import load_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "toy_world.py")


def _leaves(tree):
    if isinstance(tree, dict):
        return [leaf for value in tree.values() for leaf in _leaves(value)]
    return [tree]


def _run(*args):
    return subprocess.run([sys.executable, TOOL, *args], cwd=ROOT, capture_output=True,
                          text=True)


@pytest.mark.slow
def test_quick_toy_world_runs_every_stage_and_resumes(tmp_path):
    out = str(tmp_path / "tw")
    first = _run("--out", out, "--budget", "quick")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    report = json.loads(open(os.path.join(out, "report.json")).read())
    assert set(report["zero_shot"]) == {"gt", "rpn"}
    assert set(report["zero_shot"]["gt"]) == {"teacher", "student"}
    assert set(report["transfer"]) == {"from_student", "from_teacher", "from_student_no_focal"}
    assert set(report["transfer"]["from_student"]) == {"novel", "base", "all"}
    numbers = _leaves(report["zero_shot"]) + _leaves(report["transfer"])
    assert all(0.0 <= v <= 100.0 for v in numbers if v is not None)  # null: no detection
    assert 0.0 < report["chance_ap50"] < 100.0 and report["seconds"] > 0
    assert set(report["chance_ap50_proposals"]) == {"zero_shot", "transfer"}
    assert all(0.0 <= v <= 100.0 for v in report["chance_ap50_proposals"].values())
    assert -1.0 <= report["class_name_cosine"] <= 1.0
    assert 0.0 < report["per_seed"][0]["pseudo_label_kept"] <= 1.0
    seed_dir = os.path.join(out, "seed_0")
    for name in ("REPORT.md", "report.json", "loss_curves.png"):
        assert os.path.isfile(os.path.join(seed_dir, name)), name
    assert len(os.listdir(os.path.join(seed_dir, "drawings"))) == 6
    assert "from student" in open(os.path.join(out, "REPORT.md")).read()
    commands = json.load(open(os.path.join(seed_dir, "report.json")))["commands"]
    for command in commands.values():  # as REPORT.md lists them: pasteable into a shell
        assert subprocess.run(["bash", "-n", "-c", command]).returncode == 0, command
    rpn = shlex.split(commands["rpn"])
    assert rpn[rpn.index("DATASETS.TEST") + 1].startswith("('coco_json:")

    again = _run("--out", out, "--budget", "quick")
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(open(os.path.join(out, "report.json")).read())["seconds"] == \
        report["seconds"]


def test_run_folder_refuses_a_run_made_with_other_settings(tmp_path, monkeypatch):
    """A run folder keeps the settings and a hash of the configs it was trained with; a call with
    another budget, seed or temperature, or other configs (an edited YAML, a newer checkout),
    must not continue it silently."""
    toy_world = load_tool("toy_world")
    configs = tmp_path / "configs"
    (configs / "toyworld").mkdir(parents=True)
    (configs / "Base-RCNN-C4.yaml").write_text("MODEL:\n  MASK_ON: False\n")
    (configs / "toyworld" / "rpn.yaml").write_text("SOLVER:\n  BASE_LR: 0.02\n")
    monkeypatch.setattr(toy_world, "ROOT", str(tmp_path))
    monkeypatch.setattr(toy_world, "CONFIGS", str(configs / "toyworld"))
    run = str(tmp_path / "out" / "seed_0")

    toy_world.check_run_folder(run, "quick", 0, "teacher", overwrite=False)
    toy_world.check_run_folder(run, "quick", 0, "teacher", overwrite=False)  # same: continues
    for other in (("full", 0, "teacher"), ("quick", 1, "teacher"), ("quick", 0, "paper")):
        with pytest.raises(SystemExit, match="--overwrite"):
            toy_world.check_run_folder(run, *other, overwrite=False)
    with pytest.raises(SystemExit, match="--overwrite"):
        toy_world.check_run_folder(run, "quick", 0, "teacher", overwrite=False,
                                   teacher_crop_context=1.5)
    (configs / "toyworld" / "rpn.yaml").write_text("SOLVER:\n  BASE_LR: 0.01\n")
    with pytest.raises(SystemExit, match="--overwrite"):
        toy_world.check_run_folder(run, "quick", 0, "teacher", overwrite=False)
    toy_world.check_run_folder(run, "quick", 0, "teacher", overwrite=True)
    assert json.load(open(os.path.join(run, "pipeline.json")))["configs"] == \
        toy_world.configs_fingerprint()


def test_teacher_crop_context_reaches_the_student_stage_only():
    """--teacher-crop-context X sets MODEL.CLIP.TEACHER_CROP_CONTEXT of the pretraining run
    and of no other stage; without it the student's command is the original's."""
    from regionclip.config import load_config
    from regionclip.engine.defaults import default_argument_parser
    toy_world = load_tool("toy_world")
    assert toy_world.parse_args(["--out", "o"]).teacher_crop_context == 0.0
    assert toy_world.parse_args(["--out", "o", "--teacher-crop-context", "1.5"]
                                ).teacher_crop_context == 1.5
    plain = toy_world.stages("r", "w", toy_world.BUDGETS["full"], 0, 0.07)
    crops = toy_world.stages("r", "w", toy_world.BUDGETS["full"], 0, 0.07,
                             teacher_crop_context=1.5)
    assert [name for name in plain if plain[name] != crops[name]] == ["student"]
    for commands, context in ((plain, 0.0), (crops, 1.5)):
        args = default_argument_parser().parse_args(commands["student"][1:])
        assert load_config(args.config_file, args.opts).MODEL.CLIP.TEACHER_CROP_CONTEXT == \
            context


def test_chance_stages_score_the_teachers_proposals_with_random_classes_as_evaluated():
    """The chance stages evaluate like the zero-shot RPN mode (fused with objectness, NMS 0.9)
    and like the transfer stages (not fused, the RPN config's NMS), with random class
    embeddings in place of the class names'."""
    from regionclip.config import load_config
    from regionclip.engine.defaults import default_argument_parser
    toy_world = load_tool("toy_world")
    commands = toy_world.stages("r", "w", toy_world.BUDGETS["full"], 0, 0.07)

    def config(name):
        args = default_argument_parser().parse_args(commands[name][1:])
        return load_config(args.config_file, args.opts).MODEL.CLIP

    zero_shot, transfer = config("chance_zero_shot"), config("chance_transfer")
    for clip in (zero_shot, transfer):
        assert clip.TEXT_EMB_PATH == f"r/concepts/{toy_world.RANDOM_CLASSES}"
        assert clip.CROP_REGION_TYPE == "RPN"
    evaluated = {"zero_shot": config("zero_shot_rpn_student"),
                 "transfer": config("transfer_from_student")}
    for clip, like in ((zero_shot, evaluated["zero_shot"]), (transfer, evaluated["transfer"])):
        assert (clip.MULTIPLY_RPN_SCORE, clip.OFFLINE_RPN_NMS_THRESH) == \
            (like.MULTIPLY_RPN_SCORE, like.OFFLINE_RPN_NMS_THRESH)
    assert zero_shot.MULTIPLY_RPN_SCORE and not transfer.MULTIPLY_RPN_SCORE


def test_detic_stages_are_valid_train_net_commands_after_regionclips(tmp_path):
    """--detic adds Detic's runs before the drawings; each command's config and overrides
    load, box-only and weakly supervised runs see the same box batches, and only the caption
    runs build the text tower for captions."""
    from regionclip.config import load_config
    from regionclip.engine.defaults import default_argument_parser
    toy_world = load_tool("toy_world")
    plain = toy_world.stages("r", "w", toy_world.BUDGETS["full"], 0, 0.07)
    commands = toy_world.stages("r", "w", toy_world.BUDGETS["full"], 0, 0.07, detic=True)
    detic = [name for name in commands if name.startswith("detic_")]
    assert detic == [f"detic_{name}" for name in toy_world.DETIC_RUNS]
    assert list(commands) == list(plain)[:-1] + detic + ["drawings"]
    iters, anns = {}, {}
    for name in detic:
        args = default_argument_parser().parse_args(commands[name][1:])
        cfg = load_config(args.config_file, args.opts)
        iters[name] = cfg.SOLVER.MAX_ITER
        assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 20 and cfg.MODEL.CLIP.CLSS_TEMP == 0.07
        assert cfg.MODEL.WEIGHTS == f"r/{toy_world.DETIC_RUNS[name[6:]][1]}/model_final.pth"
        assert cfg.WITH_IMAGE_LABELS == (name != "detic_box_from_teacher")
        assert len(cfg.DATASETS.TRAIN) == (2 if cfg.WITH_IMAGE_LABELS else 1)
        assert cfg.MODEL.WITH_CAPTION == ("captions" in name or "both" in name)
        anns[name] = list(cfg.DATALOADER.DATASET_ANN)
    assert anns["detic_image_labels_from_teacher"] == ["box", "image"]
    assert anns["detic_captions_from_teacher"] == ["box", "caption"]
    assert anns["detic_both_from_teacher"] == ["box", "captiontag"]
    weak = [iters[name] for name in detic if name != "detic_box_from_teacher"]
    assert set(weak) == {2 * iters["detic_box_from_teacher"]}
    assert iters["detic_box_from_teacher"] == toy_world.BUDGETS["full"].transfer_iters


def test_a_training_stage_cut_short_resumes_and_no_other_command_changes(tmp_path):
    """train_net refuses a folder that a killed run left behind (its metrics.json) unless told
    --resume; the stage runner adds it to a training stage whose folder exists, and only
    there, before the config overrides; the training stages save a checkpoint to resume from
    every 100 iterations."""
    from regionclip.config import load_config
    from regionclip.engine.defaults import default_argument_parser
    toy_world = load_tool("toy_world")
    commands = toy_world.stages(str(tmp_path), "w", toy_world.BUDGETS["full"], 0, 0.07)
    student = commands["student"]
    assert toy_world.resumed(student) == student
    for name in ("student", "zero_shot_gt_student", "chance_zero_shot"):
        (tmp_path / name).mkdir()
    args = default_argument_parser().parse_args(toy_world.resumed(student)[1:])
    assert args.resume and args.opts == default_argument_parser().parse_args(student[1:]).opts
    for name in ("teacher", "rpn", "student", "transfer_from_teacher"):  # a checkpoint to resume
        args = default_argument_parser().parse_args(commands[name][1:])
        assert load_config(args.config_file, args.opts).SOLVER.CHECKPOINT_PERIOD == 100
    for name in ("zero_shot_gt_student", "chance_zero_shot", "concepts_pool", "world"):
        assert toy_world.resumed(commands[name]) == commands[name]



def test_a_world_cut_short_is_written_anew(tmp_path):
    """A world folder without its stage's marker (the run stopped before the marker was
    written) is replaced, not refused."""
    from regionclip.toyworld import WorldSizes
    toy_world = load_tool("toy_world")
    budget = toy_world.Budget(WorldSizes(2, 1, 1, 2, 2), 2, 1, 1, 1, 1)
    run, world = tmp_path, tmp_path / "world"
    world.mkdir()
    (world / "left_behind.txt").write_text("")
    command = toy_world.stages(str(run), str(world), budget, 0)["world"]
    assert toy_world.run_stage("world", command, str(run)) > 0
    assert (run / ".done" / "world").exists() and (world / "detection" / "test.json").exists()
    assert not (world / "left_behind.txt").exists()
