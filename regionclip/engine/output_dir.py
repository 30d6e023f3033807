"""The output folder of a training run: its checkpoints and markers; one run at a time, no new
run over a previous one, no debris of killed runs.

The trainer writes ``model_{iteration:07d}.pth`` and ``model_final.pth``, names the newest in
``last_checkpoint`` and the iteration of the last finished evaluation in ``last_evaluation``
(a run killed while evaluating redoes it when resumed).

A run holds ``OUTPUT_DIR/.regionclip.lock`` (pid, host and start time of its main process)
until it ends. A lock whose process is gone (same host, no such process) is stale and taken
over; one held by a live process, or by another host, stops the new run with a message naming
its holder. A training run without ``--resume`` refuses a folder holding another run's
checkpoints or metrics unless ``--overwrite`` asks to replace that run. Temporaries that
``regionclip.atomic`` leaves when a process is killed mid-write are removed at the start.
"""
import datetime
import fcntl
import json
import logging
import os
import re
import shutil
import socket
from typing import Dict, List, Optional

from .metrics import METRICS_FILE, TENSORBOARD_DIR

logger = logging.getLogger("regionclip")

LAST_CHECKPOINT_FILE = "last_checkpoint"
LAST_EVALUATION_FILE = "last_evaluation"
FINAL_CHECKPOINT = "model_final.pth"
_PERIODIC = re.compile(r"model_(\d{7})\.pth")
LOCK_FILE = ".regionclip.lock"
# atomic_open's temporaries: ".<file name>.<uuid4 hex>.tmp"
_TEMPORARY = re.compile(r"\..+\.[0-9a-f]{32}\.tmp")
_TEMPORARY_FOLDERS = ("", "inference")
_HELD = set()  # lock files this process holds


def is_periodic_checkpoint(name: str) -> bool:
    return bool(_PERIODIC.fullmatch(name))


def last_checkpoint_path(output_dir: str) -> str:
    """The checkpoint named in ``output_dir/last_checkpoint``, or "" when there is none.

    A marker naming a file that is gone is an error: resuming would silently start over.
    """
    marker = os.path.join(output_dir, LAST_CHECKPOINT_FILE)
    if not os.path.isfile(marker):
        return ""
    with open(marker) as f:
        path = os.path.join(output_dir, f.read().strip())
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is missing but {marker} names it as the checkpoint to resume from: "
            "restore it, write the name of another model_*.pth of the folder into "
            f"{LAST_CHECKPOINT_FILE}, or start a new run with --overwrite")
    return path


def last_evaluation(output_dir: str) -> int:
    """The iteration of the last finished evaluation in ``output_dir`` (-1: none)."""
    try:
        with open(os.path.join(output_dir, LAST_EVALUATION_FILE)) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return -1


# ---------------------------------------------------------------------------------------------
# One run at a time
# ---------------------------------------------------------------------------------------------
class OutputDirError(FileExistsError):
    """OUTPUT_DIR is in use by another run, or holds one that this run would overwrite."""


class OutputDirLock:
    """``with OutputDirLock(folder):`` the block runs as the only run of ``folder``.

    ``stale_owner`` is the lock record of a dead run whose lock was taken over, else None.
    """

    def __init__(self, folder: str):
        self.folder = folder
        self.path = os.path.join(folder, LOCK_FILE)
        self.record = {"pid": os.getpid(), "host": socket.gethostname(),
                       "started": datetime.datetime.now().isoformat(timespec="seconds")}
        self.stale_owner: Optional[Dict] = None

    def __enter__(self) -> "OutputDirLock":
        os.makedirs(self.folder, exist_ok=True)
        for _ in range(3):  # the lock file may vanish under us as its run ends: try again
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                fcntl.flock(fd, fcntl.LOCK_EX)  # a run that finds it new only peeks, briefly
            except FileExistsError:
                fd = self._take_over()
                if fd is None:
                    continue
            os.write(fd, json.dumps(self.record).encode())
            self._fd = fd
            _HELD.add(os.path.abspath(self.path))
            return self
        raise OutputDirError(self._in_use_message(self._read()))

    def _take_over(self) -> Optional[int]:
        """The existing lock, held by this run now that its own is gone (the OS lock of a run
        lasts as long as its process: of several runs that find the same dead run, one gets
        it); None if the file went away meanwhile. OutputDirError while its run lives."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputDirError(self._in_use_message(self._read())) from None
        holder = self._read()
        if os.fstat(fd).st_ino != _inode(self.path):  # removed as its run ended
            os.close(fd)
            return None
        if not _is_stale(holder, self.path):
            os.close(fd)
            raise OutputDirError(self._in_use_message(holder))
        self.stale_owner = holder
        os.ftruncate(fd, 0)
        return fd

    def __exit__(self, *exc) -> None:
        _HELD.discard(os.path.abspath(self.path))
        if _inode(self.path) == os.fstat(self._fd).st_ino:  # not replaced by hand meanwhile
            os.remove(self.path)
        os.close(self._fd)

    def _read(self) -> Optional[Dict]:
        try:
            with open(self.path) as f:
                record = json.load(f)
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def _in_use_message(self, holder: Optional[Dict]) -> str:
        who = ("a run whose lock cannot be read" if holder is None else
               f"another run (pid {holder.get('pid')} on {holder.get('host')}, "
               f"started {holder.get('started')})")
        return (f"{self.folder} is in use by {who}: wait for it to end or choose another "
                f"OUTPUT_DIR; if no run uses the folder any more, delete {self.path}")


def _inode(path: str) -> Optional[int]:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def _is_stale(holder: Optional[Dict], path: str) -> bool:
    """The lock's process is gone: it ran on this host and no process has its pid (or the pid
    is this process's, which does not hold the lock: an earlier life of the pid)."""
    if holder is None or holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    if pid == os.getpid():
        return os.path.abspath(path) not in _HELD
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def previous_run_files(folder: str) -> List[str]:
    """Names of the checkpoints, markers and metrics of a training run in ``folder``."""
    if not os.path.isdir(folder):
        return []
    markers = (LAST_CHECKPOINT_FILE, LAST_EVALUATION_FILE, METRICS_FILE)

    def of_a_run(name):
        if name in markers:
            return os.path.getsize(os.path.join(folder, name)) > 0
        return name == FINAL_CHECKPOINT or is_periodic_checkpoint(name)

    return sorted(filter(of_a_run, os.listdir(folder)))


def check_previous_run(folder: str, resume: bool, overwrite: bool) -> None:
    """OutputDirError when a new training run (neither resume nor overwrite) would write over
    another run's files, as a rotation or a later ``--resume`` would mix the two."""
    found = previous_run_files(folder)
    if found and not (resume or overwrite):
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise OutputDirError(
            f"{folder} holds a previous run ({shown}): pass --resume to continue it, "
            "--overwrite to replace it, or choose another OUTPUT_DIR")


def tidy(lock: OutputDirLock, overwrite: bool) -> None:
    """Report a taken-over lock, remove the previous run when ``overwrite``, and remove the
    temporaries of killed runs (call with the lock held, after logging is set up)."""
    folder = lock.folder
    if lock.stale_owner is not None:
        logger.warning("Took over the lock of a run that is gone (pid %s on %s, started %s)",
                       lock.stale_owner.get("pid"), lock.stale_owner.get("host"),
                       lock.stale_owner.get("started"))
    if overwrite:
        found = previous_run_files(folder)
        for name in found:
            os.remove(os.path.join(folder, name))
        shutil.rmtree(os.path.join(folder, TENSORBOARD_DIR), ignore_errors=True)
        if found:
            logger.warning("--overwrite: removed the previous run's %s from %s",
                           ", ".join(found), folder)
    for sub in _TEMPORARY_FOLDERS:
        path = os.path.join(folder, sub)
        names = os.listdir(path) if os.path.isdir(path) else []
        for name in filter(_TEMPORARY.fullmatch, names):
            os.remove(os.path.join(path, name))
            logger.warning("Removed %s, left by a run killed while writing it",
                           os.path.join(path, name))
