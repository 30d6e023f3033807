"""One run per output folder.

A run holds ``OUTPUT_DIR/.regionclip.lock`` (pid, host and start time of its main process)
until it ends. A lock whose process is gone (same host, no such process) is stale and taken
over; one held by a live process, or by another host, stops the new run with a message naming
its holder.
"""
import contextlib
import datetime
import json
import logging
import os
import socket
from typing import Dict, Optional

logger = logging.getLogger("regionclip")

LOCK_FILE = ".regionclip.lock"
_HELD = set()  # lock files this process holds


class OutputDirError(FileExistsError):
    """OUTPUT_DIR is in use by another run."""


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
        for _ in range(3):  # a stale lock removed here may be re-taken by a third run
            if self._create():
                _HELD.add(os.path.abspath(self.path))
                return self
            holder = self._read()
            if not _is_stale(holder, self.path):
                raise OutputDirError(self._in_use_message(holder))
            self.stale_owner = holder
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
        raise OutputDirError(self._in_use_message(self._read()))

    def __exit__(self, *exc) -> None:
        _HELD.discard(os.path.abspath(self.path))
        if self._read() == self.record:
            os.remove(self.path)

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.record, f)
        return True

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


def tidy(lock: OutputDirLock) -> None:
    """Report a taken-over lock (call with the lock held, after logging is set up)."""
    if lock.stale_owner is not None:
        logger.warning("Took over the lock of a run that is gone (pid %s on %s, started %s)",
                       lock.stale_owner.get("pid"), lock.stale_owner.get("host"),
                       lock.stale_owner.get("started"))
