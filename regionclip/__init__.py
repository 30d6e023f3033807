"""RegionCLIP: region-based language-image pretraining and open-vocabulary detection."""
from .checkpoint import load_checkpoint, save_checkpoint
from .config import get_cfg, load_config
from .modeling.build import build_model

__version__ = "0.1.0"

__all__ = ["Detector", "build_model", "get_cfg", "load_checkpoint", "load_config",
           "save_checkpoint"]


def __getattr__(name):
    # The high-level API pulls in image decoding and the text cache; load it on first use.
    if name == "Detector":
        from .api import Detector

        return Detector
    raise AttributeError(f"module 'regionclip' has no attribute {name!r}")
