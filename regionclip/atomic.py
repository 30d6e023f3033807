"""Crash-safe file writing: a file is either complete or untouched."""
import contextlib
import os
import uuid


@contextlib.contextmanager
def atomic_open(path, mode: str = "wb", **kwargs):
    """Open a temporary file beside ``path``; it replaces ``path`` only if the block succeeds.

    The temporary name is unique and opened exclusively ("x"), unlike ``mkstemp`` which would
    make the final file private; on any error it is removed and ``path`` keeps its old content.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, mode.replace("w", "x"), **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(error, OSError) and path not in str(error):  # say which file failed
            raise OSError(error.errno, f"cannot write {path}: {error.strerror or error}") \
                from error
        raise
