"""Configuration: shipped YAMLs, script/README command lines, errors, _BASE_, CLIP checks, dump.

Expected CLIP sizes come from the original's tables (RN50: D 1024, pooler 14, res2 256;
RN50x4: D 640, pooler 18, res2 320), not from ``clip_variants``.
"""
import logging
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from regionclip.config import (
    ConfigError,
    check_clip_settings,
    dump_config,
    finalize_clip_settings,
    get_cfg,
    load_config,
    merge_overrides,
    resolve_clip_variant,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
SCRIPT_NAMES = [
    "test_zeroshot_inference.sh",
    "test_transfer_learning.sh",
    "train_transfer_learning.sh",
    "visualize_zeroshot_inference.sh",
    "visualize_transfer_learning.sh",
    "extract_region_features.sh",
    "extract_concept_features.sh",
    "pretrain.sh",
]
# The original README's command lines (a copy: the seed README is not part of the repository).
SEED_README_COMMANDS = REPO / "tests" / "data" / "seed_readme_commands.md"
SCRIPT_HEADER = ["set -euo pipefail", 'cd "$(dirname "$(readlink -f "$0")")/.."']
KEY_RE = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z][A-Z0-9_]*)*$")
COCO_OVD = REPO / "configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_ovd.yaml"
LVIS_RPN = REPO / "configs/LVISv1-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"
PRETRAIN_RN50X4 = REPO / "configs/pretrain/RegionCLIP_RN50x4.yaml"
TINY = REPO / "configs/tests/tiny.yaml"


# ---------------------------------------------------------------------------------------------
# Command-line parsing of the scripts and the README
# ---------------------------------------------------------------------------------------------
def _logical_lines(text):
    """Join backslash continuations; comment markers are dropped so documented variants count."""
    lines, current = [], ""
    for raw in text.splitlines():
        line = re.sub(r"^[\s#]*", "", raw).rstrip()
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        lines.append(current + line)
        current = ""
    return lines + ([current] if current else [])


def _config_commands(text):
    """``(config file, [KEY, VALUE, ...])`` for every logical line that names a config file."""
    commands = []
    for line in _logical_lines(text):
        if "--config-file" not in line:
            continue
        tokens = shlex.split(line)
        i = tokens.index("--config-file")
        config, overrides = tokens[i + 1], tokens[i + 2 :]
        assert len(overrides) % 2 == 0, f"unpaired override in: {line}"
        assert all(KEY_RE.match(k) for k in overrides[0::2]), f"non-key token in: {line}"
        commands.append((config, overrides))
    return commands


def _readme_commands(readme):
    blocks = readme.read_text(encoding="utf-8").split("```")[1::2]
    return [cmd for block in blocks for cmd in _config_commands(block)]


def _script_commands():
    return [
        pytest.param(cfg, ovr, id=f"{name}-{i}")
        for name in SCRIPT_NAMES
        for i, (cfg, ovr) in enumerate(_config_commands((REPO / "scripts" / name).read_text()))
    ]


def _load_command(config, overrides):
    cfg = load_config(REPO / config, overrides)
    rpn_config = cfg.MODEL.CLIP.OFFLINE_RPN_CONFIG
    if rpn_config:
        load_config(REPO / rpn_config)
    return finalize_clip_settings(cfg)


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Shipped configs, scripts and README
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_config_loads(path):
    cfg = load_config(path)
    assert cfg.VERSION == 2
    finalize_clip_settings(cfg)


@pytest.mark.parametrize("config, overrides", _script_commands())
def test_script_command_lines_load(config, overrides):
    cfg = _load_command(config, overrides)
    pairs = dict(zip(overrides[0::2], overrides[1::2]))
    if pairs.get("MODEL.RESNETS.DEPTH") == "200":
        assert (cfg.MODEL.CLIP.TEXT_EMB_DIM, cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION) == (640, 18)
    if "MODEL.CLIP.TEXT_EMB_PATH" in pairs:
        assert cfg.MODEL.CLIP.TEXT_EMB_PATH == pairs["MODEL.CLIP.TEXT_EMB_PATH"]


def test_scripts_contain_the_commands_they_document():
    counts = {n: len(_config_commands((REPO / "scripts" / n).read_text())) for n in SCRIPT_NAMES}
    assert all(count >= 1 for count in counts.values()), counts
    assert counts["test_zeroshot_inference.sh"] == 8  # {RN50, RN50x4} x {COCO, LVIS} x {GT, RPN}


@pytest.mark.parametrize("readme, count", [(SEED_README_COMMANDS, 4), (REPO / "README.md", 3)],
                         ids=["original", "ours"])
def test_readme_command_lines_load(readme, count):
    commands = _readme_commands(readme)
    assert len(commands) >= count
    for config, overrides in commands:
        _load_command(config, overrides)


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_script_files_and_root_links(name):
    script = REPO / "scripts" / name
    lines = script.read_text().splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    assert all(header in lines for header in SCRIPT_HEADER)
    assert os.access(script, os.X_OK)
    link = REPO / name
    assert link.is_symlink() and os.readlink(link) == f"scripts/{name}"
    subprocess.run(["bash", "-n", str(link)], check=True)


def test_script_header_moves_to_repo_root_through_a_symlink(tmp_path):
    repo = tmp_path / "repo"
    probe = _write(repo / "scripts" / "probe.sh", "\n".join(SCRIPT_HEADER + ["pwd", ""]))
    (tmp_path / "probe.sh").symlink_to(probe)
    out = subprocess.run(
        ["bash", str(tmp_path / "probe.sh")], cwd="/", capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == str(repo.resolve())


# ---------------------------------------------------------------------------------------------
# Defaults, errors, duplicates, _BASE_
# ---------------------------------------------------------------------------------------------
def _leaves(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


def test_defaults_are_typed_and_get_cfg_returns_independent_copies():
    assert [key for key, value in _leaves(get_cfg()) if value is None] == []
    cfg = get_cfg()
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    assert get_cfg().MODEL.ROI_HEADS.NUM_CLASSES == 80


def test_unknown_key_in_a_base_file_names_that_file(tmp_path):
    base = _write(tmp_path / "base.yaml", "MODEL:\n  CLIP:\n    TEXT_EMB_DIMS: 640\n")
    child = _write(tmp_path / "sub" / "child.yaml", "_BASE_: ../base.yaml\nSEED: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(child)
    message = str(info.value)
    assert "MODEL.CLIP.TEXT_EMB_DIMS" in message and str(base) in message
    assert "did you mean MODEL.CLIP.TEXT_EMB_DIM" in message
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)


def test_an_option_after_the_overrides_says_where_options_go(tmp_path):
    path = _write(tmp_path / "c.yaml", "SEED: 1\n")
    with pytest.raises(ConfigError, match="--names \\(command-line options go before"):
        load_config(path, ["MODEL.WEIGHTS", "w.pth", "--names", "names.txt"])
    with pytest.raises(ConfigError, match="odd count.*options go before"):
        load_config(path, ["MODEL.WEIGHTS", "w.pth", "--eval-only"])
    with pytest.raises(ConfigError) as info:
        load_config(path, ["MODEL.WEIGHT", "w.pth", "SEED", "-1"])
    assert "did you mean MODEL.WEIGHTS" in str(info.value) and "options" not in str(info.value)


def test_wrong_type_in_a_file_names_key_and_file(tmp_path):
    path = _write(tmp_path / "bad.yaml", "MODEL:\n  ROI_HEADS:\n    NUM_CLASSES: many\n")
    with pytest.raises(ValueError, match="MODEL.ROI_HEADS.NUM_CLASSES") as info:
        load_config(path)
    assert "bad.yaml" in str(info.value)


def test_override_errors_name_the_key_and_the_command_line():
    with pytest.raises(KeyError) as info:
        merge_overrides(get_cfg(), ["MODEL.CLIP.CROP_REGION", "GT"])
    assert "MODEL.CLIP.CROP_REGION" in str(info.value)
    assert "command-line overrides" in str(info.value)
    with pytest.raises(ValueError, match="SOLVER.BASE_LR.*command-line overrides"):
        merge_overrides(get_cfg(), ["SOLVER.BASE_LR", "fast"])
    with pytest.raises(ConfigError, match="odd"):
        merge_overrides(get_cfg(), ["SOLVER.BASE_LR"])


@pytest.mark.parametrize("key, value", [
    ("INPUT.CROP.ENABLED", "True"),
    ("TEST.AUG.ENABLED", "True"),
    ("MODEL.LOAD_PROPOSALS", "True"),
    ("DATASETS.PROPOSAL_FILES_TEST", "('proposals.pkl',)"),
    ("MODEL.ROI_BOX_HEAD.POOLER_TYPE", "ROIPool"),
    ("MODEL.ROI_BOX_HEAD.USE_FED_LOSS", "True"),
    ("VIS_PERIOD", "20"),
    ("MODEL.ANCHOR_GENERATOR.ANGLES", "[[0]]"),
])
def test_features_not_carried_are_refused_not_ignored(key, value):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)} .*does not carry.*set it to"):
        load_config(str(TINY), [key, value])


def test_not_carried_keys_at_their_defaults_load(tmp_path):
    # The original's configs may spell the defaults out (a YAML list becomes the default tuple).
    path = _write(tmp_path / "spelled.yaml", f"_BASE_: {TINY}\nDATASETS:\n"
                  "  PROPOSAL_FILES_TRAIN: []\nINPUT:\n  CROP:\n    ENABLED: False\n"
                  "MODEL:\n  ROI_BOX_HEAD:\n    USE_FED_LOSS: False\n")  # as Detic's configs
    cfg = load_config(path)
    assert cfg.DATASETS.PROPOSAL_FILES_TRAIN == () and cfg.INPUT.CROP.ENABLED is False
    assert cfg.MODEL.ROI_BOX_HEAD.USE_FED_LOSS is False


def test_overrides_decode_literals():
    cfg = merge_overrides(
        get_cfg(), ["MODEL.CLIP.MULTIPLY_RPN_SCORE", "True", "INPUT.MIN_SIZE_TRAIN", "(64, 96)"]
    )
    assert cfg.MODEL.CLIP.MULTIPLY_RPN_SCORE is True
    assert cfg.INPUT.MIN_SIZE_TRAIN == (64, 96)


def test_duplicate_yaml_key_warns_and_the_last_block_wins(tmp_path, caplog):
    path = _write(
        tmp_path / "dup.yaml",
        "INPUT:\n  MIN_SIZE_TEST: 100\nSEED: 3\nINPUT:\n  MAX_SIZE_TEST: 200\n",
    )
    with caplog.at_level(logging.WARNING, logger="regionclip.config"):
        cfg = load_config(path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("dup.yaml" in w and "'INPUT'" in w for w in warnings), warnings
    # PyYAML semantics: the second mapping replaces the first one entirely.
    assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, cfg.SEED) == (800, 200, 3)


def test_base_chain_precedence_and_relative_paths(tmp_path):
    _write(
        tmp_path / "a" / "grand.yaml",
        "SOLVER:\n  BASE_LR: 0.1\n  MAX_ITER: 10\n  GAMMA: 0.5\n",
    )
    _write(
        tmp_path / "a" / "b" / "parent.yaml",
        "_BASE_: ../grand.yaml\nSOLVER:\n  BASE_LR: 0.2\n  MAX_ITER: 20\n",
    )
    child = _write(
        tmp_path / "c" / "child.yaml", "_BASE_: ../a/b/parent.yaml\nSOLVER:\n  BASE_LR: 0.3\n"
    )
    cfg = load_config(child)
    assert (cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_ITER, cfg.SOLVER.GAMMA) == (0.3, 20, 0.5)
    assert load_config(child, ["SOLVER.BASE_LR", "0.4"]).SOLVER.BASE_LR == 0.4


def test_base_cycles_and_missing_files_fail_clearly(tmp_path):
    _write(tmp_path / "x.yaml", "_BASE_: y.yaml\n")
    _write(tmp_path / "y.yaml", "_BASE_: x.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "x.yaml")
    _write(tmp_path / "z.yaml", "_BASE_: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(tmp_path / "z.yaml")


def test_yaml_is_loaded_safely(tmp_path):
    path = _write(tmp_path / "evil.yaml", "SEED: !!python/object/apply:os.getpid []\n")
    with pytest.raises(ConfigError, match="evil.yaml"):
        load_config(path)


# ---------------------------------------------------------------------------------------------
# CLIP variant consistency
# ---------------------------------------------------------------------------------------------
def test_rn50x4_with_rn50_embedding_width_is_rejected():
    with pytest.raises(ConfigError) as info:
        load_config(COCO_OVD, ["MODEL.RESNETS.DEPTH", "200", "MODEL.CLIP.TEXT_EMB_DIM", "1024"])
    message = str(info.value)
    assert "MODEL.CLIP.TEXT_EMB_DIM" in message and "640" in message and "RN50x4" in message


BOX_POOLER = "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION"
TEACHER_POOLER = "MODEL.CLIP.TEACHER_POOLER_RESOLUTION"
TEACHER_DEPTH = "MODEL.CLIP.TEACHER_RESNETS_DEPTH"
RES2 = "MODEL.RESNETS.RES2_OUT_CHANNELS"


@pytest.mark.parametrize(
    "overrides, key, expected",
    [
        (["MODEL.RESNETS.DEPTH", "200", BOX_POOLER, "14"], BOX_POOLER, "18"),
        ([BOX_POOLER, "18"], BOX_POOLER, "14"),
        ([RES2, "320"], RES2, "256"),
        ([TEACHER_DEPTH, "200", TEACHER_POOLER, "14"], TEACHER_POOLER, "18"),
        (["MODEL.CLIP.VARIANT", "RN51"], "MODEL.CLIP.VARIANT", "RN50x4"),
        (["MODEL.RESNETS.DEPTH", "152"], "MODEL.RESNETS.DEPTH", "200"),
    ],
)
def test_inconsistent_clip_settings_name_key_and_expected_value(overrides, key, expected):
    with pytest.raises(ConfigError) as info:
        load_config(COCO_OVD, overrides)
    assert key in str(info.value) and expected in str(info.value)


def test_rn50x4_command_line_values_are_accepted_and_derived():
    overrides = ["MODEL.RESNETS.DEPTH", "200", "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", "18"]
    cfg = finalize_clip_settings(load_config(COCO_OVD, overrides))
    assert cfg.MODEL.CLIP.VARIANT == "RN50x4"
    assert cfg.MODEL.CLIP.TEXT_EMB_DIM == 640
    assert cfg.MODEL.RESNETS.RES2_OUT_CHANNELS == 320
    assert resolve_clip_variant(cfg).embed_dim == 640


def test_rn50_defaults_are_derived():
    cfg = load_config(COCO_OVD)
    assert (cfg.MODEL.CLIP.TEXT_EMB_DIM, cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION) == (0, 0)
    done = finalize_clip_settings(cfg)
    assert (done.MODEL.CLIP.TEXT_EMB_DIM, done.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION) == (1024, 14)
    assert (done.MODEL.CLIP.VARIANT, done.MODEL.CLIP.TEACHER_VARIANT) == ("RN50", "RN50")
    assert cfg.MODEL.CLIP.TEXT_EMB_DIM == 0  # the input is not modified


def test_variant_name_wins_over_the_legacy_depth():
    cfg = load_config(COCO_OVD, ["MODEL.CLIP.VARIANT", "RN50", "MODEL.RESNETS.DEPTH", "200"])
    assert resolve_clip_variant(cfg).name == "RN50"


def test_tiny_variant_derives_its_sizes():
    cfg = finalize_clip_settings(load_config(TINY))
    # tiny: width 8 (res2 = 4 * 8), input 64 px (attention grid 2, pooler 4), embedding 32.
    assert cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION == 4
    assert cfg.MODEL.CLIP.TEXT_EMB_DIM == 32
    assert cfg.MODEL.RESNETS.RES2_OUT_CHANNELS == 32


def test_pretraining_teacher_sizes_follow_the_teacher_variant():
    cfg = finalize_clip_settings(load_config(PRETRAIN_RN50X4))
    assert cfg.MODEL.CLIP.TEACHER_VARIANT == "RN50x4"
    assert cfg.MODEL.CLIP.TEACHER_POOLER_RESOLUTION == 18
    assert cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION == 18


def test_checks_skip_configs_without_a_clip_trunk():
    cfg = load_config(LVIS_RPN)
    check_clip_settings(cfg)
    assert finalize_clip_settings(cfg).MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION == 7
    # a CLIP architecture always builds a CLIP trunk: it may not skip the checks
    with pytest.raises(ConfigError, match="CLIPFastRCNN builds a CLIP trunk but "
                       "MODEL.BACKBONE.NAME is 'build_resnet_backbone'"):
        load_config(str(TINY), ["MODEL.BACKBONE.NAME", "build_resnet_backbone",
                                "MODEL.CLIP.TEXT_EMB_DIM", "999"])


def test_finalize_keeps_a_frozen_config_frozen():
    cfg = load_config(COCO_OVD)
    cfg.freeze()
    done = finalize_clip_settings(cfg)
    assert done.is_frozen() and done.MODEL.CLIP.TEXT_EMB_DIM == 1024


# ---------------------------------------------------------------------------------------------
# Dump
# ---------------------------------------------------------------------------------------------
def test_dump_round_trips_and_leaves_no_temporary_files(tmp_path):
    overrides = [
        "MODEL.CLIP.TEXT_EMB_PATH", "emb.pth",
        "INPUT.MIN_SIZE_TRAIN", "(64, 96)",
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0001",
        "DATASETS.TRAIN", "('a', 'b')",
    ]
    cfg = load_config(COCO_OVD, overrides)
    _write(tmp_path / "out" / "config.yaml", "stale")
    path = dump_config(cfg, tmp_path / "out")
    assert Path(path) == tmp_path / "out" / "config.yaml"
    assert os.listdir(tmp_path / "out") == ["config.yaml"]
    assert load_config(path) == cfg


@pytest.mark.parametrize("overrides, lone", [
    (["MODEL.WEIGHTS", "OUTPUT_DIR", "out"], "MODEL.WEIGHTS"),  # a value forgotten
    (["OUTPUT_DIR", "out", "SOLVER.MAX_ITER"], "SOLVER.MAX_ITER"),  # the last one cut off
])
def test_an_odd_count_names_the_key_without_a_value(tmp_path, overrides, lone):
    path = _write(tmp_path / "c.yaml", "SEED: 1\n")
    with pytest.raises(ConfigError, match=f"odd count \\({lone} without a value\\)"):
        load_config(path, overrides)
