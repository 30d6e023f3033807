"""Hardening (issue 12): errors a person can read, and folders that cannot be written.

A user error reaches the command line as its cause, once, first, without a traceback
(``REGIONCLIP_DEBUG=1`` shows it); that includes errors inside torchrun workers. A read-only
text cache only costs a warning; an output that cannot be written stops a run before its work.
Folders that cannot be written even by root are taken from /sys.
"""
import errno
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _api_utils import CLASSES, TINY_CONFIG, TINY_RPN_CONFIG, save_pretrained
from PIL import Image

import regionclip
from regionclip.cli import main
from regionclip.config import ConfigError
from regionclip.engine import defaults

REPO = Path(__file__).resolve().parents[1]
TRAIN_NET = REPO / "tools" / "train_net.py"
TINY_TRAIN_CONFIG = REPO / "configs" / "tests" / "tiny.yaml"
READ_ONLY = "/sys/kernel"  # an existing folder where no one may create files


@pytest.fixture(scope="module")
def read_only():
    try:
        open(os.path.join(READ_ONLY, "regionclip-probe"), "w").close()
    except OSError:
        return READ_ONLY
    os.remove(os.path.join(READ_ONLY, "regionclip-probe"))
    pytest.skip(f"{READ_ONLY} is writable here")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_pretrained(tmp_path_factory.mktemp("w") / "regionclip_pretrained-cc_rn50.pth")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("REGIONCLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("REGIONCLIP_DEBUG", raising=False)
    log = logging.getLogger("regionclip")
    saved = (list(log.handlers), log.level, log.propagate)
    yield
    log.handlers[:], log.level, log.propagate = saved


def detect_args(weights, tmp_path, *extra, out=None):
    image = tmp_path / "scene.png"
    Image.new("RGB", (80, 60), (90, 40, 200)).save(image)
    return ["detect", str(image), "--classes", ",".join(CLASSES), "--weights", weights,
            "--out", str(out or tmp_path / "out.json"), "--variant", "tiny", "--config",
            TINY_CONFIG, "--rpn-config", TINY_RPN_CONFIG, "--device", "cpu", *extra]


def run(command, cwd, **env):
    return subprocess.run([sys.executable, *map(str, command)], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **env})


def assert_cause_first_and_once(stderr, cause):
    """``cause`` on the first line of ``stderr`` and nowhere else, and no traceback of ours
    (torchrun adds its own report of the failed workers after it)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and cause in lines[0], stderr[-3000:]
    assert stderr.count(cause) == 1, stderr[-3000:]
    assert "/regionclip/" not in stderr, stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# 9. one-line errors at the command line
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, cause", [
    (["MODEL.NOT_A_KEY", "1"], "MODEL.NOT_A_KEY"),
    (["MODEL.WEIGHTS", "nothere/model.pth"], "nothere/model.pth"),
    (["OUTPUT_DIR", f"{READ_ONLY}/regionclip-out"], f"{READ_ONLY}/regionclip-out"),
])
def test_train_net_user_errors_are_one_line(tmp_path, capsys, overrides, cause):
    args = defaults.default_argument_parser().parse_args(list(map(str, [
        "--eval-only", "--config-file", TINY_TRAIN_CONFIG, "OUTPUT_DIR", tmp_path / "out",
        *overrides])))
    with pytest.raises(SystemExit) as exit_status:
        defaults.run(args)
    assert exit_status.value.code == 1
    error = capsys.readouterr().err
    assert len(error.splitlines()) == 1 and cause in error, error


def test_the_train_net_command_prints_the_cause_alone(tmp_path):
    command = [TRAIN_NET, "--config-file", TINY_TRAIN_CONFIG, "MODEL.NOT_A_KEY", "1"]
    result = run(command, tmp_path)
    assert result.returncode == 1
    assert_cause_first_and_once(result.stderr, "MODEL.NOT_A_KEY")
    assert len(result.stderr.splitlines()) == 1, result.stderr


@pytest.mark.parametrize("tool, args, missing", [
    ("visualize_json_results.py", ["--input", "no/results.json", "--output", "drawn",
                                   "--dataset", "coco_json:no/test.json:no/images"],
     ["no/results.json", "no/test.json", "no/images"]),
    ("extract_concept_features.py", ["--config-file", TINY_CONFIG, "--names", "no/names.txt",
                                     "MODEL.WEIGHTS", "no/clip.pth"],
     ["no/names.txt", "no/clip.pth"]),
    ("extract_region_features.py", ["--config-file", TINY_CONFIG, "INPUT_DIR", "no/images",
                                    "MODEL.WEIGHTS", "no/model.pth", "MODEL.CLIP.BB_RPN_WEIGHTS",
                                    "no/rpn.pth", "MODEL.CLIP.CROP_REGION_TYPE", "RPN",
                                    "MODEL.CLIP.OFFLINE_RPN_CONFIG", TINY_RPN_CONFIG],
     ["no/images", "no/model.pth", "no/rpn.pth"]),
])
def test_tools_name_every_missing_input_at_once_without_traceback(tmp_path, tool, args, missing):
    result = run([REPO / "tools" / tool, *args], tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.startswith(f"{tool[:-3]}: error: {len(missing)} inputs are missing")
    assert all(path in result.stderr for path in missing), result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "drawn").exists()


def test_extract_concept_features_checks_its_output_before_encoding(tmp_path, read_only):
    (tmp_path / "names.txt").write_text("cat\ndog\n")
    (tmp_path / "clip.pth").write_bytes(b"")  # never read: the output check comes first
    result = run([REPO / "tools" / "extract_concept_features.py", "--config-file", TINY_CONFIG,
                  "--names", "names.txt", "--output", f"{read_only}/emb.pth", "MODEL.WEIGHTS",
                  "clip.pth"], tmp_path)
    assert result.returncode == 1
    assert_cause_first_and_once(result.stderr, f"--output {read_only}/emb.pth")
    assert len(result.stderr.splitlines()) == 1, result.stderr


def test_the_debug_switch_raises_user_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("REGIONCLIP_DEBUG", "1")
    args = defaults.default_argument_parser().parse_args(
        ["--config-file", str(TINY_TRAIN_CONFIG), "MODEL.NOT_A_KEY", "1"])
    with pytest.raises(ConfigError, match="MODEL.NOT_A_KEY"):
        defaults.run(args)


def test_torch_save_errors_are_one_line(weights, tmp_path, capsys, read_only):
    out = f"{read_only}/regions.pth"
    argv = ["embed", str(tmp_path / "scene.png"), "--boxes", "0,0,20,20", "--weights",
            weights, "--out", out, "--variant", "tiny", "--config", TINY_CONFIG,
            "--rpn-config", TINY_RPN_CONFIG, "--device", "cpu", "--quiet"]
    Image.new("RGB", (80, 60)).save(tmp_path / "scene.png")
    assert main(argv) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and out in error, error


def test_a_full_disk_while_saving_is_one_line_and_leaves_no_file(weights, tmp_path, capsys,
                                                                 monkeypatch):
    def full_disk(obj, f, *args, **kwargs):  # writes part of the file, then the disk is full
        with open(f, "wb") if isinstance(f, (str, os.PathLike)) else f as stream:
            stream.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    folder = tmp_path / "out"
    folder.mkdir()
    Image.new("RGB", (80, 60)).save(tmp_path / "scene.png")
    monkeypatch.setattr(torch, "save", full_disk)
    argv = ["embed", str(tmp_path / "scene.png"), "--boxes", "0,0,20,20", "--weights",
            weights, "--out", str(folder / "regions.pth"), "--variant", "tiny", "--config",
            TINY_CONFIG, "--rpn-config", TINY_RPN_CONFIG, "--device", "cpu", "--quiet"]
    assert main(argv) == 1
    error = capsys.readouterr().err.strip()
    assert error.count("error:") == 1 and "No space left on device" in error, error
    assert f"cannot write {folder / 'regions.pth'}" in error
    assert os.listdir(folder) == []  # neither the output nor a temporary is left


@pytest.mark.slow
def test_errors_in_torchrun_workers_are_printed_once_first(tmp_path):
    result = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                  TRAIN_NET, "--eval-only", "--config-file", TINY_TRAIN_CONFIG,
                  "MODEL.WEIGHTS", "nothere/model.pth", "MODEL.CLIP.TEXT_EMB_PATH",
                  "nothere/emb.pth", "OUTPUT_DIR", tmp_path / "out"], tmp_path)
    assert result.returncode != 0
    # the preflight's list of missing inputs: its summary first, each input once
    assert_cause_first_and_once(result.stderr, "2 inputs are missing")
    assert result.stderr.count("nothere/model.pth") == 1, result.stderr[-3000:]
    assert result.stderr.count("nothere/emb.pth") == 1, result.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# 10. read-only cache, outputs that cannot be written
# ---------------------------------------------------------------------------------------------
def test_read_only_cache_folder_detects_uncached_with_a_warning(
        weights, tmp_path, capsys, monkeypatch, read_only):
    monkeypatch.setenv("REGIONCLIP_CACHE", read_only)
    assert main(detect_args(weights, tmp_path)) == 0
    assert (tmp_path / "out.json").exists()
    error = capsys.readouterr().err
    assert "WARNING" in error and read_only in error


@pytest.mark.parametrize("option", ["--vis", "--out"])
def test_unwritable_outputs_stop_detect_before_the_model_loads(
        weights, tmp_path, capsys, monkeypatch, read_only, option):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the outputs were checked")

    monkeypatch.setattr(regionclip.Detector, "from_pretrained", no_model)
    folder = f"{read_only}/regionclip-{option[2:]}"
    extra = ["--vis", folder] if option == "--vis" else []
    out = f"{folder}/out.json" if option == "--out" else tmp_path / "out.json"
    assert main(detect_args(weights, tmp_path, *extra, out=out)) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and folder in error, error
    assert not (tmp_path / "out.json").exists()


def test_an_out_path_that_is_a_folder_stops_detect_before_the_model_loads(
        weights, tmp_path, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(regionclip.Detector, "from_pretrained", no_model)
    assert main(detect_args(weights, tmp_path, out=tmp_path)) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and f"--out {tmp_path} is a folder" in error, error


def test_a_batch_size_below_one_is_refused_naming_the_option(weights, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(detect_args(weights, tmp_path, "--batch-size", "0"))
    assert exit_info.value.code == 2
    assert "--batch-size: must be at least 1, got 0" in capsys.readouterr().err
