"""What a training process keeps of its own state across checkpoints, and what it gives back.

Random-number states of every generator (python, numpy, torch, CUDA) are saved with each
checkpoint and restored on resume, so that a resumed run continues the trajectory of an
uninterrupted one; evaluations run without disturbing them. Heap memory freed by a training
step is handed back to the operating system.
"""
import contextlib
import ctypes
import random
import sys
from typing import Dict

import numpy as np
import torch

# A trim takes milliseconds (tens on a large heap) and the trimmed pages must be faulted in
# again: little after a step of half a second or more, a 10 % slowdown of the millisecond steps
# of tiny models (the test suite), whose heaps never grow large.
HEAP_RELEASE_MIN_STEP_S = 0.5


def release_freed_heap() -> None:
    """Hand the heap pages freed by the last step back to the operating system (glibc only).

    CPU tensors of shapes that change every step (images of other sizes, other numbers of
    regions) leave glibc's heap fragmented, and it keeps the freed pages: 40 iterations of the
    toy world's transfer stage peaked at 4.3 GB resident without this call, 2.3 GB with it,
    for 3-10 % more time (the pages are faulted in again); docs/TOYWORLD.md has the figures.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None)  # the symbols of the running process, libc's among them
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)


def capture_rng_state() -> Dict:
    """This process's python, numpy, torch (and CUDA) generator states, as checkpoint-safe
    values (tuples, ints, tensors: readable with ``weights_only``)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict) -> None:
    random.setstate(_as_tuples(state["python"]))
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # a run resumed with fewer visible GPUs restores the devices it has
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


def _as_tuples(value):
    # random.setstate needs tuples; a round trip through some serialisers yields lists
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


@contextlib.contextmanager
def preserved_rng_state():
    """Run a block (e.g. an evaluation) without disturbing the training's random streams."""
    state = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)
