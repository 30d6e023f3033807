"""Hardening of training runs (issue 12, "lost or mixed runs"), through tools/train_net.py.

No run silently overwrites another: a new run refuses an OUTPUT_DIR that holds a previous one
(unless ``--resume`` or ``--overwrite``), a second concurrent run fails on the folder's lock,
a run killed with SIGKILL (during the final evaluation, or while saving a checkpoint) resumes
to the end, and a resumed run writes the ``metrics.json`` of an uninterrupted one.
"""
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _data_utils import make_coco_dataset
from _engine_utils import Killed, read_json_lines
from _tool_utils import run_train_net

from regionclip.checkpoint import read_checkpoint
from regionclip.engine import output_dir
from regionclip.engine.output_dir import LOCK_FILE, OutputDirError, OutputDirLock
from regionclip.engine.trainer import Trainer
from regionclip.evaluation.results import finite_or_null

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tests" / "tiny.yaml"
TRAIN_NET = REPO / "tools" / "train_net.py"
WALL_CLOCK = ("time", "data_time")  # the only metrics that differ between identical runs
# tools/train_net.py in a child process that kills itself (SIGKILL, as `kill -9`) at a point
# chosen by the test: argv[1] is python code run first, which may call `die()`.
KILLING_DRIVER = """
import os, runpy, signal, sys
def die():
    os.kill(os.getpid(), signal.SIGKILL)
exec(sys.argv[1])
sys.argv = [{train_net!r}] + sys.argv[2:]
runpy.run_path({train_net!r}, run_name="__main__")
""".format(train_net=str(TRAIN_NET))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    json_path, image_dir = make_coco_dataset(tmp_path_factory.mktemp("data"), num_images=4,
                                             image_size=(48, 64))
    return f"coco_json:{json_path}:{image_dir}"


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the child processes
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_args(dataset, out, max_iter, *flags, lr="0.01"):
    return [*flags, "--config-file", TINY_CONFIG, "DATASETS.TRAIN", f'("{dataset}",)',
            "DATASETS.TEST", f'("{dataset}",)', "OUTPUT_DIR", out, "SOLVER.MAX_ITER", max_iter,
            "SOLVER.CHECKPOINT_PERIOD", 2, "SOLVER.BASE_LR", lr]


def train(dataset, out, max_iter, *flags, **kwargs):
    return run_train_net(train_args(dataset, out, max_iter, *flags, **kwargs))


def run_killed(tmp_path, code, args):
    """train_net in a child process running ``code`` first; returns the completed process."""
    command = [sys.executable, "-c", KILLING_DRIVER, code, *map(str, args)]
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}


def without_wall_clock(lines):
    return [{k: v for k, v in line.items() if k not in WALL_CLOCK} for line in lines]


# ---------------------------------------------------------------------------------------------
# 4. a new run over a previous one
# ---------------------------------------------------------------------------------------------
def test_new_run_refuses_a_folder_holding_a_previous_run(tmp_path, dataset):
    out = tmp_path / "out"
    train(dataset, out, 2)
    before = snapshot(out)
    with pytest.raises(FileExistsError, match=rf"{out}.*--resume.*--overwrite"):
        train(dataset, out, 4, lr="0.02")
    after = snapshot(out)
    after.pop("log.txt"), before.pop("log.txt")
    assert after == before  # config, checkpoints, metrics of the previous run untouched


def test_overwrite_replaces_the_previous_run_and_resume_continues_the_new_one(
        tmp_path, dataset, monkeypatch):
    out = tmp_path / "out"
    train(dataset, out, 8)  # leaves model_0000001/3/5.pth and model_final.pth
    kill_at_iteration(monkeypatch, 3)
    with pytest.raises(Killed):
        train(dataset, out, 4, "--overwrite")
    monkeypatch.undo()
    assert sorted(p.name for p in out.glob("*.pth")) == ["model_0000001.pth"]
    train(dataset, out, 4, "--resume")
    with open(out / "log.txt") as f:
        assert f"Resumed from {out / 'model_0000001.pth'}" in f.read()
    assert read_checkpoint(out / "model_final.pth")["iteration"] == 4


def test_resume_refuses_a_last_checkpoint_that_is_gone(tmp_path, dataset):
    out = tmp_path / "out"
    train(dataset, out, 2)
    os.remove(out / "model_final.pth")
    with pytest.raises(FileNotFoundError, match=r"model_final\.pth.*last_checkpoint"):
        train(dataset, out, 4, "--resume")


def kill_at_iteration(monkeypatch, iteration):
    run_step = Trainer.run_step

    def step(self, i, batch):
        if i == iteration:
            raise Killed(f"killed at iteration {i}")
        return run_step(self, i, batch)

    monkeypatch.setattr(Trainer, "run_step", step)


# ---------------------------------------------------------------------------------------------
# 5. two runs at once
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_second_concurrent_run_fails_on_the_lock(tmp_path, dataset, monkeypatch):
    out, second = tmp_path / "out", {}
    run_step = Trainer.run_step

    def step(self, iteration, batch):  # start the second run while the first trains
        if iteration == 0:
            second["result"] = run_killed(tmp_path, "", train_args(dataset, out, 2, lr="0.5"))
        return run_step(self, iteration, batch)

    monkeypatch.setattr(Trainer, "run_step", step)
    train(dataset, out, 4)
    result = second["result"]
    assert result.returncode != 0
    assert f"pid {os.getpid()}" in result.stderr and str(out) in result.stderr
    with open(out / "config.yaml") as f:
        assert "BASE_LR: 0.01" in f.read()
    assert read_checkpoint(out / "model_final.pth")["iteration"] == 4
    assert [line["iteration"] for line in read_json_lines(out / "metrics.json")] == [3, 3]


# ---------------------------------------------------------------------------------------------
# 6, 8. SIGKILL during the final evaluation, or while a checkpoint is written
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_kill_during_the_final_evaluation_then_resume_evaluates(tmp_path, dataset):
    out = tmp_path / "out"
    code = "import regionclip.evaluation.coco as c; c.COCOEvaluator.evaluate = lambda *a: die()"
    killed = run_killed(tmp_path, code, train_args(dataset, out, 2))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert read_checkpoint(out / "model_final.pth")["iteration"] == 2
    assert not (out / "inference" / "metrics.json").exists()

    results = train(dataset, out, 2, "--resume")
    assert results[dataset]["bbox"]["AP"] >= 0
    with open(out / "log.txt") as f:
        assert "Took over the lock of a run that is gone" in f.read()
    with open(out / "inference" / "metrics.json") as f:
        assert json.load(f) == finite_or_null(results)  # NaN metrics written as null
    evaluations = [line for line in read_json_lines(out / "metrics.json")
                   if f"{dataset}/bbox/AP" in line]
    assert [line["iteration"] for line in evaluations] == [1]


@pytest.mark.slow
def test_kill_while_saving_a_checkpoint_leaves_no_temporary_after_resume(tmp_path, dataset):
    out = tmp_path / "out"
    code = ("import torch; save = torch.save\n"
            "def partial(obj, f, *a, **k):\n"
            "    if 'model_0000003' in str(getattr(f, 'name', f)):\n"
            "        f.write(b'partial'); f.flush(); die()\n"
            "    return save(obj, f, *a, **k)\n"
            "torch.save = partial")
    killed = run_killed(tmp_path, code, train_args(dataset, out, 6))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    stale = [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert len(stale) == 1 and stale[0].startswith(".model_0000003.pth.")
    (out / "notes.tmp").write_text("a file of the user's")

    train(dataset, out, 6, "--resume")
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp")) == ["notes.tmp"]
    with open(out / "log.txt") as f:
        log = f.read()
    assert f"Resumed from {out / 'model_0000001.pth'}" in log
    assert stale[0] in log  # the removal is reported
    assert read_checkpoint(out / "model_final.pth")["iteration"] == 6


# ---------------------------------------------------------------------------------------------
# 7. metrics.json of a resumed run
# ---------------------------------------------------------------------------------------------
def test_resumed_metrics_equal_an_uninterrupted_run(tmp_path, dataset, monkeypatch):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(dataset, straight, 6)
    kill_at_iteration(monkeypatch, 5)
    with pytest.raises(Killed):
        train(dataset, resumed, 6)
    monkeypatch.undo()
    with open(resumed / "metrics.json", "a") as f:
        f.write('{"iteration": 5, "lr": 0.0')  # killed while writing a line

    train(dataset, resumed, 6, "--resume")
    expected = without_wall_clock(read_json_lines(straight / "metrics.json"))
    got = without_wall_clock(read_json_lines(resumed / "metrics.json"))
    assert [line["iteration"] for line in got] == [5, 5]
    assert [sorted(line) for line in got] == [sorted(line) for line in expected]
    for line, reference in zip(got, expected):
        numbers = {k for k, v in reference.items() if v is not None}
        assert {k: line[k] for k in numbers} == pytest.approx(
            {k: reference[k] for k in numbers}, rel=1e-6)


@pytest.mark.parametrize("lock_text, holder", [
    ('{"pid": 1, "host": "another-machine", "started": "2026-01-01T00:00:00"}',
     "pid 1 on another-machine"),
    ("not json", "a run whose lock cannot be read"),
])
def test_locks_of_other_hosts_and_unreadable_locks_are_never_taken_over(tmp_path, lock_text,
                                                                         holder):
    (tmp_path / LOCK_FILE).write_text(lock_text)
    with pytest.raises(OutputDirError, match=holder) as error:
        with OutputDirLock(str(tmp_path)):
            pass
    assert str(tmp_path / LOCK_FILE) in str(error.value)
    assert (tmp_path / LOCK_FILE).read_text() == lock_text


def test_of_two_runs_that_find_the_same_dead_run_one_takes_its_lock(tmp_path, monkeypatch):
    """Run B judges the lock stale; before B takes it, run A (same dead holder) tries too: the
    OS lock that B holds while it judges makes A fail, instead of both running."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_FILE).write_text(json.dumps(
        {"pid": dead.pid, "host": socket.gethostname(), "started": "2026-01-01T00:00:00"}))
    judge, attempts = output_dir._is_stale, []

    def judge_while_another_run_enters(holder, path):
        if not attempts:
            attempts.append("A")
            with pytest.raises(OutputDirError, match="in use"):
                with OutputDirLock(str(tmp_path)):
                    pass
        return judge(holder, path)

    monkeypatch.setattr(output_dir, "_is_stale", judge_while_another_run_enters)
    with OutputDirLock(str(tmp_path)) as b:
        assert b.stale_owner["pid"] == dead.pid and attempts == ["A"]
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_FILE).exists()
