"""Progress bars for the waits of the Python API and the ``regionclip`` command.

Bars go to stderr (results and logs of scripts stay clean on stdout) and show the count, the
rate and the ETA, like train_net's inference log lines. While a bar is shown, the
``regionclip`` logger writes through it, so that a log line does not break the bar.
"""
import contextlib
import logging
import sys
from typing import Callable, Iterator, Optional

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

__all__ = ["progress_bar", "steps"]

_LOGGER = "regionclip"


@contextlib.contextmanager
def progress_bar(total: int, desc: str, unit: str, enabled: bool = True,
                 leave: bool = True) -> Iterator[tqdm]:
    """``with progress_bar(n, "Detecting", "image") as bar: ... bar.update(k)``; nothing is
    shown when not ``enabled``."""
    with tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=leave,
              file=sys.stderr, dynamic_ncols=True) as bar:
        if not enabled:
            yield bar
            return
        with logging_redirect_tqdm([logging.getLogger(_LOGGER)]):
            yield bar


@contextlib.contextmanager
def steps(desc: str, count: int, enabled: bool = True) -> Iterator[Callable[[str], None]]:
    """A bar over ``count`` named steps: ``with steps("Loading x", 2) as step:`` then
    ``step("building the model")`` as each step starts (the previous one is then done)."""
    current: Optional[str] = None
    with progress_bar(count, desc, "step", enabled) as bar:
        def step(text: str) -> None:
            nonlocal current
            if current is not None:
                bar.update()
            current = text
            bar.set_postfix_str(text)

        yield step
        bar.set_postfix_str("done")
        bar.update(count - bar.n)
