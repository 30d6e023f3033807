"""Several gloo processes on the CPU: training follows the one-process trajectory for the same
total batch, and sharded inference gathers to the one-process metrics."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _data_utils import make_coco_dataset
from _engine_utils import distributed_checks

from regionclip.distributed import launch

TESTS = Path(__file__).resolve().parent


def _read(path):
    with open(path) as f:
        return json.load(f)


def _assert_same_run(one, other):
    assert len(one["losses"]) == len(other["losses"]) == 6
    assert other["losses"] == pytest.approx(one["losses"], rel=1e-5)
    for key, value in one["state"].items():
        torch.testing.assert_close(torch.tensor(other["state"][key]), torch.tensor(value),
                                   rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same checks in one process and in two spawned gloo processes."""
    root = tmp_path_factory.mktemp("distributed")
    json_path, image_dir = make_coco_dataset(root / "data", num_images=5, image_size=(32, 40))
    single, double = root / "single", root / "double"
    distributed_checks(str(single), json_path, image_dir)
    launch(distributed_checks, num_gpus_per_machine=2,
           args=(str(double), json_path, image_dir))
    return {"single": single, "double": double, "data": (json_path, image_dir)}


def test_two_gloo_processes_follow_the_single_process_trajectory(runs):
    _assert_same_run(_read(runs["single"] / "train.json"), _read(runs["double"] / "train.json"))
    assert os.path.isfile(runs["double"] / "train" / "model_final.pth")


def test_sharded_inference_gathers_to_single_process_metrics(runs):
    single, double = _read(runs["single"] / "eval.json"), _read(runs["double"] / "eval.json")
    assert single["shard"] == 5 and double["shard"] == 3  # rank 0 saw only its shard
    assert double["results"] == single["results"]
    assert 0 < single["results"]["bbox"]["AP"] < 100


@pytest.mark.slow
def test_torchrun_follows_the_single_process_trajectory(tmp_path, runs):
    script = tmp_path / "run.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(TESTS)!r})\n"
        "from _engine_utils import distributed_checks\n"
        "from regionclip.distributed import launch\n"
        f"launch(distributed_checks, args=({str(tmp_path)!r}, *{runs['data']!r}))\n"
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", str(script)]
    process = subprocess.Popen(command, cwd=tmp_path, start_new_session=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert process.wait(timeout=300) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    _assert_same_run(_read(runs["single"] / "train.json"), _read(tmp_path / "train.json"))
    single_metrics = _read(runs["single"] / "eval.json")["results"]
    assert _read(tmp_path / "eval.json")["results"] == single_metrics
