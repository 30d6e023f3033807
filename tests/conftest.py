"""Suite-wide fixtures."""
import logging

import pytest


@pytest.fixture(autouse=True)
def _restore_regionclip_logger():
    """Tools run in-process call ``setup_logging``, which gives the "regionclip" logger its own
    handlers and stops propagation; undo that so later tests' ``caplog`` sees its records."""
    logger = logging.getLogger("regionclip")
    state = (logger.handlers[:], logger.propagate, logger.level)
    yield
    for handler in logger.handlers:
        if handler not in state[0]:
            handler.close()
    logger.handlers[:], logger.propagate, logger.level = state
