"""RegionCLIP: region-based language-image pretraining and open-vocabulary detection."""
import importlib

__version__ = "0.1.0"

# Loaded on first use: importing torch and the models takes seconds, which the ``regionclip``
# command's argument parsing (a submodule, so this file runs first) should not wait for.
_EXPORTS = {
    "Detector": ".api",
    "build_model": ".modeling.build",
    "get_cfg": ".config",
    "load_checkpoint": ".checkpoint",
    "load_config": ".config",
    "save_checkpoint": ".checkpoint",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'regionclip' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_EXPORTS])
